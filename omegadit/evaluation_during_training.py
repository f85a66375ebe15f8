"""FID and caption alignment during training (`train.py --eval-every N`), and the reference statistics of FID.

Every N steps the main process samples `--eval-num-samples` images with the EMA weights (fixed noise and conditions,
so that evaluations differ only by the weights), computes their FID Inception pool features
(evaluations/inception.py) and their Frechet distance (evaluations/evaluator.py) to the reference statistics, and
logs {"step", "fid", "fid_num_samples", "eval_seconds"} to metrics.jsonl and the trackers. With `--eval-alignment`
(the demo's shapes data) it also scores the samples against their captions or class names with
evaluations/alignment.py and logs `alignment_<attribute>` (all samples) and `alignment_{seen,held_out}_<attribute>`;
FID is then optional. Nothing runs between evaluations, and train.py leaves the evaluation's time out of its step
timings.

A FID of a few hundred or thousand samples is biased upwards (and needs at least 2048 samples for a full-rank
covariance; below that the evaluator regularises it): compare it between steps of a run, not with published
FID-50K numbers, for which generate.py and evaluations/evaluator.py remain the tools.

Reference statistics (`--eval-ref`): an .npz holding `mu` and `sigma` (ADM's reference batches do, e.g.
VIRTUAL_imagenet256_labeled.npz; so does the output of `prepare` below), or holding `pool` activations, or a batch
of images (ADM `arr_0` .npz or a folder, searched recursively), whose statistics are then computed once at start.

    python -m omegadit.evaluation_during_training prepare my_dataset/images ref_stats.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--num-images 10000]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from evaluations.evaluator import IMAGE_EXTENSIONS, compute_statistics, frechet_distance  # noqa: E402
from evaluations.inception import load_inception  # noqa: E402

SEED_STRIDE = 1_000_003  # noise of sample i: seed * SEED_STRIDE + i, as generate.py


def add_eval_flags(parser):
    """train.py's flags of this module."""
    g = parser.add_argument_group("evaluation during training (FID, caption alignment)")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: never)")
    g.add_argument("--eval-ref", default=None,
                   help="reference statistics: .npz with mu/sigma (omegadit.evaluation_during_training prepare, or an "
                        "ADM reference batch), or a batch of images (.npz arr_0 or a folder)")
    g.add_argument("--eval-num-samples", type=int, default=256, help="samples per evaluation")
    g.add_argument("--eval-batch-size", type=int, default=32, help="samples per sampling / Inception batch")
    g.add_argument("--eval-steps", type=int, default=50, help="sampler steps")
    g.add_argument("--eval-sampler", default=None, help="sampler name (default: the objective's)")
    g.add_argument("--eval-cfg-scale", type=float, default=None, help="guidance scale (default: --cfg-scale)")
    g.add_argument("--eval-prompts", default=None,
                   help="prompts file for text models (default: the captions of the training data)")
    g.add_argument("--eval-inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: the torch.hub cache; never downloaded)")
    g.add_argument("--eval-alignment", action="store_true",
                   help="also score the samples' caption alignment (the demo's shapes data; evaluations/alignment.py); "
                        "held-out combinations come from the data's demo_meta.json")
    g.add_argument("--eval-class-names", default=None,
                   help="class models with --eval-alignment: line k names class k (default: the data's "
                        "class_names.txt)")
    return g


# ------------------------------------------------------------------------------------------------------------------
# Reference statistics
# ------------------------------------------------------------------------------------------------------------------

def image_files(folder) -> list:
    """Image files under `folder`, subfolders included (dataset layouts nest them), sorted by path."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no .png or .jpg images in it or its subfolders")
    return files


def image_batches(source, batch_size, limit=None):
    """(count, iterator of uint8 (B, H, W, 3) batches) of a folder (recursive) or an ADM .npz (arr_0)."""
    from evaluations.evaluator import iterate_images, read_image

    source = Path(source)
    if source.is_dir():
        files = image_files(source)[:limit]

        def batches():
            for start in range(0, len(files), batch_size):
                yield np.stack([read_image(p) for p in files[start:start + batch_size]])
        return len(files), batches()
    count, batches = iterate_images(str(source), batch_size)
    if limit is None or limit >= count:
        return count, batches

    def first(limit=limit):
        for batch in batches:
            yield batch[:limit]
            limit -= len(batch)
            if limit <= 0:
                return
    return limit, first()


@torch.no_grad()
def pool_features(inception, images) -> np.ndarray:
    """FID Inception pool features (N, 2048) float64 of uint8 (N, H, W, 3) images (numpy or tensor)."""
    device = next(inception.parameters()).device
    images = torch.as_tensor(images).to(device)
    with torch.autocast(device.type, enabled=False):
        pool, _ = inception(images)
    return pool.double().cpu().numpy()


def reference_statistics(path, inception=None, batch_size=64, limit=None):
    """(mu, sigma) of the reference: stored mu/sigma, stored pool activations, or images' features."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FID reference {path} does not exist (see python -m "
                                f"omegadit.evaluation_during_training --help to prepare one)")
    if path.suffix == ".npz":
        with np.load(path) as data:
            if {"mu", "sigma"} <= set(data.files):
                return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if "pool" in data.files:
                return compute_statistics(data["pool"].astype(np.float64))
    if inception is None:
        raise ValueError(f"{path} holds images: the Inception network is needed to compute its statistics")
    _, batches = image_batches(path, batch_size, limit)
    return compute_statistics(np.concatenate([pool_features(inception, batch) for batch in batches]))


