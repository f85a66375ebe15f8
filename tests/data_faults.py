"""A tiny clean dataset to copy, and ways to break its files, for the data-check tests."""
import json
import shutil

import numpy as np
import PIL.Image

from conftest import make_text_dataset


def latent(index: int) -> str:
    return f"vae-in/data_000000/img_{index:08d}.npy"


def image(index: int) -> str:
    return f"images/data_000000/img_{index:08d}.png"


def make_clean_dataset(root):
    """8 shapes at 32 px with (48, 8, 8) float32 pixel latents, without the statistics file."""
    root = make_text_dataset(root, num=8)
    (root / "vae-in/latents_stats.pt").unlink()
    return root


def copy_dataset(source, dest):
    shutil.copytree(source, dest)
    return dest


def put_nan(path, index=(0, 0, 0)):
    array = np.load(path)
    array[index] = np.nan
    np.save(path, array)


def truncate(path, size):
    path.write_bytes(path.read_bytes()[:size])


def truncate_png(path):
    """Keep the PNG header (size and mode still read) but drop most of the pixel data."""
    truncate(path, len(path.read_bytes()) // 2)


def non_utf8_caption(root, index=3):
    """Rewrite labels.json with a latin-1 'é' in the caption of entry `index`."""
    entries = json.loads((root / "labels.json").read_text())
    entries[index]["en"] = "caf\udce9"
    (root / "labels.json").write_bytes(json.dumps(entries, ensure_ascii=False).encode("utf-8", "surrogateescape"))


# fault: (broken file, how to break it); every fault breaks another file, so that all can be injected at once
FAULTS = {
    "wrong_channel_latent": (latent(0), lambda path: np.save(path, np.zeros((47, 8, 8), np.float32))),
    "wrong_shape_latent": (latent(1), lambda path: np.save(path, np.zeros((48, 4, 4), np.float32))),
    "int8_latent": (latent(3), lambda path: np.save(path, np.zeros((48, 8, 8), np.int8))),
    "truncated_latent": (latent(6), lambda path: truncate(path, 1000)),
    "corrupt_png": (image(2), lambda path: path.write_bytes(b"this is no image")),
    "other_size_png": (image(7), lambda path: PIL.Image.new("RGB", (40, 40)).save(path)),
    "16_bit_png": (image(5), lambda path: PIL.Image.new("I;16", (32, 32)).save(path)),
}


def inject(root, fault):
    """Break the file of `fault` under `root`; returns its path."""
    rel, breaks = FAULTS[fault]
    breaks(root / rel)
    return root / rel
