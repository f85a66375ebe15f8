"""`dataset_tools.py encode-wds`: img2dataset's webdataset output (tar files of NNN.jpg + NNN.txt and/or NNN.json)
-> a shard dataset (omegadit/shards.py), encoded with the autoencoder on every process that accelerate starts.

Each input tar becomes one part of the output, written by one process (process i takes the tars i, i+n, ... of the
sorted list); a rerun skips the tars whose part is finished and redoes the interrupted ones. The main process
merges the parts into index.json and omegadit.json once every process is done.
"""
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from json_label_dataset import to_rgb
from preprocessing.shard_writer import DEFAULT_CHUNK_BYTES, check_settings, finalize, part_done, write_part

SETTINGS_FILE = "encode-wds.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_tars(source) -> list:
    """The .tar files of the folder `source` (or `source` itself when it is a .tar), sorted by name."""
    source = Path(source)
    if source.is_file() and source.suffix == ".tar":
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--source is neither a folder of .tar files nor a .tar file: {source}")
    tars = sorted(p for p in source.iterdir() if p.suffix == ".tar" and not p.name.startswith("."))
    if not tars:
        raise FileNotFoundError(f"no .tar files in {source} (img2dataset --output_format webdataset writes them)")
    return tars


def tar_samples(path):
    """(key, {extension: bytes}) of each sample of a webdataset tar, in the order of the tar."""
    key, files = None, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            name = f"{folder}/{stem}" if folder else stem
            if name != key and files:
                yield key, files
                files = {}
            key = name
            files[dot + ext.lower()] = tar.extractfile(member).read()
    if files:
        yield key, files


def sample_caption(files: dict):
    """The caption of a sample: its .txt, else the 'caption' of its .json; None when it has neither."""
    if ".txt" in files:
        return files[".txt"].decode("utf-8").strip()
    if ".json" in files:
        caption = json.loads(files[".json"]).get("caption")
        return caption.strip() if isinstance(caption, str) else None
    return None


def prepare_image(data: bytes, resolution: int):
    """(uint8 (3, res, res) tensor, bytes to store): center-cropped and resized as `convert` does; the original
    bytes are kept when the image already has that size, else the crop is stored as JPEG (quality 95)."""
    from preprocessing.dataset_tools import center_crop_adm

    with PIL.Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_rgb(img)
    if rgb.size == (resolution, resolution):
        stored = data
    else:
        rgb = center_crop_adm(rgb, resolution)
        buffer = io.BytesIO()
        rgb.save(buffer, format="jpeg", quality=95)
        stored = buffer.getvalue()
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1), stored


