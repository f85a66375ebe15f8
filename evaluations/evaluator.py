"""ADM's (guided-diffusion) sample evaluator in PyTorch: Inception Score, FID, sFID, precision and recall.

    python evaluations/evaluator.py REF SAMPLE [--save-path metrics.json] [--vgg-pr --vgg-weights vgg16.pth]

REF and SAMPLE are ADM batches (.npz whose `arr_0` holds uint8 images (N, H, W, 3)) or folders of .png/.jpg images
of one size (read in sorted name order, subfolders not searched). A batch that carries `mu`, `sigma`, `mu_s` and
`sigma_s` (as ADM's reference batches do) has its FID/sFID statistics taken from the file; activations are still
computed for precision and recall. An .npz holding `pool` (N, 2048) and `spatial` (N, 2023) activations, such as a
`--ref-cache` file, can stand in for a batch of images (and one holding `vgg` (N, 4096) for the VGG16 features).
Features come from evaluations/inception.py; the metric math reproduces ADM's evaluator on numpy arrays.

`--vgg-pr` adds precision and recall as Kynkaanniemi et al. (2019) define them, in VGG16 fc2 feature space
(evaluations/vgg.py), with the same k-NN code as ADM's Inception-space precision and recall.
"""
import argparse
import json
import os
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from tqdm.auto import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.inception import load_inception  # noqa: E402
from evaluations.vgg import load_vgg16  # noqa: E402
from omegadit import compat  # noqa: E402

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def compute_statistics(activations):
    """Mean and covariance of (N, D) activations, as ADM computes them."""
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between Gaussians (mu1, sigma1) and (mu2, sigma2), with ADM's singular-product fallback."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"statistics differ in size: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(softmax, split_size=5000):
    """Inception Score of (N, classes) softmax rows: exp(mean KL(p(y|x) || p(y))) per chunk, averaged over chunks."""
    scores = []
    for i in range(0, len(softmax), split_size):
        part = softmax[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))


def _squared_distances(u, v):
    """max(|u|^2 - 2 u.v + |v|^2, 0) in u's dtype, each step rounded to it as TF's kernels do."""
    norm_u = (u * u).float().sum(1).to(u.dtype)
    norm_v = (v * v).float().sum(1).to(u.dtype)
    d = (u.float() @ v.float().t()).to(u.dtype)
    return d.mul_(-2).add_(norm_u[:, None]).add_(norm_v[None]).clamp_(min=0)


def pairwise_distances(u, v):
    """ADM's DistanceBlock: squared distances of (R, D) x (C, D) features computed in float16, redone in float32
    when any float16 entry overflows; returned as float32."""
    d = _squared_distances(u.half(), v.half())
    if torch.isfinite(d).all():
        return d.float()
    return _squared_distances(u.float(), v.float())


