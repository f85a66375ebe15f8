"""Text-caption dataset: images, VAE latents and captions paired by id.

Layout:
    data_dir/images/<rel_dir>/<name>.png           uint8 images (for the REPA encoder)
    data_dir/vae-in/<rel_dir>/<name>.npy           raw latents (C, h, w) ('img-latents-<name>.npy' also accepted)
    data_dir/vae-in/latents_stats.pt               per-channel {'mean', 'std'} (C, 1, 1), computed once
    data_dir/labels.json                           [{"id": "<rel_dir>/<name>", "en": "caption"}, ...]
    data_dir/text-emb/<rel_dir>/<name>.npy         optional cached caption embeddings (77, dim)

Ids are relative paths without extension; a file name prefix 'img-latents-' is dropped, and so is 'img'
before an all-digit name (edm2-style 'img00000014'), the same way for every file and labels.json id.
The shared machinery (scanning, pairing, file checks, latent statistics) also serves dataset.CustomDataset.
Building a dataset reads the header of every latent and (where images are used) image, not the data, and stops
with a DataFileError listing each file that cannot work; `python preprocessing/dataset_tools.py check` loads every file.
"""
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset, default_collate

from omegadit.data_checks import DataFileError, format_problems, image_header_problems, npy_header_problems
from omegadit.files import load_npy, load_torch, read_json

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pnm", ".tga", ".qoi"})
LATENT_PREFIX = "img-latents-"
STATS_FILENAME = "latents_stats.pt"
MAX_LISTED = 5
CHECK_COMMAND = "python preprocessing/dataset_tools.py check --data-dir"


class DatasetMismatchError(ValueError):
    """Images, latents and conditions of a dataset do not cover the same ids."""


class DataItemError(RuntimeError):
    """An item of a dataset could not be read; the message names its files."""


def normalize_id(name: str) -> str:
    """Canonical id of an extension-less relative path ('a/img-latents-x' -> 'a/x', 'a/img0001' -> 'a/0001')."""
    head, _, base = name.replace("\\", "/").rpartition("/")
    if base.startswith(LATENT_PREFIX):
        base = base[len(LATENT_PREFIX):]
    elif re.fullmatch(r"img\d+", base):
        base = base[3:]
    return f"{head}/{base}" if head else base


def file_id(rel_path: str) -> str:
    """Canonical id of a file path relative to images/, vae-in/ or text-emb/."""
    return normalize_id(os.path.splitext(rel_path.replace("\\", "/"))[0])


def _walk(root: str, prefix: str = ""):
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            if entry.is_dir():
                yield from _walk(entry.path, rel + "/")
            elif entry.is_file():
                yield rel


def list_files(root, extensions) -> list:
    """Sorted relative paths (with '/') of the files under `root` with one of `extensions` (hidden ones skipped)."""
    root = str(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"directory not found: {root}")
    return sorted(rel for rel in _walk(root) if os.path.splitext(rel)[1].lower() in extensions)


def scan_ids(root, extensions) -> dict:
    """{id: relative path} of the files under `root`; two files with one id raise ValueError."""
    found, clashes = {}, []
    for rel in list_files(root, extensions):
        key = file_id(rel)
        if key in found:
            clashes.append(f"{found[key]} / {rel}")
        found[key] = rel
    if clashes:
        raise ValueError(f"{len(clashes)} ids in {root} belong to several files (first {MAX_LISTED}: "
                         f"{'; '.join(clashes[:MAX_LISTED])})")
    return found