def prepare(source, out, inception_weights=None, batch_size=64, num_images=None, device=None):
    """Write `out` (.npz: mu, sigma, num_images) with the FID statistics of the images in `source`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    inception = load_inception(inception_weights, device=device, download=False)
    count, batches = image_batches(source, batch_size, num_images)
    features = np.concatenate([pool_features(inception, batch) for batch in batches])
    mu, sigma = compute_statistics(features)
    np.savez(out, mu=mu, sigma=sigma, num_images=np.array(len(features)))
    return Path(out)


# ------------------------------------------------------------------------------------------------------------------
# The evaluator train.py calls
# ------------------------------------------------------------------------------------------------------------------

class TrainingEvaluator:
    """FID against reference statistics and/or caption alignment of fixed-noise samples (see the module docstring).

    reference and inception: None to skip FID. alignment: None, or (the caption of each condition, held-out
    combinations) to score the samples with evaluations/alignment.py."""

    def __init__(self, objective, conditioner, decode, conditions, latent_shape, device, reference, inception,
                 num_samples=256, batch_size=32, num_steps=50, sampler=None, cfg_scale=1.0, seed=0,
                 interval=(0.0, 1.0), alignment=None):
        from omegadit.sampling import check_sampler

        if reference is not None and num_samples < 2:
            raise ValueError(f"FID needs at least 2 samples, got --eval-num-samples {num_samples}")
        if reference is None and alignment is None:
            raise ValueError("nothing to evaluate: give FID reference statistics or alignment captions")
        self.objective = objective
        self.conditioner = conditioner
        self.decode = decode
        self.conditions = [conditions[i % len(conditions)] for i in range(num_samples)]
        self.latent_shape = tuple(latent_shape)
        self.device = torch.device(device)
        self.reference = reference
        self.inception = inception
        self.alignment = alignment
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.sampler_name = sampler or objective.default_sampler
        self.sample_fn = check_sampler(self.sampler_name, objective)
        self.cfg_scale = cfg_scale
        self.interval = tuple(interval)
        self.seed = seed
        self.last_images = None

    @torch.no_grad()
    def samples(self, model, autocast=None):
        """uint8 (N, H, W, 3) samples of `model` from the fixed noise and conditions."""
        from omegadit.sampling.guidance import GuidedNetwork

        images = []
        for start in range(0, self.num_samples, self.batch_size):
            indices = range(start, min(start + self.batch_size, self.num_samples))
            generators = [torch.Generator(self.device).manual_seed(self.seed * SEED_STRIDE + i) for i in indices]
            noise = torch.stack([torch.randn(self.latent_shape, generator=g, device=self.device) for g in generators])
            y = self.conditioner([self.conditions[i] for i in indices], self.device)
            network = GuidedNetwork(model, self.objective, y, scale=self.cfg_scale, interval=self.interval)
            with (autocast() if autocast is not None else torch.autocast(self.device.type, enabled=False)):
                latents = self.sample_fn(self.objective, network, noise, self.num_steps, generator=generators)
            images.append(self.decode(latents.float()).permute(0, 2, 3, 1).cpu())
        return torch.cat(images).numpy()

    def fid_of(self, images) -> float:
        """Frechet distance of the images' Inception features to the reference statistics."""
        features = np.concatenate([pool_features(self.inception, images[i:i + self.batch_size])
                                   for i in range(0, len(images), self.batch_size)])
        return frechet_distance(*compute_statistics(features), *self.reference)

    def alignment_of(self, images) -> dict:
        """{alignment_<attribute>, alignment_<group>_<attribute>: fraction right} of the images' captions."""
        from evaluations.alignment import score

        captions, holdout = self.alignment
        prompts = [captions[i % len(captions)] for i in range(len(images))]  # sample i has condition i mod K
        metrics = {}
        for group, summary in score(images, prompts, holdout).items():
            if not summary["n"]:
                continue
            prefix = "alignment_" if group == "all" else f"alignment_{group}_"
            metrics.update({prefix + k: v for k, v in summary.items() if k != "n" and v is not None})
        return metrics

    def evaluate(self, model, autocast=None) -> dict:
        """The metrics of `model`'s samples: fid (with a reference) and alignment_* (with captions)."""
        was_training = model.training
        model.eval()
        try:
            images = self.samples(model, autocast)
        finally:
            model.train(was_training)
        self.last_images = images
        metrics = {}
        if self.reference is not None:
            metrics.update(fid=self.fid_of(images), fid_num_samples=self.num_samples)
        if self.alignment is not None:
            metrics.update(self.alignment_of(images))
        return metrics

    def run(self, accelerator, model, step, exp_dir, log=print) -> float:
        """Evaluate on the main process (the others wait), log the record; returns the seconds it took."""
        started = time.perf_counter()
        if accelerator.is_main_process:
            metrics = self.evaluate(model, accelerator.autocast)
            seconds = time.perf_counter() - started
            record = {"step": step, **metrics, "eval_seconds": seconds}
            with open(Path(exp_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            parts = [f"FID {metrics['fid']:.3f}"] if "fid" in metrics else []
            parts += [f"alignment {metrics['alignment_all_attributes']:.3f}"] if self.alignment is not None else []
            parts += ([f"held out {metrics['alignment_held_out_all_attributes']:.3f}"]
                      if "alignment_held_out_all_attributes" in metrics else [])
            log(f"step {step}: {', '.join(parts)} on {self.num_samples} samples ({self.sampler_name}, "
                f"{self.num_steps} steps) in {seconds:.1f}s")
        accelerator.wait_for_everyone()
        return time.perf_counter() - started


def alignment_captions(args, conditioner, conditions) -> tuple:
    """(caption of each condition, held-out combinations) for --eval-alignment: the prompts of a text model, the
    class names of a class model (--eval-class-names, else the data's class_names.txt); the held-out combinations
    of the data's demo_meta.json when it has one."""
    from omegadit.prompts import read_prompts

    data_dir = Path(args.data_dir)
    if conditioner.kind == "text":
        captions = list(conditions)
    elif conditioner.kind == "class":
        names = Path(args.eval_class_names) if args.eval_class_names else data_dir / "class_names.txt"
        if not names.is_file():
            raise FileNotFoundError(f"--eval-alignment of a class model needs the class names: {names} does not exist "
                                    f"(--eval-class-names FILE, line k naming class k)")
        captions = read_prompts(names)
        if len(captions) < conditioner.num_classes:
            raise ValueError(f"{names} names {len(captions)} classes, the model has {conditioner.num_classes}")
        captions = captions[:conditioner.num_classes]
    else:
        raise ValueError("--eval-alignment needs captions or class labels; this model is unconditional")
    meta = data_dir / "demo_meta.json"
    holdout = json.loads(meta.read_text()).get("holdout", []) if meta.is_file() else []
    return captions, holdout


def build_evaluator(args, dataset, conditioner, objective, latent_shape, device):
    """The evaluator for train.py's flags, or None without --eval-every; fails here (before the first step) on a
    missing reference, missing Inception weights or missing class names."""
    if not args.eval_every:
        return None
    if args.eval_every < 0:
        raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
    alignment_only = getattr(args, "eval_alignment", False) and not args.eval_ref
    if not args.eval_ref and not alignment_only:
        raise ValueError("--eval-every needs --eval-ref: reference statistics (python -m "
                         "omegadit.evaluation_during_training prepare IMAGES OUT.npz) or an ADM reference batch, "
                         "or --eval-alignment alone (the demo's shapes data)")
    from models.tokenizers import LatentDecoder, load_tokenizer
    from omegadit.prompts import read_prompts

    inception = reference = None
    if not alignment_only:
        inception = load_inception(args.eval_inception_weights, device=device, download=False)
        reference = reference_statistics(args.eval_ref, inception, args.eval_batch_size)
    cfg = args.eval_cfg_scale if args.eval_cfg_scale is not None else args.cfg_scale
    if conditioner.kind == "text":
        if getattr(conditioner, "encoder", None) is None:
            conditioner.load(device)
        conditions = read_prompts(args.eval_prompts) if args.eval_prompts else list(dataset.captions)
    elif conditioner.kind == "class":
        conditions = list(range(conditioner.num_classes))
    else:  # unconditional: one dummy condition, nothing to guide
        conditions, cfg = [0], 1.0
    alignment = (alignment_captions(args, conditioner, conditions) if getattr(args, "eval_alignment", False)
                 else None)
    decode = LatentDecoder(load_tokenizer(args.tokenizer, device=device), dataset.latent_mean, dataset.latent_std)
    return TrainingEvaluator(objective, conditioner, decode, conditions, latent_shape, device, reference, inception,
                             num_samples=args.eval_num_samples, batch_size=args.eval_batch_size,
                             num_steps=args.eval_steps, sampler=args.eval_sampler, cfg_scale=cfg, seed=args.seed,
                             interval=(getattr(args, "guidance_low", 0.0), getattr(args, "guidance_high", 1.0)),
                             alignment=alignment)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m omegadit.evaluation_during_training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="FID reference statistics (mu, sigma) of a folder or .npz of images")
    prep.add_argument("images", help="folder of images (subfolders searched) or an ADM .npz (arr_0)")
    prep.add_argument("out", help="output .npz")
    prep.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth")
    prep.add_argument("--num-images", type=int, default=None, help="use the first N images (sorted by path)")
    prep.add_argument("--batch-size", type=int, default=64)
    prep.add_argument("--device", default=None)
    args = p.parse_args(argv)
    out = prepare(args.images, args.out, args.inception_weights, args.batch_size, args.num_images, args.device)
    with np.load(out) as data:
        print(f"wrote {out}: FID statistics of {int(data['num_images'])} images")


if __name__ == "__main__":
    main()
