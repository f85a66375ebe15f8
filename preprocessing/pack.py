"""`dataset_tools.py pack`: a dataset folder (images/, vae-in/, labels.json or vae-in/dataset.json, text-emb/) ->
a shard dataset (omegadit/shards.py), items in a seeded random order so that every chunk mixes the whole dataset.

The folder is checked as train.py checks it (pairing by id, file headers, latent statistics) before anything is
written. Items go into parts of --items-per-part; a rerun with the same settings skips the finished parts.
"""
import json
from pathlib import Path

import numpy as np
import torch

from json_label_dataset import read_latent
from omegadit.files import load_npy
from preprocessing.shard_writer import DEFAULT_CHUNK_BYTES, check_settings, finalize, part_done, write_part

SETTINGS_FILE = "pack.json"


def open_folder_dataset(data_dir, label_file=None, text_emb_dir=None):
    """(the checked folder dataset, 'caption' or 'label'): captions when labels.json (or label_file) exists."""
    if label_file or (Path(data_dir) / "labels.json").is_file():
        from json_label_dataset import JsonLabelDataset
        return JsonLabelDataset(data_dir, label_file=label_file, text_emb_dir=text_emb_dir), "caption"
    if text_emb_dir:
        raise ValueError(f"--text-emb-dir: {data_dir} has class labels (no labels.json), not captions")
    from dataset import CustomDataset
    return CustomDataset(data_dir), "label"


def folder_item(dataset, condition: str, index: int, images: bool) -> dict:
    """The shard item of item `index` of a folder dataset: raw float16 latent, the image file's bytes, ..."""
    files = dataset.item_files(index)
    latent = read_latent(files[1]).astype(np.float16)
    if not np.isfinite(latent).all():
        raise ValueError(f"{files[1]}: NaN or infinite values (as float16: values beyond +-65504 overflow)")
    item = {"id": dataset.ids[index], "latent": latent}
    if images:
        item["image"] = Path(files[0]).read_bytes()
    item[condition] = dataset.condition(index) if condition == "label" else dataset.captions[index]
    if getattr(dataset, "text_emb_dir", None):
        item["text_emb"] = load_npy(files[2]).astype(np.float16)
    return item


def pack(data_dir, out_dir, label_file=None, text_emb_dir=None, images: bool = True, seed: int = 0,
         items_per_part: int = 10000, chunk_bytes=DEFAULT_CHUNK_BYTES) -> dict:
    """Write the shard dataset `out_dir` from the folder dataset `data_dir`; returns its description."""
    if items_per_part < 1:
        raise ValueError(f"--items-per-part must be >= 1, got {items_per_part}")
    dataset, condition = open_folder_dataset(data_dir, label_file, text_emb_dir)
    out_dir = Path(out_dir)
    settings = {"source": str(Path(data_dir).resolve()), "num_items": len(dataset), "seed": seed,
                "items_per_part": items_per_part, "images": images, "text_emb": bool(text_emb_dir)}
    check_settings(out_dir / SETTINGS_FILE, settings)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = [order[i:i + items_per_part] for i in range(0, len(order), items_per_part)]
    todo = [n for n in range(len(parts)) if not part_done(out_dir, f"{n:05d}")]
    print(f"pack: {len(dataset)} items of {data_dir} in {len(parts)} parts, {len(parts) - len(todo)} already in "
          f"{out_dir}, writing {len(todo)}")
    from tqdm import tqdm
    for n in tqdm(todo, desc="pack"):
        write_part(out_dir, f"{n:05d}", (folder_item(dataset, condition, i, images) for i in parts[n]),
                   chunk_bytes)
    extra = {"condition": condition, "image_size": dataset.resolution if images else None}
    if condition == "label":
        extra["num_classes"] = max(dataset.labels) + 1
    encoding = Path(dataset.features_dir) / "encoding.json"
    if encoding.is_file():
        extra["encoding"] = json.loads(encoding.read_text())
    return finalize(out_dir, extra)
