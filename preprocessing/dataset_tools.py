"""Dataset preparation: crop/resize images, encode them to latents, cache caption embeddings.

    python preprocessing/dataset_tools.py convert --source RAW --dest DATA/images --resolution 256
    python preprocessing/dataset_tools.py encode-vavae --config tokenizer/configs/vavae_f16d32_vfdinov2.yaml \\
        --source DATA/images --dest DATA/vae-in --gpus 8 --batch-size 100
    python preprocessing/dataset_tools.py encode-vavae --tokenizer pixel --gpus 0 \\
        --source DATA/images --dest DATA/vae-in
    python preprocessing/dataset_tools.py encode-text --data-dir DATA --text-encoder <hub id or path>
    python preprocessing/dataset_tools.py check --data-dir DATA
    python preprocessing/dataset_tools.py pack --data-dir DATA --dest SHARDS
    accelerate launch preprocessing/dataset_tools.py encode-wds --source WDS_TARS --dest SHARDS \
        --tokenizer vavae:tokenizer/configs/vavae_f16d32_vfdinov2.yaml --resolution 256

Every command keeps relative paths (<rel_dir>/<stem>.<ext>), writes each file atomically and skips
outputs that already exist, so an interrupted run resumes where it stopped.
"""
import argparse
import io
import json
import multiprocessing
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from json_label_dataset import IMAGE_EXTENSIONS, list_files, read_labels, to_rgb  # noqa: E402
from models.text_encoder import CLIP_OUTPUTS  # noqa: E402
from models.tokenizers import is_pixel_spec, load_tokenizer  # noqa: E402
from models.vavae import read_vavae_config, resolve_checkpoint  # noqa: E402
from omegadit.files import parse_json, read_json  # noqa: E402
from omegadit.conditioners import DEFAULT_TEXT_LEN  # noqa: E402
from preprocessing.check import check_dataset  # noqa: E402


ENCODING_RECORD = "encoding.json"


class ImageSource:
    """Image files of a folder or a zip archive, by sorted relative path ('/'-separated)."""

    def __init__(self, path):
        self.path = str(path)
        self._zip = None
        if os.path.isdir(self.path):
            self.is_zip = False
            self.names = list_files(self.path, IMAGE_EXTENSIONS)
        elif os.path.isfile(self.path) and zipfile.is_zipfile(self.path):
            self.is_zip = True
            with zipfile.ZipFile(self.path) as z:
                self.names = sorted(n for n in z.namelist() if _is_image_name(n))
        else:
            raise FileNotFoundError(f"--source is neither a directory nor a zip archive: {self.path}")

    def __getstate__(self):
        return dict(self.__dict__, _zip=None)

    def read_bytes(self, name: str) -> bytes:
        if not self.is_zip:
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        return self._zip.read(name)

    def open(self, name: str) -> PIL.Image.Image:
        """The image `name` as a loaded RGB PIL image (raises on unreadable files)."""
        fp = io.BytesIO(self.read_bytes(name)) if self.is_zip else os.path.join(self.path, name)
        with PIL.Image.open(fp) as img:
            img.load()
            return to_rgb(img).copy()

    def class_labels(self):
        """{name: label} from a dataset.json at the source root, or None."""
        if self.is_zip:
            with zipfile.ZipFile(self.path) as z:
                if "dataset.json" not in z.namelist():
                    return None
                data = parse_json(z.read("dataset.json"), f"{self.path}/dataset.json")
        else:
            meta = os.path.join(self.path, "dataset.json")
            if not os.path.isfile(meta):
                return None
            data = read_json(meta)
        return {name: label for name, label in data.get("labels") or []}


def _is_image_name(name: str) -> bool:
    parts = name.split("/")
    return (not name.endswith("/") and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
            and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)


def output_names(names, suffix: str) -> dict:
    """{source name: '<rel_dir>/<stem><suffix>'}; two sources with one output raise ValueError."""
    outputs, seen = {}, {}
    clashes = []
    for name in names:
        out = os.path.splitext(name)[0] + suffix
        if out in seen:
            clashes.append(f"{seen[out]} / {name}")
        seen[out] = name
        outputs[name] = out
    if clashes:
        raise ValueError(f"{len(clashes)} source files would write the same output (first 5: {'; '.join(clashes[:5])})")
    return outputs


