"""Class-label dataset (ImageNet layout): images, VAE latents and integer labels paired by id.

Layout:
    data_dir/images/<rel_dir>/<name>.png
    data_dir/vae-in/<rel_dir>/<name>.npy        raw latents ('img-latents-<name>.npy' also accepted)
    data_dir/vae-in/dataset.json                {"labels": [["<rel path>", <int label>], ...]}
    data_dir/vae-in/latents_stats.pt            per-channel {'mean', 'std'}, computed once
Label paths may name the latent or the image file; both map to the same id (see json_label_dataset).
"""
import os

from json_label_dataset import PairedLatentDataset, file_id
from omegadit.files import read_json


def read_class_labels(path) -> dict:
    """{id: int label} of a dataset.json {"labels": [[fname, label], ...]}."""
    data = read_json(path)
    entries = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'labels' must be a list of [fname, label] (it is {type(entries).__name__})")
    labels, duplicates = {}, []
    for index, entry in enumerate(entries):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], int)):
            raise ValueError(f"{path}: labels[{index}] is not [fname, int label]: {str(entry)[:200]}")
        key = file_id(entry[0])
        if key in labels:
            duplicates.append(key)
        labels[key] = entry[1]
    if duplicates:
        raise ValueError(f"{path}: {len(duplicates)} duplicate ids (first 5: {', '.join(duplicates[:5])})")
    return labels


class CustomDataset(PairedLatentDataset):
    """(image uint8 (3, H, W), normalised latent float32 (C, h, w), label int) by id.

    Labels come from data_dir/vae-in/dataset.json (or data_dir/images/dataset.json when vae-in has none).
    """

    def __init__(self, data_dir, stats_samples: int = 10000, stats_seed: int = 0, need_images: bool = True):
        super().__init__(data_dir, stats_samples, stats_seed, need_images)
        candidates = [os.path.join(self.features_dir, "dataset.json"), os.path.join(self.images_dir, "dataset.json")]
        label_file = next((c for c in candidates if os.path.isfile(c)), None)
        if label_file is None:
            raise FileNotFoundError(f"class labels not found: {candidates[0]} (nor {candidates[1]})")
        self.label_file = label_file
        labels = read_class_labels(label_file)
        self._setup(labels, "label", label_file)
        self.labels = [labels[i] for i in self.ids]

    def condition(self, index: int):
        return self.labels[index]