def read_labels(label_file, caption_key: str = "en") -> dict:
    """{id: caption} of a labels.json array [{"id": ..., "en": ...}]; duplicate ids raise ValueError."""
    label_file = Path(label_file)
    if not label_file.is_file():
        raise FileNotFoundError(f"label file not found: {label_file}")
    entries = read_json(label_file)
    if not isinstance(entries, list):
        raise ValueError(f"{label_file}: expected a JSON array of {{\"id\": ..., \"{caption_key}\": ...}}")
    captions, duplicates = {}, []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get(caption_key), str):
            raise ValueError(f"{label_file}: entry {index} is not {{\"id\": ..., \"{caption_key}\": \"<caption>\"}}: "
                             f"{str(entry)[:200]}")
        key = normalize_id(str(entry["id"]))
        if not _is_utf8(entry[caption_key]):
            raise ValueError(f"{label_file}: entry {index} (id '{key}') has a caption that is not valid UTF-8 "
                             f"(an unpaired surrogate escape)")
        if key in captions:
            duplicates.append(key)
        captions[key] = entry[caption_key]
    if duplicates:
        raise ValueError(f"{label_file}: {len(duplicates)} duplicate ids (first {MAX_LISTED}: "
                         f"{', '.join(duplicates[:MAX_LISTED])})")
    return captions


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_pairing(sources: dict, dataset_name: str) -> list:
    """Sorted ids present in every source; else DatasetMismatchError listing, per source, what lacks it.

    `sources` maps a kind ('image', 'latent', ...) to ({id: value}, where it comes from).
    """
    all_ids = set().union(*(mapping.keys() for mapping, _ in sources.values()))
    problems = []
    for kind, (mapping, where) in sources.items():
        missing = sorted(all_ids.difference(mapping))
        if missing:
            problems.append(f"  {len(missing)} of {len(all_ids)} ids have no {kind} in {where} "
                            f"(first {min(MAX_LISTED, len(missing))}: {', '.join(missing[:MAX_LISTED])})")
    if problems:
        raise DatasetMismatchError(f"{dataset_name}: images, latents and conditions do not match by id:\n"
                                   + "\n".join(problems))
    if not all_ids:
        raise DatasetMismatchError(f"{dataset_name}: no data found ({', '.join(w for _, w in sources.values())})")
    return sorted(all_ids)


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB version of a PIL image (grayscale, RGBA, palette, CMYK, ...); RGB images are returned as they are."""
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA", "LA", "La"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_image(path) -> torch.Tensor:
    """uint8 (3, H, W) RGB tensor of an image file (grayscale, RGBA and palette images converted)."""
    with PIL.Image.open(path) as img:
        array = np.array(to_rgb(img))
    return torch.from_numpy(array).permute(2, 0, 1)


def read_latent(path) -> np.ndarray:
    """Latent array (C, h, w) of a .npy file (a leading batch dim of 1, as the reference saves, is dropped)."""
    array = load_npy(path)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a latent of shape (C, h, w), got {array.shape}")
    return array


def compute_latent_stats(paths, max_samples: int = 10000, seed: int = 0) -> dict:
    """Per-channel mean and (unbiased) std over batch and space of up to `max_samples` latent files,
    chosen with a seeded generator. Returns {'mean': (C, 1, 1), 'std': (C, 1, 1)} float32; a constant
    channel gets std 1e-6 rather than 0. Latents holding NaN or infinite values raise ValueError naming them."""
    paths = list(paths)
    if not paths:
        raise ValueError("no latent files to compute statistics from")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(paths), size=min(max_samples, len(paths)), replace=False))
    count, mean, m2, non_finite = 0, None, None, []
    for index in chosen:
        z = read_latent(paths[index]).astype(np.float64)
        if not np.isfinite(z).all():
            non_finite.append(str(paths[index]))
            continue
        z = z.reshape(z.shape[0], -1)
        n = z.shape[1]
        z_mean = z.mean(axis=1)
        z_m2 = ((z - z_mean[:, None]) ** 2).sum(axis=1)
        if mean is None:
            count, mean, m2 = n, z_mean, z_m2
            continue
        if len(z_mean) != len(mean):
            raise ValueError(f"{paths[index]}: {len(z_mean)} channels, other latents have {len(mean)}")
        delta = z_mean - mean
        total = count + n
        mean = mean + delta * n / total
        m2 = m2 + z_m2 + delta ** 2 * count * n / total
        count = total
    if non_finite:
        raise ValueError(f"cannot compute latent statistics: {len(non_finite)} of the {len(chosen)} sampled latent "
                         f"files hold NaN or infinite values (first {min(MAX_LISTED, len(non_finite))}: "
                         f"{', '.join(non_finite[:MAX_LISTED])}); re-encode or remove them ({CHECK_COMMAND} DATA "
                         f"lists every broken file)")
    std = np.maximum(np.sqrt(m2 / max(count - 1, 1)), 1e-6)
    return {"mean": torch.from_numpy(mean.astype(np.float32)).reshape(-1, 1, 1),
            "std": torch.from_numpy(std.astype(np.float32)).reshape(-1, 1, 1)}


def _usable_stats(mean, std) -> bool:
    return bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all())


def load_latent_stats(path):
    """(mean, std) float32 tensors of shape (C, 1, 1) from a latents_stats.pt file; a file holding NaN,
    infinite or non-positive std values raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent statistics not found: {path} (loading the dataset once creates it)")
    stats = load_torch(path)
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), torch.Tensor) for k in ("mean", "std")):
        raise ValueError(f"{path}: expected a dict with 'mean' and 'std' tensors")
    mean, std = (stats[k].detach().float().reshape(-1, 1, 1) for k in ("mean", "std"))
    if not _usable_stats(mean, std):
        raise ValueError(f"{path} holds unusable latent statistics (NaN or infinite values, or a std <= 0), "
                         f"likely computed from broken latents. Delete the file and fix the data "
                         f"({CHECK_COMMAND} DATA lists broken files); loading the dataset then recomputes it.")
    return mean, std