def atomic_write(path, write) -> None:
    """Create `path` by calling write(file) on a temporary file in the same directory, then renaming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npy(path, array) -> None:
    """np.save `array` to `path` atomically."""
    atomic_write(path, lambda f: np.save(f, array))


def center_crop_adm(img: PIL.Image.Image, resolution: int) -> PIL.Image.Image:
    """ADM center crop: halve with BOX while the short side >= 2*res, BICUBIC to short side = res, crop."""
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(x // 2 for x in img.size), resample=PIL.Image.Resampling.BOX)
    scale = resolution / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=PIL.Image.Resampling.BICUBIC)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def write_class_labels(path, labels) -> None:
    """Write {"labels": [[fname, label], ...]} atomically."""
    atomic_write(path, lambda f: f.write(json.dumps({"labels": labels}).encode()))


# ---------------------------------------------------------------------------------------------------------- convert

_convert_state = {}


def _init_convert(source, dest, resolution, compress_level):
    _convert_state.update(source=source, dest=dest, resolution=resolution, compress_level=compress_level)


def _convert_one(job):
    name, out = job
    s = _convert_state
    try:
        img = center_crop_adm(s["source"].open(name), s["resolution"])
    except Exception as e:  # any decoding failure of one file is reported, not fatal
        return name, f"{type(e).__name__}: {e}"
    atomic_write(os.path.join(s["dest"], out), lambda f: img.save(f, format="png", compress_level=s["compress_level"]))
    return name, None


def _map(fn, jobs, workers, initializer, initargs):
    if workers <= 0:
        initializer(*initargs)
        yield from map(fn, jobs)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"  # no CUDA here
    with multiprocessing.get_context(method).Pool(workers, initializer, initargs) as pool:
        yield from pool.imap_unordered(fn, jobs, chunksize=8)


def convert(source, dest, resolution: int, max_images=None, workers: int = 0, dir_labels: bool = False,
            compress_level: int = 6, overwrite: bool = False) -> dict:
    """Center-crop and resize the images of a folder or zip to `resolution` PNGs under `dest`.

    Relative paths are kept (extension -> .png). Unreadable files are listed and skipped. Class labels
    from a source dataset.json (or, with dir_labels, from top-level directory names) go to dest/dataset.json.
    Returns counts and the unreadable names.
    """
    src = ImageSource(source)
    names = src.names[:max_images]
    outputs = output_names(names, ".png")
    todo = [n for n in names if overwrite or not os.path.isfile(os.path.join(dest, outputs[n]))]
    print(f"convert: {len(names)} images in {source}, {len(names) - len(todo)} already in {dest}, "
          f"converting {len(todo)} to {resolution}x{resolution}")
    failed = {}
    jobs = [(n, outputs[n]) for n in todo]
    for name, error in tqdm(_map(_convert_one, jobs, workers, _init_convert, (src, str(dest), resolution,
                                                                           compress_level)),
                            total=len(jobs), desc="convert"):
        if error is not None:
            failed[name] = error
    if failed:
        print(f"convert: skipped {len(failed)} unreadable files:", file=sys.stderr)
        for name in sorted(failed):
            print(f"  {name}: {failed[name]}", file=sys.stderr)
    done = [n for n in names if n not in failed]
    labels = src.class_labels()
    if labels is None and dir_labels:
        classes = sorted({n.split("/")[0] for n in done if "/" in n})
        labels = {n: classes.index(n.split("/")[0]) for n in done if "/" in n}
    if labels:
        os.makedirs(dest, exist_ok=True)
        write_class_labels(os.path.join(dest, "dataset.json"), [[outputs[n], labels[n]] for n in done if n in labels])
    return {"converted": len(todo) - len(failed), "skipped_existing": len(names) - len(todo),
            "unreadable": sorted(failed)}


# ----------------------------------------------------------------------------------------------------------- encode

class _ImageFiles(torch.utils.data.Dataset):
    """(name, HWC uint8 array or None, error or None) of each image. Arrays, not tensors, leave the loader's
    workers: a tensor would travel as its own shared-memory file, a handshake per image that costs more than
    decoding a small one."""

    def __init__(self, source: ImageSource, names):
        self.source, self.names = source, names

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        name = self.names[index]
        try:
            array = np.array(self.source.open(name))
        except Exception as e:  # reported by the encoder loop, not fatal
            return name, None, f"{type(e).__name__}: {e}"
        return name, array, None


def _keep_list(batch):
    return batch


def _encode_shard(rank, world, spec, ckpt_path, source, dest, names, batch_size, dtype, workers, device_type,
                  posterior=None):
    """Encode names[rank::world] on cuda:rank (or the CPU) and save <dest>/<output>.npy files; `posterior` is None
    (no posterior), ('mean', seed) or ('sample', seed)."""
    device = torch.device(f"cuda:{rank}" if device_type == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokenizer = load_tokenizer(spec, device=device, ckpt_path=ckpt_path)
    shard = names[rank::world]
    loader = torch.utils.data.DataLoader(_ImageFiles(source, shard), batch_size=batch_size, num_workers=workers,
                                         collate_fn=_keep_list)
    with tqdm(total=len(shard), desc=f"encode {device}", position=rank, dynamic_ncols=True) as bar:
        for batch in loader:
            groups = {}
            for name, image, error in batch:
                if image is None:
                    tqdm.write(f"encode: skipped unreadable {name}: {error}", file=sys.stderr)
                else:
                    groups.setdefault(tuple(image.shape), []).append((name, image))
            for items in groups.values():
                pixels = torch.from_numpy(np.stack([image for _, image in items])).permute(0, 3, 1, 2)
                images = pixels.contiguous().to(device, non_blocking=True)
                if posterior is not None and posterior[0] == "sample":
                    ids = [os.path.splitext(name)[0] for name, _ in items]
                    latents = tokenizer.encode_sample(images, ids, posterior[1])
                else:
                    latents = tokenizer.encode(images)
                latents = latents.cpu().numpy().astype(dtype)
                for (name, _), latent in zip(items, latents):
                    save_npy(os.path.join(dest, os.path.splitext(name)[0] + ".npy"), latent)
            bar.update(len(batch))


def _encode_worker(rank, *args):
    _encode_shard(rank, *args)


def run_shards(world, device_type, *args, posterior=None):
    """Run _encode_shard for ranks 0..world-1: in this process when world == 1, else one spawned process each."""
    if world == 1:
        _encode_shard(0, 1, *args, device_type, posterior)
    else:
        torch.multiprocessing.spawn(_encode_worker, args=(world, *args, device_type, posterior), nprocs=world,
                                    join=True)


def default_posterior(tokenizer: str):
    """The posterior latent a tokenizer spec encodes to by default: 'sample' for VA-VAE (what the original
    OmegaDiT stored), 'mean' for other VAEs, None for the pixel tokenizer (it has no posterior)."""
    if is_pixel_spec(tokenizer):
        return None
    return "sample" if tokenizer.startswith("vavae:") else "mean"


def check_encoding_record(dest, record: dict, existing: int) -> None:
    """<dest>/encoding.json records how its latents were encoded; a run that would take another posterior latent
    (mean or sample, or another seed) into the same folder is refused, so that one folder never mixes the two. A
    folder that already holds `existing` latents but no record gets none (how they were made is unknown), and a
    note."""
    path = Path(dest) / ENCODING_RECORD
    if path.is_file():
        held = json.loads(path.read_text())
        keys = ("posterior", "posterior_seed")
        if [held.get(k) for k in keys] != [record.get(k) for k in keys]:
            raise ValueError(f"{dest} holds latents encoded with {held}; this run would encode with {record}: "
                             f"use another --dest or the same settings")
    elif existing:
        print(f"encode: {dest} already holds {existing} latents but no {ENCODING_RECORD}; make sure they were encoded "
              f"with {record} (VA-VAE latents were posterior means before --posterior existed)")
    else:
        os.makedirs(dest, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(record, indent=2).encode()))


def encode(source, dest, tokenizer: str, ckpt_path=None, gpus: int = 0, batch_size: int = 100, max_images=None,
           dtype: str = "float32", workers: int = 0, posterior=None, posterior_seed: int = 0) -> dict:
    """Encode the images of a folder or zip to raw latents <dest>/<rel_dir>/<stem>.npy (C, h, w).

    gpus=0 runs on the CPU in this process; gpus=N>=1 uses cuda:0..N-1, one process each, images split
    round-robin. Existing outputs are skipped. A source dataset.json is carried over with latent names.
    `posterior`: 'sample' (a sample of the posterior, its noise seeded by posterior_seed and the image's id),
    'mean', or None for the tokenizer's default (default_posterior). Returns counts and the names that could not be
    encoded.
    """
    default = default_posterior(tokenizer)
    posterior = posterior or default
    if default is None and posterior is not None:
        raise ValueError(f"--posterior {posterior}: the '{tokenizer}' tokenizer has no posterior")
    if tokenizer.startswith("vavae:"):  # fail before starting processes when the checkpoint is missing
        config = tokenizer[len("vavae:"):]
        resolve_checkpoint(ckpt_path or read_vavae_config(config).get("ckpt_path"), config)
    src = ImageSource(source)
    names = src.names[:max_images]
    outputs = output_names(names, ".npy")
    todo = [n for n in names if not os.path.isfile(os.path.join(dest, outputs[n]))]
    if gpus > 0 and torch.cuda.device_count() < gpus:
        raise RuntimeError(f"--gpus {gpus} but {torch.cuda.device_count()} CUDA devices are visible "
                           f"(use --gpus 0 to encode on the CPU)")
    where = f"{gpus} GPU(s)" if gpus > 0 else "the CPU"
    record = {"tokenizer": tokenizer, "posterior": posterior}
    if posterior == "sample":
        record["posterior_seed"] = posterior_seed
    check_encoding_record(dest, record, len(names) - len(todo))
    latent = {None: "", "mean": ", posterior mean", "sample": f", posterior sample (seed {posterior_seed})"}
    print(f"encode: {len(names)} images in {source}, {len(names) - len(todo)} already in {dest}, "
          f"encoding {len(todo)} with '{tokenizer}'{latent[posterior]} on {where}")
    if todo:
        run_shards(max(gpus, 1), "cuda" if gpus > 0 else "cpu", tokenizer, ckpt_path, src, str(dest), todo,
                   batch_size, np.dtype(dtype), workers,
                   posterior=None if posterior is None else (posterior, posterior_seed))
    missing = [n for n in todo if not os.path.isfile(os.path.join(dest, outputs[n]))]
    failed = set(missing)
    if missing:
        print(f"encode: {len(missing)} images could not be encoded (first 20: {', '.join(missing[:20])})",
              file=sys.stderr)
    labels = src.class_labels()
    if labels:
        os.makedirs(dest, exist_ok=True)
        write_class_labels(os.path.join(dest, "dataset.json"),
                           [[outputs[n], labels[n]] for n in names if n in labels and n not in failed])
    return {"encoded": len(todo) - len(missing), "skipped_existing": len(names) - len(todo), "failed": missing}


# ------------------------------------------------------------------------------------------------------ encode-text

def _safe_id(key: str) -> str:
    parts = key.split("/")
    if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"label id '{key}' is not a relative path and cannot name an embedding file")
    return key


def encode_text(data_dir, text_encoder: str, label_file=None, dest=None, batch_size: int = 256, device=None,
                caption_key: str = "en", text_len: int = DEFAULT_TEXT_LEN, clip_output: str = "penultimate") -> dict:
    """Cache caption embeddings (text_len, dim) float16 as <dest>/<id>.npy (dest defaults to data_dir/text-emb);
    clip_output: which hidden state of a CLIP text encoder (train.py --clip-output must match)."""
    label_file = label_file or os.path.join(data_dir, "labels.json")
    dest = dest or os.path.join(data_dir, "text-emb")
    captions = read_labels(label_file, caption_key)
    todo = [k for k in sorted(captions) if not os.path.isfile(os.path.join(dest, _safe_id(k) + ".npy"))]
    print(f"encode-text: {len(captions)} captions in {label_file}, {len(captions) - len(todo)} already in {dest}, "
          f"encoding {len(todo)}")
    if todo:
        from models.text_encoder import TextEncoder
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        encoder = TextEncoder.load(text_encoder, device=device, max_length=text_len, clip_output=clip_output)
        for start in tqdm(range(0, len(todo), batch_size), desc="encode-text"):
            keys = todo[start:start + batch_size]
            with torch.no_grad():
                embeddings = encoder([captions[k] for k in keys])
            embeddings = embeddings.float().cpu().numpy().astype(np.float16)
            for key, embedding in zip(keys, embeddings):
                save_npy(os.path.join(dest, key + ".npy"), embedding)
    return {"encoded": len(todo), "skipped_existing": len(captions) - len(todo)}


# ---------------------------------------------------------------------------------------------------------- command

def _resolution(text: str) -> int:
    width, _, height = text.lower().partition("x")
    if height and height != width:
        raise argparse.ArgumentTypeError(f"resolution must be square, got {text}")
    return int(width)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("convert", help="center-crop and resize an image folder or zip to square PNGs")
    p.add_argument("--source", required=True, help="input image folder or zip archive")
    p.add_argument("--dest", required=True, help="output folder (e.g. DATA/images)")
    p.add_argument("--resolution", required=True, type=_resolution, help="output size, e.g. 256 or 256x256")
    p.add_argument("--max-images", type=int, help="only the first N images (sorted by path)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes (0: none)")
    p.add_argument("--dir-labels", action="store_true",
                   help="write dataset.json class labels from top-level directory names (ImageNet layout)")
    p.add_argument("--compress-level", type=int, default=6, help="PNG zlib level (0 is largest, fastest to read)")
    p.add_argument("--overwrite", action="store_true", help="redo images that already exist in --dest")

    p = commands.add_parser("encode-vavae", help="encode images to raw latents with VA-VAE or another tokenizer")
    p.add_argument("--config", help="VA-VAE YAML (same as --tokenizer vavae:<config>)")
    p.add_argument("--tokenizer", help="'pixel', 'pixel:<patch>', 'vavae:<config.yaml>', or a diffusers "
                                       "AutoencoderKL hub id / local directory")
    p.add_argument("--ckpt-path", help="VA-VAE checkpoint overriding the config's ckpt_path")
    p.add_argument("--source", required=True, help="input image folder or zip archive (e.g. DATA/images)")
    p.add_argument("--dest", required=True, help="output folder (e.g. DATA/vae-in)")
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count(),
                   help="GPUs used in parallel, one process each (0: CPU, in this process; default: all visible)")
    p.add_argument("--batch-size", type=int, default=100, help="images per GPU per batch")
    p.add_argument("--max-images", type=int, help="only the first N images (sorted by path)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="dtype of the saved latents")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image-decoding DataLoader workers per process")
    p.add_argument("--posterior", choices=["sample", "mean"], default=None,
                   help="store a sample of the VAE posterior (default for VA-VAE, as the original did) or its mean "
                        "(default for other VAEs); the pixel tokenizer has none")
    p.add_argument("--posterior-seed", type=int, default=0,
                   help="seed of the posterior samples; each image's noise comes from it and the image's id")

    p = commands.add_parser("encode-text", help="cache caption embeddings of labels.json as DATA/text-emb/<id>.npy")
    p.add_argument("--data-dir", required=True, help="dataset root (holds labels.json)")
    p.add_argument("--text-encoder", required=True, help="text encoder hub id or local path (models.text_encoder)")
    p.add_argument("--label-file", help="captions JSON (default: DATA/labels.json)")
    p.add_argument("--dest", help="output folder (default: DATA/text-emb)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="torch device (default: cuda if available)")
    p.add_argument("--caption-key", default="en", help="caption field of labels.json entries")
    p.add_argument("--text-len", type=int, default=DEFAULT_TEXT_LEN, help="caption tokens (train.py --text-len must match)")
    p.add_argument("--clip-output", default="penultimate", choices=CLIP_OUTPUTS,
                   help="a CLIP encoder's penultimate or last hidden state (train.py --clip-output must match)")

    p = commands.add_parser("pack", help="write a dataset folder as a shard dataset (LitData chunks) for streaming")
    p.add_argument("--data-dir", required=True, help="dataset root (images/, vae-in/, labels.json or "
                                                     "vae-in/dataset.json)")
    p.add_argument("--dest", required=True, help="output folder of the shards")
    p.add_argument("--label-file", help="captions JSON (default: DATA/labels.json; without one: class labels)")
    p.add_argument("--text-emb-dir", help="cached caption embeddings (encode-text) to store in the shards")
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="leave the images out (training then needs --enc-type none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the item order in the shards")
    p.add_argument("--items-per-part", type=int, default=10000, help="items per part (the unit a rerun resumes)")
    p.add_argument("--chunk-bytes", default="64MB", help="size of the LitData chunk files")

    p = commands.add_parser("encode-wds", help="encode img2dataset webdataset tars into a shard dataset (run under "
                                               "accelerate launch for all GPUs)")
    p.add_argument("--source", required=True, help="folder of .tar files (NNN.jpg + NNN.txt / NNN.json per sample)")
    p.add_argument("--dest", required=True, help="output folder of the shards")
    p.add_argument("--tokenizer", required=True, help="'pixel:<patch>', 'vavae:<config.yaml>', or a diffusers "
                                                      "AutoencoderKL hub id / local directory")
    p.add_argument("--ckpt-path", help="VA-VAE checkpoint overriding the config's ckpt_path")
    p.add_argument("--resolution", required=True, type=_resolution, help="images are center-cropped to this size")
    p.add_argument("--batch-size", type=int, default=64, help="images per process per batch")
    p.add_argument("--no-images", dest="images", action="store_false",
                   help="leave the images out (training then needs --enc-type none)")
    p.add_argument("--posterior", choices=["sample", "mean"], default=None, help="as for encode-vavae")
    p.add_argument("--posterior-seed", type=int, default=0)
    p.add_argument("--text-encoder", help="also cache caption embeddings of this text encoder in the shards")
    p.add_argument("--text-len", type=int, default=DEFAULT_TEXT_LEN, help="caption tokens of the cached embeddings")
    p.add_argument("--clip-output", default="penultimate", choices=CLIP_OUTPUTS,
                   help="a CLIP encoder's penultimate or last hidden state (train.py --clip-output must match)")
    p.add_argument("--chunk-bytes", default="64MB", help="size of the LitData chunk files")

    p = commands.add_parser("check", help="load every file of a dataset and list each problem (exit code 1 if any)")
    p.add_argument("--data-dir", required=True, help="dataset root (images/, vae-in/, labels.json, text-emb/)")
    p.add_argument("--label-file", help="captions JSON (default: DATA/labels.json, else vae-in/dataset.json)")
    p.add_argument("--caption-key", default="en", help="caption field of labels.json entries")
    p.add_argument("--text-emb-dir", help="cached caption embeddings (default: DATA/text-emb, when it exists)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"{args.command}: error: {e}", file=sys.stderr)
        return 2


def report_check(data_dir, result) -> int:
    """Print the problems of check_dataset's `result`, one line each, sorted by file; 1 if any, else 0."""
    counts = ", ".join(f"{n} {kind}s" for kind, n in result["counts"].items())
    print(f"check: {data_dir}: {result['items']} ids ({counts})")
    for path, message in sorted(result["problems"], key=lambda p: str(p[0])):
        print(f"{path}: {message}")
    print(f"check: {len(result['problems']) or 'no'} problems found")
    return 1 if result["problems"] else 0


def run_command(args) -> int:
    """Run one subcommand; returns the exit code."""
    if args.command == "check":
        from omegadit.shards import is_shard_dataset
        if is_shard_dataset(args.data_dir):
            from preprocessing.check import check_shards
            return report_check(args.data_dir, check_shards(args.data_dir))
        return report_check(args.data_dir, check_dataset(args.data_dir, args.label_file, args.caption_key,
                                                           args.text_emb_dir))
    if args.command == "pack":
        from preprocessing.pack import pack
        meta = pack(args.data_dir, args.dest, args.label_file, args.text_emb_dir, args.images, args.seed,
                    args.items_per_part, args.chunk_bytes)
        print(f"pack: {meta['num_items']} items with {', '.join(meta['fields'])} in {args.dest}")
        return 0
    if args.command == "encode-wds":
        from preprocessing.encode_wds import encode_wds
        meta = encode_wds(args.source, args.dest, args.tokenizer, args.resolution, args.batch_size, args.images,
                          args.posterior, args.posterior_seed, args.ckpt_path, args.text_encoder, args.text_len,
                          args.chunk_bytes, args.clip_output)
        if meta is not None:
            print(f"encode-wds: {meta['num_items']} items with {', '.join(meta['fields'])} in {args.dest}")
        return 0
    if args.command == "convert":
        result = convert(args.source, args.dest, args.resolution, args.max_images, args.workers, args.dir_labels,
                         args.compress_level, args.overwrite)
        print(f"convert: {result['converted']} written, {result['skipped_existing']} already there, "
              f"{len(result['unreadable'])} unreadable")
    elif args.command == "encode-vavae":
        if bool(args.config) == bool(args.tokenizer):
            raise SystemExit("encode-vavae: give exactly one of --config (VA-VAE YAML) and --tokenizer")
        spec = args.tokenizer or f"vavae:{args.config}"
        result = encode(args.source, args.dest, spec, args.ckpt_path, args.gpus, args.batch_size, args.max_images,
                        args.dtype, args.workers, args.posterior, args.posterior_seed)
        print(f"encode: {result['encoded']} encoded, {result['skipped_existing']} already there, "
              f"{len(result['failed'])} failed")
    else:
        result = encode_text(args.data_dir, args.text_encoder, args.label_file, args.dest, args.batch_size,
                             args.device, args.caption_key, args.text_len, args.clip_output)
        print(f"encode-text: {result['encoded']} encoded, {result['skipped_existing']} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