def manifold_radii(features, k=3, row_batch_size=10000, col_batch_size=10000):
    """Distance of each (N, D) feature (torch) to its k-th nearest neighbour, the point itself counted as 0th."""
    radii = []
    for r in range(0, len(features), row_batch_size):
        rows = features[r : r + row_batch_size]
        nearest = None
        for c in range(0, len(features), col_batch_size):
            d = pairwise_distances(rows, features[c : c + col_batch_size])
            nearest = d if nearest is None else torch.cat([nearest, d], dim=1)
            nearest = nearest.topk(min(k + 1, nearest.shape[1]), dim=1, largest=False).values
        if nearest.shape[1] <= k:
            raise ValueError(f"need more than k={k} features to estimate a manifold, got {len(features)}")
        radii.append(nearest[:, k])
    return torch.cat(radii)


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def _full_precision():
    """Keep float32 convolutions and matmuls on GPU free of TF32 rounding."""
    if not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def precision_recall(ref_features, sample_features, k=3, row_batch_size=10000, col_batch_size=10000, device=None):
    """Improved precision and recall (Kynkaanniemi et al.) as ADM's ManifoldEstimator computes them.

    Radii are k-th nearest-neighbour distances within each set; precision is the fraction of samples inside some
    reference ball, recall the fraction of references inside some sample ball. Squared distances are computed in
    float16 per (row_batch_size x col_batch_size) block, with ADM's float32 fallback per block, so memory stays
    bounded by one block. Runs on `device` (default: CUDA when present). Returns (precision, recall).
    """
    device = torch.device(device) if device is not None else _default_device()
    ref = torch.as_tensor(np.asarray(ref_features, dtype=np.float32), device=device)
    sample = torch.as_tensor(np.asarray(sample_features, dtype=np.float32), device=device)
    with _full_precision():
        ref_radii = manifold_radii(ref, k, row_batch_size, col_batch_size)
        sample_radii = manifold_radii(sample, k, row_batch_size, col_batch_size)
        ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
        sample_in = torch.zeros(len(sample), dtype=torch.bool, device=device)
        for r in range(0, len(ref), row_batch_size):
            for c in range(0, len(sample), col_batch_size):
                d = pairwise_distances(ref[r : r + row_batch_size], sample[c : c + col_batch_size])
                ref_in[r : r + row_batch_size] |= (d <= sample_radii[None, c : c + col_batch_size]).any(dim=1)
                sample_in[c : c + col_batch_size] |= (d <= ref_radii[r : r + row_batch_size, None]).any(dim=0)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


def list_image_files(folder):
    """The .png/.jpg/.jpeg files directly in `folder`, sorted by name."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no .png or .jpg images in this folder (subfolders are not searched)")
    return files


def read_image(path):
    """An image file as uint8 RGB (H, W, 3)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _folder_batches(files, batch_size):
    size = None
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            image = read_image(path)
            if size is None:
                size = image.shape
            elif image.shape != size:
                raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]}, the first image of the folder "
                                 f"{size[1]}x{size[0]}: a folder must hold images of one size")
            batch.append(image)
        yield np.stack(batch)


def iterate_images(path, batch_size):
    """(number of images, iterator of (B, H, W, 3) uint8 batches) of a folder of images, or of `arr_0` in an .npz
    streamed from the archive."""
    if os.path.isdir(path):
        files = list_image_files(path)
        return len(files), _folder_batches(files, batch_size)
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            raise ValueError(f"{path}: no 'arr_0' image array (holds {sorted(archive.namelist())})")
        with archive.open("arr_0.npy") as f:
            header = _read_npy_header(f)
    if header is None or header[1] or header[2].hasobject:
        with np.load(path) as data:
            images = data["arr_0"]
        shape = images.shape
        batches = (images[i : i + batch_size] for i in range(0, shape[0], batch_size))
    else:
        shape, _, dtype = header
        batches = _stream_batches(path, shape, dtype, batch_size)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be images of shape (N, H, W, 3), got {tuple(shape)}")
    return shape[0], batches


def _stream_batches(path, shape, dtype, batch_size):
    item_bytes = int(np.prod(shape[1:])) * dtype.itemsize
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
        _read_npy_header(f)
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = bytearray(f.read(count * item_bytes))
            if len(data) != count * item_bytes:
                raise ValueError(f"{path}: arr_0 ends early at image {start} of {shape[0]}")
            yield np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])


def _npz_files(path):
    """Array names of an .npz batch; none for an image folder."""
    if os.path.isdir(path):
        return []
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive")
    with np.load(path) as data:
        return data.files


