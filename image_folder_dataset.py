"""Class-labelled training data straight from a folder of images, with no conversion step.

Layouts (the ImageNet / torchvision ImageFolder one, and a flat folder):
    data_root/<class name>/**/<image>   label: the index of the class folder among the sorted class folder names
    data_root/<image>                   no class folders: one unlabelled set (unconditional training)
Hidden files and folders (e.g. the cache below) are skipped, and so are files that are no images. train.py uses
this dataset when --data-dir holds images at its top level or in its subfolders and has neither vae-in/ nor
images/ (the pre-encoded layouts of dataset.py and json_label_dataset.py).

Every image must have one square size: the headers of all files are read when the dataset is built, and the
first file of another size is named in the error, before any training work.

Latents come from the tokenizer (models/tokenizers.py):
- 'pixel:<p>' (DDPM: 'pixel:1', the RGB image in [-1, 1]) is computed from each image as it is read; nothing is
  cached, and the latents are NOT normalised: their statistics are recorded as mean 0 and std 1, so the
  network sees the data in [-1, 1] as DDPM's noise schedule assumes (the pre-encoded datasets would instead
  scale every channel to unit variance, which changes the effective signal-to-noise ratio of each timestep);
- an autoencoder (a diffusers AutoencoderKL folder or hub id, 'vavae:<config>') encodes every image once, on the
  main process, into data_root/.omegadit-cache/<tokenizer>-<hash>/ (latents.npy, float32 posterior means, and
  index.json with the per-channel mean and std); the cache is reused as long as the image files (names, sizes,
  modification times) and the tokenizer spec (and, for a local autoencoder folder, its files) are unchanged.
  These latents are normalised per channel by their mean and std over the dataset, like the pre-encoded ones
  (LDM scales by one constant instead; per channel is this repository's convention).
A data root that cannot be written caches under ~/.cache/omegadit/image-folders/ instead.
"""
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, Dataset

from json_label_dataset import IMAGE_EXTENSIONS, list_files, read_image

CACHE_DIR = ".omegadit-cache"
CONVERT_HINT = ("center-crop and resize them first, e.g. `python preprocessing/dataset_tools.py convert --source "
                "DATA_ROOT --dest NEW_ROOT --resolution N` (class folders are kept)")


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_image_folder(data_dir) -> bool:
    """True when `data_dir` has neither vae-in/ nor images/ and holds images at its top level or in a subfolder."""
    root = Path(data_dir)
    if not root.is_dir() or (root / "vae-in").exists() or (root / "images").exists():
        return False
    with os.scandir(root) as entries:
        subfolders = []
        for entry in entries:
            if entry.is_file() and _is_image(entry.name):
                return True
            if entry.is_dir() and not entry.name.startswith("."):
                subfolders.append(entry.path)
    for folder in sorted(subfolders):
        for _, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if any(_is_image(f) for f in files):
                return True
    return False


def scan_image_folder(root):
    """(class names, sorted relative image paths, their labels) of an image folder (see the module docstring)."""
    root = Path(root)
    with os.scandir(root) as entries:
        entries = sorted((e.name, e.is_dir()) for e in entries if not e.name.startswith("."))
    classes = [name for name, is_dir in entries if is_dir]
    top = [name for name, is_dir in entries if not is_dir and _is_image(name)]
    if not classes:
        if not top:
            raise FileNotFoundError(f"{root}: no images found")
        return [], top, [0] * len(top)
    if top:
        raise ValueError(f"{root} has class folders ({', '.join(classes[:3])}, ...) and images beside them "
                         f"({root / top[0]}): move every image into its class folder")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = list_files(root / name, IMAGE_EXTENSIONS)
        if not found:
            raise ValueError(f"class folder {root / name} has no images (class {label} of {len(classes)}); remove "
                             f"it or add images, as labels follow the sorted folder names")
        files += [f"{name}/{rel}" for rel in found]
        labels += [label] * len(found)
    return classes, files, labels


def check_image_sizes(root, files) -> int:
    """The one square size of every image (read from the file headers); else a ValueError naming the first file
    that differs or cannot be read."""
    expected, first = None, None
    for rel in files:
        path = Path(root) / rel
        try:
            with PIL.Image.open(path) as img:
                size = img.size
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
        if expected is None:
            expected, first = size, path
            if size[0] != size[1]:
                raise ValueError(f"{path} is {size[0]}x{size[1]}, not square: every image of an image-folder "
                                 f"dataset must be square and of one size; {CONVERT_HINT}")
        elif size != expected:
            raise ValueError(f"{path} is {size[0]}x{size[1]} but {first} is {expected[0]}x{expected[1]}: every "
                             f"image of an image-folder dataset must have one size; {CONVERT_HINT}")
    return expected[0]


