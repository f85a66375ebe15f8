"""Masks for ControlNet training: a masks/ folder paired by name with a dataset's images.

    data_dir/images/<rel_dir>/Img_001.png   (any dataset of dataset.py, json_label_dataset.py, image_folder_dataset.py)
    data_dir/masks/<rel_dir>/seg_001.png    (or --mask-dir; an image-folder dataset needs --mask-dir)

An image and a mask pair when their paths relative to their folders agree once the extension and, on each side, the
optional file-name prefix (`image_prefix`, `mask_prefix`) are removed: with prefixes 'Img_' and 'seg_',
images/a/Img_001.png pairs with masks/a/seg_001.png. Masks have 1 channel (grayscale; colour files are converted)
or 3 (RGB, e.g. colour-coded labels), and each has the size of its image. Building a `MaskedDataset` checks all of
this from the file headers and stops with a report naming the files: the images without a mask, the masks without
an image, masks of another size.
"""
import os

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from json_label_dataset import IMAGE_EXTENSIONS, MAX_LISTED, DatasetMismatchError, list_files, to_rgb
from omegadit.data_checks import DataFileError

MASK_CHANNELS = (1, 3)


def pairing_key(rel_path: str, prefix: str = "") -> str:
    """The key that pairs an image with its mask: the relative path without extension, `prefix` cut from the
    file name ('a/Img_001.png' with prefix 'Img_' -> 'a/001')."""
    head, _, name = os.path.splitext(rel_path.replace("\\", "/"))[0].rpartition("/")
    if prefix and name.startswith(prefix):
        name = name[len(prefix):]
    return f"{head}/{name}" if head else name


def _listing(items) -> str:
    return f"(first {min(MAX_LISTED, len(items))}: {', '.join(items[:MAX_LISTED])})"


def pair_masks(image_files, mask_dir, image_prefix: str = "", mask_prefix: str = "") -> list:
    """The mask file (relative to `mask_dir`) of each image file of `image_files` (relative paths), in order;
    DatasetMismatchError reporting the images without a mask and the masks without an image."""
    mask_dir = str(mask_dir)
    if not os.path.isdir(mask_dir):
        raise FileNotFoundError(f"mask folder not found: {mask_dir} (pass --mask-dir)")
    masks, clashes = {}, []
    for rel in list_files(mask_dir, IMAGE_EXTENSIONS):
        key = pairing_key(rel, mask_prefix)
        if key in masks:
            clashes.append(f"{masks[key]} / {rel}")
        masks[key] = rel
    if clashes:
        raise DatasetMismatchError(f"{mask_dir}: {len(clashes)} masks share a name {_listing(clashes)}")
    keys = [pairing_key(rel, image_prefix) for rel in image_files]
    problems = []
    lacking = [f"{rel} (no {mask_prefix}{key.rpartition('/')[2]}.*)" for rel, key in zip(image_files, keys)
               if key not in masks]
    if lacking:
        problems.append(f"  {len(lacking)} of {len(image_files)} images have no mask in {mask_dir} {_listing(lacking)}")
    extra = sorted(masks[key] for key in set(masks).difference(keys))
    if extra:
        problems.append(f"  {len(extra)} of {len(masks)} masks have no image {_listing(extra)}")
    if problems:
        prefixes = f" (image prefix {image_prefix!r}, mask prefix {mask_prefix!r})" if image_prefix or mask_prefix else ""
        raise DatasetMismatchError(f"images and masks do not pair by name{prefixes}:\n" + "\n".join(problems)
                                   + "\n  (--image-prefix / --mask-prefix map names such as Img_001.png <-> "
                                     "seg_001.png)")
    return [masks[key] for key in keys]


def image_size(path):
    with PIL.Image.open(path) as image:
        return image.size


def check_mask_sizes(image_paths, mask_paths):
    """DataFileError naming every mask whose size differs from its image's (headers only)."""
    problems = []
    for image_path, mask_path in zip(image_paths, mask_paths):
        wanted, got = image_size(image_path), image_size(mask_path)
        if wanted != got:
            problems.append(f"  {mask_path} is {got[0]}x{got[1]}, its image {image_path} is {wanted[0]}x{wanted[1]}")
    if problems:
        raise DataFileError(f"{len(problems)} masks do not have the size of their image (first "
                            f"{min(MAX_LISTED, len(problems))}):\n" + "\n".join(problems[:MAX_LISTED]))


def read_mask(path, channels: int = 1) -> torch.Tensor:
    """uint8 (channels, H, W) of a mask file: grayscale for 1 channel, RGB for 3."""
    if channels not in MASK_CHANNELS:
        raise ValueError(f"masks have 1 or 3 channels, got {channels}")
    with PIL.Image.open(path) as image:
        array = np.array(image.convert("L") if channels == 1 else to_rgb(image))
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()


def image_files_of(dataset):
    """(image root, image files relative to it, in item order) of a dataset of this repository."""
    if hasattr(dataset, "image_fnames"):  # json_label_dataset.PairedLatentDataset: images/ beside vae-in/
        return dataset.images_dir, list(dataset.image_fnames)
    if hasattr(dataset, "files"):  # image_folder_dataset.ImageFolderDataset
        return dataset.data_dir, list(dataset.files)
    raise TypeError(f"{type(dataset).__name__} does not list its image files: masks cannot be paired with it")


class MaskedDataset(Dataset):
    """Items of `dataset` with the mask of their image appended: (image, latent, condition, mask uint8 (C, H, W)).
    Other attributes (latent statistics, captions, ...) are the wrapped dataset's."""

    def __init__(self, dataset, mask_dir, image_prefix: str = "", mask_prefix: str = "", channels: int = 1):
        if channels not in MASK_CHANNELS:
            raise ValueError(f"--mask-channels must be 1 or 3, got {channels}")
        self.dataset = dataset
        self.mask_dir = str(mask_dir)
        self.channels = channels
        root, files = image_files_of(dataset)
        self.mask_files = [os.path.join(self.mask_dir, rel) for rel in pair_masks(files, mask_dir, image_prefix,
                                                                                  mask_prefix)]
        check_mask_sizes([os.path.join(root, rel) for rel in files], self.mask_files)

    def __getattr__(self, name):
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return (*self.dataset[index], read_mask(self.mask_files[index], self.channels))