def save_latent_stats(stats: dict, path) -> None:
    """Write {'mean', 'std'} atomically (several ranks may race to create it); non-finite values raise."""
    path = Path(path)
    if not _usable_stats(stats["mean"], stats["std"]):
        raise ValueError(f"refusing to write NaN, infinite or non-positive latent statistics to {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"mean": stats["mean"], "std": stats["std"]}, tmp)
    os.replace(tmp, path)


def cached_latent_stats(stats_file, latent_paths, max_samples: int = 10000, seed: int = 0):
    """(mean, std) from `stats_file`, computing and caching them from `latent_paths` the first time."""
    stats_file = Path(stats_file)
    if not stats_file.is_file():
        save_latent_stats(compute_latent_stats(latent_paths, max_samples, seed), stats_file)
    mean, std = load_latent_stats(stats_file)
    channels = read_latent(latent_paths[0]).shape[0]
    if mean.shape[0] != channels:
        raise ValueError(f"{stats_file} has statistics for {mean.shape[0]} channels but the latents have {channels}; "
                         f"delete the stale file to recompute it")
    return mean, std


def collate(batch):
    """Batch of items: (images (N, 3, H, W) uint8, latents (N, C, h, w), captions as a list of str,
    or stacked labels / text embeddings), and the stacked masks of items that carry one (control_data.py).
    default_collate works too but gives captions as a tuple."""
    images, latents, conditions, *masks = zip(*batch)
    conditions = list(conditions) if isinstance(conditions[0], str) else default_collate(list(conditions))
    stacked = [default_collate(list(images)), default_collate(list(latents)), conditions]  # shared memory in workers
    return tuple(stacked + [default_collate(list(m)) for m in masks])


class TransformConditions:
    """DataLoader collate: `collate`'s batch with its conditions (item 2) passed through `transform`, unless they
    are already a tensor (labels, cached caption embeddings). Picklable, for the loader's workers."""

    def __init__(self, collate_fn, transform):
        self.collate_fn = collate_fn
        self.transform = transform

    def __call__(self, batch):
        images, latents, conditions, *masks = self.collate_fn(batch)
        if not isinstance(conditions, torch.Tensor):
            conditions = self.transform(conditions)
        return (images, latents, conditions, *masks)


class PairedLatentDataset(Dataset):
    """Images of data_dir/images and latents of data_dir/vae-in paired by id with per-id conditions.

    Subclasses call `_setup(conditions, kind, where)`; items are (image uint8 (3, H, W),
    normalised latent float32 (C, h, w), condition). With `need_images` False (nothing uses them: no REPA
    encoder) the image is not decoded, which is most of an item's cost, and an empty (3, 0, 0) tensor stands in
    (as in shard datasets); the images' headers are then not checked either (the first gives `resolution`).
    An item that cannot be read raises DataItemError naming its files.
    """

    def __init__(self, data_dir, stats_samples: int = 10000, stats_seed: int = 0, need_images: bool = True):
        PIL.Image.init()
        self.need_images = need_images
        self.data_dir = str(data_dir)
        self.images_dir = os.path.join(self.data_dir, "images")
        self.features_dir = os.path.join(self.data_dir, "vae-in")
        self.stats_file = os.path.join(self.features_dir, STATS_FILENAME)
        self.stats_samples, self.stats_seed = stats_samples, stats_seed

    def _setup(self, conditions: dict, kind: str, where: str, extra_sources=None):
        images = scan_ids(self.images_dir, IMAGE_EXTENSIONS)
        latents = scan_ids(self.features_dir, {".npy"})
        sources = {"image": (images, self.images_dir), "latent": (latents, self.features_dir),
                   kind: (conditions, where), **(extra_sources or {})}
        self.ids = check_pairing(sources, f"{type(self).__name__}({self.data_dir})")
        self.image_fnames = [images[i] for i in self.ids]
        self.feature_fnames = [latents[i] for i in self.ids]
        image_paths = [os.path.join(self.images_dir, f) for f in self.image_fnames]
        latent_paths = [os.path.join(self.features_dir, f) for f in self.feature_fnames]
        problems = ((image_header_problems(image_paths)[0] if self.need_images else [])
                    + npy_header_problems(latent_paths, 3, "latents", True)[0])
        self._raise_problems(problems)
        self.latent_mean, self.latent_std = cached_latent_stats(
            self.stats_file, latent_paths, self.stats_samples, self.stats_seed)

    def _raise_problems(self, problems) -> None:
        """DataFileError listing `problems` ((path, message) pairs), if there are any."""
        if problems:
            raise DataFileError(f"{type(self).__name__}({self.data_dir}): {len(problems)} problem(s) with data files "
                                f"(fix or remove them; {CHECK_COMMAND} {self.data_dir} loads every file):\n"
                                + format_problems(problems))

    def __len__(self):
        return len(self.ids)

    @property
    def resolution(self) -> int:
        """Width in pixels of the first item's image, from its header (items may carry no image)."""
        with PIL.Image.open(os.path.join(self.images_dir, self.image_fnames[0])) as image:
            return image.size[0]

    def condition(self, index: int):
        raise NotImplementedError

    def item_files(self, index: int) -> list:
        """Paths of the files that item `index` reads."""
        return [os.path.join(self.images_dir, self.image_fnames[index]),
                os.path.join(self.features_dir, self.feature_fnames[index])]

    def _read_item(self, index: int):
        image_path, latent_path = self.item_files(index)[:2]
        image = read_image(image_path) if self.need_images else torch.zeros(3, 0, 0, dtype=torch.uint8)
        latent = torch.from_numpy(read_latent(latent_path)).float()
        if not torch.isfinite(latent).all():
            raise ValueError(f"{latent_path} holds NaN or infinite values")
        return image, (latent - self.latent_mean) / self.latent_std, self.condition(index)

    def __getitem__(self, index: int):
        key = self.ids[index]  # an IndexError past the end, as iteration expects
        try:
            return self._read_item(index)
        except Exception as e:
            raise DataItemError(f"item {index} (id '{key}') could not be read from "
                                f"{', '.join(self.item_files(index))}: {type(e).__name__}: {e}") from e


class JsonLabelDataset(PairedLatentDataset):
    """(image uint8 (3, H, W), normalised latent (C, h, w), caption str) by id from labels.json.

    label_file: captions JSON (default data_dir/labels.json). text_emb_dir: if given, items carry the
    cached embedding tensor (77, dim) float32 from <text_emb_dir>/<id>.npy instead of the caption.
    Missing images, latents, captions or embeddings raise DatasetMismatchError before any training.
    """

    def __init__(self, data_dir, label_file=None, text_emb_dir=None, caption_key: str = "en",
                 stats_samples: int = 10000, stats_seed: int = 0, need_images: bool = True):
        super().__init__(data_dir, stats_samples, stats_seed, need_images)
        self.label_file = str(label_file or os.path.join(self.data_dir, "labels.json"))
        self.text_emb_dir = None if text_emb_dir is None else str(text_emb_dir)
        captions = read_labels(self.label_file, caption_key)
        extra = {}
        if self.text_emb_dir is not None:
            self._embeddings = scan_ids(self.text_emb_dir, {".npy"})
            extra["text embedding"] = (self._embeddings, self.text_emb_dir)
        self._setup(captions, "caption", self.label_file, extra)
        self.captions = [captions[i] for i in self.ids]
        if self.text_emb_dir is not None:
            self.text_emb_fnames = [self._embeddings[i] for i in self.ids]
            del self._embeddings
            paths = [os.path.join(self.text_emb_dir, f) for f in self.text_emb_fnames]
            self._raise_problems(npy_header_problems(paths, 2, "text embeddings")[0])

    def item_files(self, index: int) -> list:
        files = super().item_files(index)
        if self.text_emb_dir is not None:
            files.append(os.path.join(self.text_emb_dir, self.text_emb_fnames[index]))
        return files

    def condition(self, index: int):
        if self.text_emb_dir is None:
            return self.captions[index]
        return torch.from_numpy(load_npy(os.path.join(self.text_emb_dir, self.text_emb_fnames[index]))).float()