def _fingerprint(root, files, spec) -> str:
    """A hash of the image files (names, sizes, modification times) and the tokenizer (for a local autoencoder
    folder, its files too)."""
    digest = hashlib.sha256(json.dumps(spec).encode())
    tokenizer_dir = Path(spec).expanduser()
    if tokenizer_dir.is_dir():
        for path in sorted(p for p in tokenizer_dir.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(tokenizer_dir)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    for rel in files:
        stat = (Path(root) / rel).stat()
        digest.update(f"{rel}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _cache_root(root) -> Path:
    """data_root/.omegadit-cache, or a folder under ~/.cache when the data root cannot be written."""
    local = Path(root) / CACHE_DIR
    try:
        local.mkdir(exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "omegadit" / "image-folders" / key


class _Images(Dataset):
    def __init__(self, root, files):
        self.root, self.files = root, files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return read_image(Path(self.root) / self.files[index])


def encode_to_cache(root, files, spec, directory: Path, device, batch_size=64, workers=0, progress=True):
    """Encode every image with the tokenizer `spec` into directory/latents.npy (float32) and write
    directory/index.json with the per-channel mean and std; atomic (a temporary folder, then renamed)."""
    from tqdm.auto import tqdm

    from models.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(spec, device=device)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    loader = DataLoader(_Images(root, files), batch_size=batch_size, num_workers=workers)
    latents, total, total_sq, start = None, 0.0, 0.0, 0
    for images in tqdm(loader, desc=f"encoding {root} with {spec}", unit="batch", disable=not progress):
        z = tokenizer.encode(images).float().cpu()
        if latents is None:
            latents = np.lib.format.open_memmap(tmp / "latents.npy", mode="w+", dtype=np.float32,
                                                shape=(len(files), *z.shape[1:]))
        latents[start:start + len(z)] = z.numpy()
        start += len(z)
        z64 = z.double()
        total = total + z64.sum(dim=(0, 2, 3))
        total_sq = total_sq + (z64 ** 2).sum(dim=(0, 2, 3))
    latents.flush()
    count = len(files) * latents.shape[2] * latents.shape[3]
    mean = total / count
    std = ((total_sq / count - mean ** 2).clamp(min=0) * count / max(count - 1, 1)).sqrt().clamp(min=1e-6)
    del latents
    index = {"tokenizer": spec, "files": files, "mean": mean.tolist(), "std": std.tolist()}
    (tmp / "index.json").write_text(json.dumps(index))
    try:
        tmp.rename(directory)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


class ImageFolderDataset(Dataset):
    """(image uint8 (3, H, W), normalised latent float32 (C, h, w), label int) of an image folder (see the module
    docstring). `classes`: the class folder names (empty for a flat folder); `latent_mean`, `latent_std`:
    (C, 1, 1) statistics that train.py records in checkpoints."""

    def __init__(self, data_dir, tokenizer: str = "pixel:1", device=None, batch_size: int = 64, workers: int = 0):
        from models.tokenizers import is_pixel_spec, load_tokenizer

        self.data_dir = str(data_dir)
        self.tokenizer_spec = tokenizer
        self.classes, self.files, self.labels = scan_image_folder(data_dir)
        self.resolution = check_image_sizes(data_dir, self.files)
        self.latents_file = None
        self._latents = None
        if is_pixel_spec(tokenizer):
            self.pixel = load_tokenizer(tokenizer)
            if self.resolution % self.pixel.patch_size:
                raise ValueError(f"the images of {data_dir} are {self.resolution}px, not divisible by the "
                                 f"{tokenizer} patch size {self.pixel.patch_size}")
            channels = self.pixel.latent_channels
            self.latent_mean, self.latent_std = torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1)
            return
        self.pixel = None
        self._load_cache(batch_size, workers, device)

    def _load_cache(self, batch_size, workers, device):
        from accelerate import PartialState

        state = PartialState()
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.tokenizer_spec).strip("_")[-48:]
        fingerprint = _fingerprint(self.data_dir, self.files, self.tokenizer_spec)
        directory = _cache_root(self.data_dir) / f"{name}-{fingerprint}"
        with state.main_process_first():
            if not (directory / "index.json").is_file():
                if not state.is_main_process:
                    raise RuntimeError(f"the main process did not write the latent cache {directory}")
                directory.parent.mkdir(parents=True, exist_ok=True)
                encode_to_cache(self.data_dir, self.files, self.tokenizer_spec, directory, device or state.device,
                                batch_size, workers)
        index = json.loads((directory / "index.json").read_text())
        if index["files"] != self.files:
            raise ValueError(f"the latent cache {directory} lists other files than {self.data_dir}: delete it")
        self.latents_file = directory / "latents.npy"
        shape = self._open().shape
        if shape[0] != len(self.files):
            raise ValueError(f"{self.latents_file} holds {shape[0]} latents for {len(self.files)} images: delete "
                             f"{directory}")
        self.latent_mean = torch.tensor(index["mean"], dtype=torch.float32).view(-1, 1, 1)
        self.latent_std = torch.tensor(index["std"], dtype=torch.float32).view(-1, 1, 1)

    def _open(self):
        if self._latents is None:
            self._latents = np.load(self.latents_file, mmap_mode="r")
        return self._latents

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_latents"] = None  # each DataLoader worker maps the file itself
        return state

    @property
    def num_classes(self) -> int:
        """The number of class folders (0 for a flat folder: unconditional)."""
        return len(self.classes)

    def num_classes_for(self, requested: int, explicit: bool) -> int:
        """The class count to train with: the folder's unless given explicitly (0 = unconditional); a count below
        the number of class folders is an error."""
        if not explicit:
            return self.num_classes
        if 0 < requested < self.num_classes:
            raise ValueError(f"{self.data_dir} has {self.num_classes} class folders ({', '.join(self.classes[:5])}"
                             f"{', ...' if self.num_classes > 5 else ''}) but --num-classes is {requested}: labels "
                             f"{requested} to {self.num_classes - 1} would be out of range (pass --num-classes "
                             f"{self.num_classes}, or 0 to train unconditionally)")
        return requested

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = read_image(Path(self.data_dir) / self.files[index])
        if self.pixel is not None:
            latent = self.pixel.encode(image[None])[0]
        else:
            latent = torch.from_numpy(np.array(self._open()[index]))
        latent = (latent.float() - self.latent_mean) / self.latent_std
        return image, latent, self.labels[index]
