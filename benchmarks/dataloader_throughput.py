"""DataLoader throughput of JsonLabelDataset on synthetic 256 px PNGs + (32, 16, 16) latents.

    python benchmarks/dataloader_throughput.py --num 512 --workers 0,2

Images are smooth noise with grain (compress like photos, unlike flat or pure-noise images), saved as
PNG like `dataset_tools.py convert` does. Prints items/s per worker count: one epoch including worker
start-up, and the steady state after the first batch.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from scipy.ndimage import gaussian_filter
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from json_label_dataset import JsonLabelDataset, collate  # noqa: E402


def make_dataset(root: Path, num: int, resolution: int, latent_shape, compress_level: int, seed: int = 0):
    """Write images/, vae-in/ and labels.json for `num` synthetic items under `root`."""
    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.random((resolution * 2, resolution * 2, 3)), sigma=(6, 6, 0))
    base = (base - base.min()) / (base.max() - base.min()) * 255
    labels = []
    for i in range(num):
        key = f"data_{i // 1000:06d}/img_{i:08d}"
        oy, ox = rng.integers(0, resolution, size=2)
        grain = rng.normal(0, 6, (resolution, resolution, 3))
        pixels = np.clip(base[oy:oy + resolution, ox:ox + resolution] + grain, 0, 255).astype(np.uint8)
        (root / "images" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "vae-in" / key).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(pixels).save(root / "images" / f"{key}.png", compress_level=compress_level)
        np.save(root / "vae-in" / f"{key}.npy", rng.normal(size=latent_shape).astype(np.float32))
        labels.append({"id": key, "en": f"a synthetic picture number {i}"})
    (root / "labels.json").write_text(json.dumps(labels))


def measure(dataset, workers: int, batch_size: int):
    """(items/s over a full epoch incl. start-up, items/s after the first batch)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    first, items = None, 0
    for images, latents, captions in loader:
        items += len(captions)
        if first is None:
            first, first_items = time.perf_counter(), items
    end = time.perf_counter()
    steady = (items - first_items) / (end - first) if end > first else float("nan")
    return items / (end - start), steady


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=512, help="synthetic items")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--latent-shape", type=int, nargs=3, default=(32, 16, 16))
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--compress-level", type=int, default=6, help="PNG zlib level of the synthetic images")
    parser.add_argument("--dir", help="reuse/keep the synthetic data here instead of a temporary directory")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.dir or tmp)
        if not (root / "labels.json").is_file():
            start = time.perf_counter()
            make_dataset(root, args.num, args.resolution, tuple(args.latent_shape), args.compress_level)
            print(f"wrote {args.num} items to {root} in {time.perf_counter() - start:.1f}s")
        stats = root / "vae-in" / "latents_stats.pt"
        if stats.exists():
            os.remove(stats)
        start = time.perf_counter()
        dataset = JsonLabelDataset(str(root))
        print(f"dataset construction (scan + pairing + latent stats of {len(dataset)} latents): "
              f"{time.perf_counter() - start:.2f}s")
        start = time.perf_counter()
        for i in range(min(len(dataset), 200)):
            dataset[i]
        per_item = (time.perf_counter() - start) / min(len(dataset), 200)
        print(f"single item, main process: {per_item * 1e3:.2f} ms ({1 / per_item:.0f} items/s)")
        print(f"{'workers':>7} {'batch':>5} {'items/s (epoch)':>16} {'items/s (steady)':>17}")
        for workers in (int(w) for w in args.workers.split(",")):
            epoch, steady = measure(dataset, workers, args.batch_size)
            print(f"{workers:>7} {args.batch_size:>5} {epoch:>16.0f} {steady:>17.0f}")
        print(f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