class Encoder:
    """The autoencoder (and optionally the text encoder) of one process; `items(tar)` yields the shard items."""

    def __init__(self, tokenizer: str, resolution: int, device, batch_size: int, images: bool, posterior,
                 posterior_seed: int, ckpt_path=None, text_encoder=None, text_len=None, clip_output="penultimate"):
        from models.tokenizers import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer, device=device, ckpt_path=ckpt_path)
        self.resolution, self.device, self.batch_size, self.images = resolution, device, batch_size, images
        self.posterior, self.posterior_seed = posterior, posterior_seed
        self.text_encoder = None
        if text_encoder:
            from models.text_encoder import TextEncoder
            self.text_encoder = TextEncoder.load(text_encoder, device=device, max_length=text_len,
                                                 clip_output=clip_output)

    def items(self, tar):
        """The shard items of the tar `tar` (samples without a caption or a readable image are skipped, noted)."""
        batch = []
        for key, files in tar_samples(tar):
            image_key = next((s for s in IMAGE_SUFFIXES if s in files), None)
            caption = sample_caption(files)
            if image_key is None or caption is None:
                print(f"encode-wds: {tar}: sample {key} skipped (no image or no caption)", file=sys.stderr)
                continue
            try:
                pixels, stored = prepare_image(files[image_key], self.resolution)
            except Exception as e:  # one unreadable image is reported, not fatal
                print(f"encode-wds: {tar}: sample {key} skipped: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            batch.append((f"{Path(tar).stem}/{key}", pixels, stored, caption))
            if len(batch) == self.batch_size:
                yield from self.encode(batch)
                batch = []
        if batch:
            yield from self.encode(batch)

    @torch.no_grad()
    def encode(self, batch):
        ids = [b[0] for b in batch]
        images = torch.stack([b[1] for b in batch]).to(self.device)
        if self.posterior == "sample":
            latents = self.tokenizer.encode_sample(images, ids, self.posterior_seed)
        else:
            latents = self.tokenizer.encode(images)
        latents = latents.float().cpu().numpy().astype(np.float16)
        embeddings = None
        if self.text_encoder is not None:
            embeddings = self.text_encoder([b[3] for b in batch]).float().cpu().numpy().astype(np.float16)
        for n, (key, _, stored, caption) in enumerate(batch):
            if not np.isfinite(latents[n]).all():
                raise ValueError(f"sample {key}: the latent holds NaN or infinite values (as float16)")
            item = {"id": key, "latent": latents[n], "caption": caption}
            if self.images:
                item["image"] = stored
            if embeddings is not None:
                item["text_emb"] = embeddings[n]
            yield item


def encode_wds(source, out_dir, tokenizer: str, resolution: int, batch_size: int = 64, images: bool = True,
               posterior=None, posterior_seed: int = 0, ckpt_path=None, text_encoder=None, text_len: int = 77,
               chunk_bytes=DEFAULT_CHUNK_BYTES, clip_output: str = "penultimate"):
    """Encode the webdataset tars of `source` into the shard dataset `out_dir` on every accelerate process;
    returns the description (on the main process; None on the others). clip_output: which hidden state of a CLIP
    text encoder the cached caption embeddings hold (train.py --clip-output must match)."""
    from accelerate import PartialState

    from preprocessing.dataset_tools import default_posterior

    default = default_posterior(tokenizer)
    posterior = posterior or default
    if default is None and posterior is not None:
        raise ValueError(f"--posterior {posterior}: the '{tokenizer}' tokenizer has no posterior")
    state = PartialState(cpu=not torch.cuda.is_available())
    tars = list_tars(source)
    stems = [t.stem for t in tars]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{source}: two tars share a name")
    out_dir = Path(out_dir)
    settings = {"tokenizer": tokenizer, "resolution": resolution, "posterior": posterior,
                "posterior_seed": posterior_seed if posterior == "sample" else None, "images": images,
                "text_encoder": text_encoder, "text_len": text_len if text_encoder else None}
    if text_encoder and clip_output != "penultimate":  # the default is left out: folders written before keep matching
        settings["clip_output"] = clip_output
    if state.is_main_process:
        check_settings(out_dir / SETTINGS_FILE, settings)
    state.wait_for_everyone()
    check_settings(out_dir / SETTINGS_FILE, settings)
    mine = [t for t in tars[state.process_index::state.num_processes] if not part_done(out_dir, t.stem)]
    print(f"encode-wds: process {state.process_index} of {state.num_processes}: {len(mine)} of {len(tars)} tars to "
          f"encode on {state.device}")
    if mine:
        encoder = Encoder(tokenizer, resolution, state.device, batch_size, images, posterior, posterior_seed,
                          ckpt_path, text_encoder, text_len, clip_output)
        from tqdm import tqdm
        for tar in tqdm(mine, desc=f"encode-wds {state.device}", position=state.process_index):
            write_part(out_dir, tar.stem, encoder.items(tar), chunk_bytes)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    extra = {"condition": "caption", "image_size": resolution if images else None,
             "encoding": {"tokenizer": tokenizer, "posterior": posterior,
                          **({"posterior_seed": posterior_seed} if posterior == "sample" else {})}}
    if text_encoder:
        extra.update(text_encoder=text_encoder, text_len=text_len, clip_output=clip_output)
    return finalize(out_dir, extra)
