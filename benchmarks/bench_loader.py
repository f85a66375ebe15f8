"""Items/s of train.py's two data paths on one synthetic dataset: the folder dataset (JsonLabelDataset through a
DataLoader with ResumableBatchSampler) and the shard dataset (ShardLoader over LitData chunks), each with the
images decoded (REPA) and without (--enc-type none), at several worker counts. The dataset is made here:
--num-items captioned PNG images and float16 latents, then packed to shards.

    python benchmarks/bench_loader.py --num-items 20000 --workers 4 8
    python benchmarks/bench_loader.py --num-items 512 --image-size 64 --workers 0 2 --batches 4   # a CPU check
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import PIL.Image
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from json_label_dataset import JsonLabelDataset, collate  # noqa: E402
from omegadit.shards import ShardDataset  # noqa: E402
from preprocessing.pack import pack  # noqa: E402
from utils import ResumableBatchSampler, write_json  # noqa: E402


def write_item(job):
    """One synthetic item: a smooth PNG with noise (compresses like a photo, roughly) and a float16 latent."""
    root, index, image_size, latent_shape = job
    rng = np.random.default_rng(index)
    ramp = np.linspace(0, 255, image_size)
    base = (np.add.outer(ramp, ramp)[..., None] * rng.uniform(0.2, 0.5, 3)) % 256
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    name = f"{index // 1000:03d}/{index:06d}"
    (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
    (root / "vae-in" / name).parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels).save(root / "images" / f"{name}.png")
    np.save(root / "vae-in" / f"{name}.npy", rng.standard_normal(latent_shape).astype(np.float16))
    return {"id": name, "en": f"synthetic item {index} with a gradient of colours"}


def make_dataset(root: Path, num_items: int, image_size: int, latent_shape, processes: int) -> None:
    jobs = [(root, i, image_size, latent_shape) for i in range(num_items)]
    with Pool(processes) as pool:
        labels = pool.map(write_item, jobs, chunksize=64)
    write_json(root / "labels.json", labels)


def items_per_second(batches, batch_size: int, warmup: int, count: int) -> float:
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - start)


def folder_batches(data_dir, batch_size: int, workers: int, need_images: bool = True):
    dataset = JsonLabelDataset(data_dir, need_images=need_images)
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         persistent_workers=workers > 0)
    return iter(loader)


def shard_batches(shard_dir, batch_size: int, workers: int, need_images: bool = True):
    return ShardDataset(shard_dir, need_images=need_images).loader(batch_size, workers, 0, collate)


LOADERS = (("folder (JsonLabelDataset)", folder_batches, True), ("shards (LitData)", shard_batches, True),
           ("folder, no images (--enc-type none)", folder_batches, False),
           ("shards, no images (--enc-type none)", shard_batches, False))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-items", type=int, default=20000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--latent-shape", type=int, nargs=3, default=[32, 16, 16])
    p.add_argument("--workers", type=int, nargs="+", default=[4, 8], help="DataLoader worker counts to measure")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=100, help="batches timed per measurement (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where to make the dataset (default: a temporary folder, removed)")
    args = p.parse_args(argv)
    if args.num_items < args.batch_size * (args.warmup + args.batches):
        print(f"note: {args.num_items} items are fewer than the {args.batch_size * (args.warmup + args.batches)} "
              f"read per measurement; epochs repeat")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        data, shards = workdir / "folder", workdir / "shards"
        if not (data / "labels.json").is_file():
            start = time.perf_counter()
            make_dataset(data, args.num_items, args.image_size, tuple(args.latent_shape), os.cpu_count() or 1)
            print(f"made {args.num_items} items in {time.perf_counter() - start:.0f}s")
        if not (shards / "index.json").is_file():
            start = time.perf_counter()
            pack(data, shards)
            print(f"packed to shards in {time.perf_counter() - start:.0f}s")
        rows = []
        for workers in args.workers:
            for name, make, images in LOADERS:
                source = data if make is folder_batches else shards
                rate = items_per_second(make(source, args.batch_size, workers, images), args.batch_size, args.warmup,
                                        args.batches)
                rows.append((name, workers, rate))
                print(f"{name}, {workers} workers: {rate:,.0f} items/s", flush=True)
        print(f"\n{args.num_items} items: {args.image_size}px PNG, latents {tuple(args.latent_shape)} float16, "
              f"batch {args.batch_size}, {os.cpu_count()} CPU cores\n")
        print("| loader | workers | items/s |\n| --- | --- | --- |")
        for name, workers, rate in rows:
            print(f"| {name} | {workers} | {rate:,.0f} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