@torch.no_grad()
def compute_activations(model, path, batch_size=64):
    """Inception (pool (N, 2048), spatial (N, 2023)) float32 activations of the images in an ADM .npz batch."""
    device = next(model.parameters()).device
    count, batches = iterate_images(path, batch_size)
    pools, spatials = [], []
    with _full_precision():
        for batch in tqdm(batches, total=-(-count // batch_size), desc=os.path.basename(os.path.normpath(path))):
            pool, spatial = model(torch.from_numpy(batch).to(device))
            pools.append(pool.cpu().numpy())
            spatials.append(spatial.cpu().numpy())
    return np.concatenate(pools), np.concatenate(spatials)


@torch.no_grad()
def inception_softmax(model, pool, batch_size=512):
    """ADM's IS class probabilities: softmax(pool @ W) with the 1008-way weight of the Inception classifier."""
    device = next(model.parameters()).device
    rows = []
    with _full_precision():
        for i in range(0, len(pool), batch_size):
            logits = model.logits(torch.from_numpy(pool[i : i + batch_size]).to(device))
            rows.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
    return np.concatenate(rows)


def _source_of(path):
    """What a cache records about the batch it was made from: its path and size (a folder: its images)."""
    if os.path.isdir(path):
        files = list_image_files(path)
        return f"{os.path.abspath(path)}:{len(files)} images:{sum(f.stat().st_size for f in files)} bytes"
    return f"{os.path.abspath(path)}:{os.path.getsize(path)}"


def _read_cache(cache, source):
    """The arrays of `cache` when it was made from `source`, else {}."""
    if cache is None or not os.path.exists(cache):
        return {}
    with np.load(cache) as data:
        if str(data["source"]) == source:
            return {name: data[name] for name in data.files if name != "source"}
    print(f"{cache} was made from another file; recomputing it", file=sys.stderr)
    return {}


def _cached_features(path, names, compute, cache):
    """Arrays `names` of a batch: from the batch file itself when it holds them, else from `cache` when it was made
    from this batch, else `compute()`d and added to `cache` (which keeps the other features it holds)."""
    if set(names) <= set(_npz_files(path)):
        with np.load(path) as data:
            return tuple(data[name] for name in names)
    source = _source_of(path)
    cached = _read_cache(cache, source)
    if set(names) <= set(cached):
        return tuple(cached[name] for name in names)
    arrays = compute()
    if cache is not None:
        cached.update(zip(names, arrays))
        with open(cache, "wb") as f:
            np.savez(f, source=np.array(source), **cached)
    return arrays


def read_activations(path, model, batch_size=64, cache=None):
    """(pool, spatial) of a batch: its own `pool`/`spatial` arrays, else `cache` when it was made from this file,
    else computed from its images (and written to `cache` when given)."""
    return _cached_features(path, ("pool", "spatial"), lambda: compute_activations(model, path, batch_size), cache)


@torch.no_grad()
def compute_vgg_features(model, path, batch_size=64):
    """VGG16 fc2 (N, 4096) float32 features of the images of a batch (.npz or folder)."""
    device = next(model.parameters()).device
    count, batches = iterate_images(path, batch_size)
    features = []
    with _full_precision():
        name = os.path.basename(os.path.normpath(path))
        for batch in tqdm(batches, total=-(-count // batch_size), desc=f"VGG16 {name}"):
            features.append(model(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).float().cpu().numpy())
    return np.concatenate(features)


def read_vgg_features(path, model, batch_size=64, cache=None):
    """VGG16 features of a batch: its own `vgg` array, else `cache`, else computed (and added to `cache`)."""
    return _cached_features(path, ("vgg",), lambda: (compute_vgg_features(model, path, batch_size),), cache)[0]


def read_statistics(path, pool, spatial):
    """((mu, sigma), (mu_s, sigma_s)) from the batch file when it carries them, else from the activations."""
    if set(STAT_KEYS) <= set(_npz_files(path)):
        with np.load(path) as data:
            return (data["mu"], data["sigma"]), (data["mu_s"], data["sigma_s"])
    return compute_statistics(pool), compute_statistics(spatial)


def evaluate(ref_path, sample_path, model, batch_size=64, ref_cache=None, split_size=5000, k=3, pr_batch_size=10000,
             device=None, vgg=None):
    """ADM's five metrics of a sample batch against a reference batch, as a dict (plus the batch sizes); with a
    VGG16 `vgg`, also precision and recall in its fc2 feature space (`vgg_precision`, `vgg_recall`)."""
    ref_pool, ref_spatial = read_activations(ref_path, model, batch_size, ref_cache)
    ref_stats, ref_stats_s = read_statistics(ref_path, ref_pool, ref_spatial)
    pool, spatial = read_activations(sample_path, model, batch_size)
    stats, stats_s = read_statistics(sample_path, pool, spatial)
    precision, recall = precision_recall(ref_pool, pool, k, pr_batch_size, pr_batch_size, device)
    metrics = {
        "inception_score": inception_score(inception_softmax(model, pool), split_size),
        "fid": frechet_distance(*stats, *ref_stats),
        "sfid": frechet_distance(*stats_s, *ref_stats_s),
        "precision": precision,
        "recall": recall,
        "num_ref": len(ref_pool),
        "num_samples": len(pool),
    }
    if vgg is not None:
        ref_vgg = read_vgg_features(ref_path, vgg, batch_size, ref_cache)
        sample_vgg = read_vgg_features(sample_path, vgg, batch_size)
        metrics["vgg_precision"], metrics["vgg_recall"] = precision_recall(
            ref_vgg, sample_vgg, k, pr_batch_size, pr_batch_size, device)
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref_batch", nargs="?", help="reference batch: .npz (arr_0 uint8 NHWC images; "
                                                     "mu/sigma/mu_s/sigma_s used) or a folder of .png/.jpg images")
    parser.add_argument("sample_batch", nargs="?",
                        help="sample batch: .npz (arr_0 uint8 NHWC images) or a folder of images")
    parser.add_argument("--save-path", default=None, help="write the metrics as JSON here")
    parser.add_argument("--inception-weights", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth (default: the torch.hub cache, downloaded there)")
    parser.add_argument("--no-download", action="store_true", help="never download the Inception weights")
    parser.add_argument("--ref-cache", default=None,
                        help="cache .npz of the reference activations and VGG16 features (read or written)")
    parser.add_argument("--vgg-pr", action="store_true",
                        help="also precision/recall in VGG16 fc2 space (Kynkaanniemi et al. 2019, k = --nhood-size)")
    parser.add_argument("--vgg-weights", default=None,
                        help="torchvision's vgg16-397923af.pth or a .safetensors (default: $OMEGADIT_VGG16_WEIGHTS, "
                             "else $TORCH_HOME/hub/checkpoints/vgg16-397923af.pth; never downloaded)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default: 64)")
    parser.add_argument("--is-split-size", type=int, default=5000, help="Inception Score split size (default: 5000)")
    parser.add_argument("--nhood-size", type=int, default=3, help="k of precision/recall (default: 3)")
    parser.add_argument("--pr-batch-size", type=int, default=10000,
                        help="rows and columns per precision/recall distance block (default: 10000)")
    compat.add_original_flags(parser, "evaluator", recipes=False)
    args = compat.resolve_evaluator(parser, parser.parse_args(argv))

    device = torch.device(args.device) if args.device else _default_device()
    try:
        vgg = load_vgg16(args.vgg_weights, device) if args.vgg_pr else None
        model = load_inception(args.inception_weights, device, download=not args.no_download)
        metrics = evaluate(args.ref_batch, args.sample_batch, model, args.batch_size, args.ref_cache,
                           args.is_split_size, args.nhood_size, args.pr_batch_size, device, vgg)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")
    print("Inception Score:", metrics["inception_score"])
    print("FID:", metrics["fid"])
    print("sFID:", metrics["sfid"])
    print("Precision:", metrics["precision"])
    print("Recall:", metrics["recall"])
    if vgg is not None:
        print("VGG16 Precision:", metrics["vgg_precision"])
        print("VGG16 Recall:", metrics["vgg_recall"])
    if args.save_path:
        Path(args.save_path).parent.mkdir(parents=True, exist_ok=True)
        metrics.update(ref_batch=args.ref_batch, sample_batch=args.sample_batch)
        with open(args.save_path, "w") as f:
            json.dump(metrics, f, indent=2)
    original_path = compat.original_metrics_path(args)
    if original_path is not None:
        compat.write_original_metrics(original_path, metrics)
        print(f"wrote {original_path}")


if __name__ == "__main__":
    main()
