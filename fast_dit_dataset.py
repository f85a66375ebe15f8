"""Pre-extracted SD-VAE latents in fast-DiT's layout (chuanyangjin/fast-DiT, extract_features.py), read directly.

Layout (fast-DiT names the folders imagenet256_* whatever its --image-size; other names work alike):
    FEATURES_PATH/imagenet256_features/<i>.npy   (1, 4, h, w) float: vae.encode(x).latent_dist.sample() * 0.18215
    FEATURES_PATH/imagenet256_labels/<i>.npy     (1,) integer class label
A feature and its label share a file name. train.py --data-dir takes FEATURES_PATH when it holds one
<name>_features folder beside a <name>_labels folder, or a <name>_features folder itself (to pick one of several).

The latents are used as they are: already scaled by SD-VAE's 0.18215 (and sampled from the posterior of a
randomly flipped image, fixed in the file). In this repository's convention of raw latents their statistics are
mean 0 and std 1 / 0.18215 (models.dit.dit_latent_stats), so a checkpoint decodes them with the SD-VAE
(AUTOENCODER, or train.py --tokenizer for a local copy). There are no images: items carry an empty image
tensor, and REPA, which needs them, cannot run.
"""
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from json_label_dataset import DataItemError, check_pairing, read_latent, scan_ids
from models.dit import dit_latent_stats
from omegadit.data_checks import DataFileError, format_problems, npy_header_problems, problem
from omegadit.files import FileReadError, load_npy

FEATURES_SUFFIX, LABELS_SUFFIX = "_features", "_labels"
AUTOENCODER = "stabilityai/sd-vae-ft-ema"  # fast-DiT's default --vae ema ('ft-mse' decodes the same latents)
SD_VAE_DOWNSAMPLE = 8


def feature_folders(data_dir):
    """(features folder, labels folder) of a fast-DiT features path, or None when `data_dir` is not one (see the
    module docstring); several pairs in one folder are an error that lists them."""
    root = Path(data_dir)
    if not root.is_dir():
        return None
    if root.name.endswith(FEATURES_SUFFIX):
        labels = root.with_name(root.name[:-len(FEATURES_SUFFIX)] + LABELS_SUFFIX)
        return (root, labels) if labels.is_dir() else None
    pairs = sorted((d, d.with_name(d.name[:-len(FEATURES_SUFFIX)] + LABELS_SUFFIX)) for d in root.iterdir()
                   if d.is_dir() and d.name.endswith(FEATURES_SUFFIX))
    pairs = [(features, labels) for features, labels in pairs if labels.is_dir()]
    if len(pairs) > 1:
        raise ValueError(f"{root} holds {len(pairs)} fast-DiT feature folders ({', '.join(f.name for f, _ in pairs)}): "
                         f"pass the one to train on as --data-dir, e.g. --data-dir {pairs[0][0]}")
    return pairs[0] if pairs else None


def is_fast_dit_features(data_dir) -> bool:
    return feature_folders(data_dir) is not None


class FastDiTFeatures(Dataset):
    """(empty image uint8 (3, 0, 0), latent float32 (4, h, w) as stored, int label) by file name.

    Every file is checked when the dataset is built (feature headers: float, (1, C, h, w) or (C, h, w), one shape;
    labels: one integer each), and the first problems are listed with their paths before any training work.
    """

    autoencoder = AUTOENCODER

    def __init__(self, data_dir):
        folders = feature_folders(data_dir)
        if folders is None:
            raise FileNotFoundError(f"{data_dir} is not a fast-DiT features path: expected <name>{FEATURES_SUFFIX}/ "
                                    f"and <name>{LABELS_SUFFIX}/ folders of .npy files in it")
        self.data_dir = str(data_dir)
        self.features_dir, self.labels_dir = (str(folder) for folder in folders)
        features, labels = scan_ids(self.features_dir, {".npy"}), scan_ids(self.labels_dir, {".npy"})
        self.ids = check_pairing({"latent": (features, self.features_dir), "label": (labels, self.labels_dir)},
                                 f"{type(self).__name__}({self.data_dir})")
        self.feature_paths = [os.path.join(self.features_dir, features[i]) for i in self.ids]
        problems, shapes = npy_header_problems(self.feature_paths, 3, "latents", squeeze_batch=True)
        label_paths = [os.path.join(self.labels_dir, labels[i]) for i in self.ids]
        self.labels, label_problems = read_labels(label_paths)
        problems += label_problems
        if not self.ids:
            problems.append((self.features_dir, "holds no .npy files"))
        if problems:
            raise DataFileError(f"{type(self).__name__}({self.data_dir}): {len(problems)} problem(s) with data "
                                f"files:\n" + format_problems(problems))
        self.latent_shape = tuple(next(iter(shapes.values())))
        self.resolution = self.latent_shape[-1] * SD_VAE_DOWNSAMPLE
        self.latent_mean, self.latent_std = dit_latent_stats(self.latent_shape[0])

    def check_classes(self, num_classes: int) -> None:
        """Raise, naming the first label files, unless every label is a class index below `num_classes`."""
        bad = [i for i, label in enumerate(self.labels) if not 0 <= label < num_classes]
        if bad:
            files = ", ".join(f"{self.ids[i]}.npy ({self.labels[i]})" for i in bad[:5])
            raise ValueError(f"{len(bad)} labels in {self.labels_dir} are outside [0, {num_classes}) (--num-classes "
                             f"{num_classes}), e.g. {files}")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index: int):
        path = self.feature_paths[index]
        try:
            latent = torch.from_numpy(read_latent(path)).float()
        except Exception as e:
            raise DataItemError(f"item {index} could not be read from {path}: {type(e).__name__}: {e}") from e
        return torch.zeros(3, 0, 0, dtype=torch.uint8), latent, self.labels[index]


def read_labels(paths) -> tuple:
    """([int label per file], problems) of fast-DiT label files: each one integer, shape (1,) or ()."""
    labels, problems = [], []
    for path in paths:
        try:
            array = load_npy(path)
        except (FileReadError, OSError, RuntimeError) as e:
            problems.append(problem(path, e))
            labels.append(-1)
            continue
        if not np.issubdtype(array.dtype, np.integer) or array.size != 1:
            problems.append((path, f"dtype {array.dtype}, shape {array.shape}: expected one integer class label"))
            labels.append(-1)
            continue
        labels.append(int(array.reshape(())))
    return labels, problems
