"""Issue 19 in one command on one GPU: start-up, training step, FP8, SiT-XL/1 memory and generate.py warm-up.

    python benchmarks/bench_issue19.py --out issue19.json      # at most 9.5 minutes (--budget) on one H100

Sections (each in a child process of its own, so that start-up is timed from a real launch and one failure or
time-out does not hide the other numbers; `--only` picks some):
- startup_{model,regional}_{cold,warm}: SiT-B/1 training with DINOv2-B/14 REPA targets and CLIP-L caption tokens
  computed in every step (batch 256, bf16, train.py's `forward_backward` and `optimizer_step`, path drop on as in
  training; the two encoders loaded from random-weight files as train.py loads the released ones), the three
  networks compiled whole or regionally, with an empty compile cache and again with the
  cache the first launch filled: seconds from launch to the first step and to the first steady step (every later
  step within 2x of the steady step time), steady img/s of the full step, peak memory;
- step_fused_vs_plain: steady img/s of the SiT-only step compiled whole and regionally with the attention of this
  checkout (q and k rotated in one pass), and regionally with the plain one it replaced (q, k, v split, each
  rotated on its own), alternated;
- fp8: the same step with the blocks' linears in FP8 (omegadit/fp8.py, needs torchao), and its numerics against
  float32 next to those of bf16;
- xl_ckpt: SiT-XL/1, batch 256, gradient checkpointing, regional compile: img/s and peak memory;
- generate_{cold,warm}: generate.py on a random-weight class-conditional SiT-B/1 checkpoint (pixel:4 latents,
  48x16x16), 3 batches of 256, 50-step SDE with CFG 4 and path drop: warm-up = seconds from launch to the first
  batch's images less one steady batch, cold and warm compile cache; generate_fp8: the same with --fp8 (its own
  compile), for its steady img/s;
- cuda_graphs: steady img/s without and with CUDA graphs (`train.py --cuda-graphs`) of the SiT-B/1 step compiled
  whole and of the gpu demo's step compiled regionally;
- demo_step: the gpu demo's training step (SiT-B/2, 64 px pixel latents, MiniLM-width captions, no REPA) without
  data loading or text encoding, eager and compiled regionally, batch 256 and 512: what its s/step would be if
  the GPU were the limit.
Random weights of the real sizes, data already on the GPU, no network, no diffusers. `--smoke` runs every section
with a tiny model, eagerly, on CPU (a check of the script itself, not a measurement).
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from models.pos_embed import apply_rope  # noqa: E402
from models.sit import Attention  # noqa: E402

LATENT = (32, 16, 16)
TEXT = (77, 768)
DEMO = dict(latent=(48, 16, 16), text=(16, 384), z_dim=None)  # the gpu demo: pixel:4 at 64 px, MiniLM, no REPA
RECIPE = Namespace(gradient_accumulation_steps=1, max_grad_norm=1.0, ema_decay=0.9999, ema_warmup=False)
SMOKE = dict(model="SiT-T/1", batch=4, latent=(4, 8, 8), text=(5, 16), z_dim=16, steps=4)
SECTIONS = ("startup_model_cold", "startup_model_warm", "startup_regional_cold", "startup_regional_warm",
            "step_fused_vs_plain", "xl_ckpt", "generate_cold", "generate_warm", "generate_fp8", "fp8", "demo_step",
            "cuda_graphs")


# ------------------------------------------------------------------------------------------------------------------
# Children: one training-step measurement each
# ------------------------------------------------------------------------------------------------------------------

def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_step(model_name, batch, compile_mode, checkpointing=False, fp8=False, smoke=False, seed=0, shapes=None,
               encoders=None, cuda_graphs=False):
    """A closure running one SiT training step, and the model. REPA targets and caption embeddings are given, or
    with `encoders` (a folder of `write_encoder_weights`) computed in each step by DINOv2-B/14 and a CLIP-L text
    model, loaded and compiled as train.py loads and compiles them. shapes: dict(latent, text, z_dim) (z_dim None:
    no REPA), default SiT-B/1's; cuda_graphs: the compiled backbone replayed as CUDA graphs (train.py
    --cuda-graphs)."""
    from accelerate import Accelerator

    from loss import TrainingLoss
    from models import BACKBONES
    from omegadit.compilation import mark_step
    from omegadit.objectives.auxiliary import ContrastiveFlowMatching, RepaLoss
    from omegadit.objectives.flow import FlowMatching
    from train import compile_for_training, forward_backward, optimizer_step
    from utils import lr_lambda

    shapes = SMOKE if smoke else (shapes or dict(latent=LATENT, text=TEXT, z_dim=768))
    latent, text, z_dim = shapes["latent"], shapes["text"], shapes["z_dim"]
    z_dims = [] if z_dim is None else [z_dim]
    torch.manual_seed(seed)
    accelerator = Accelerator(mixed_precision="no" if smoke else "bf16", cpu=smoke)

    model = BACKBONES.get(model_name)(input_size=latent[1], in_channels=latent[0], text_dim=text[1],
                                      text_len=text[0], z_dims=z_dims)
    model.set_gradient_checkpointing(checkpointing)
    ema = copy.deepcopy(model).to(device()).eval().requires_grad_(False)  # as train.py makes it
    if fp8:
        from omegadit.fp8 import convert_blocks_to_float8
        convert_blocks_to_float8(model)
    if compile_mode != "eager":
        compile_for_training(model, [], compile_mode, cuda_graphs)
    model.to(device()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5,
                                  fused=device().type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 0, 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = TrainingLoss(FlowMatching(time_shifting=True), {"proj": (RepaLoss(), 0.5),
                                                              "cfm": (ContrastiveFlowMatching(), 0.05)})
    latents = torch.randn(batch, *latent, device=device())
    y = torch.randn(batch, *text, device=device())
    tokens = (latent[1] // model.patch_size) * (latent[2] // model.patch_size)
    zs = [torch.randn(batch, tokens, z, device=device()) for z in z_dims]

    if encoders:
        compute_conditions = frozen_encoders(batch, compile_mode, accelerator, encoders)
    else:
        def compute_conditions():
            return y, zs

    def step():
        y, zs = compute_conditions()
        mark_step(cuda_graphs)
        forward_backward(accelerator, model, loss_fn, latents, dict(y=y), zs, RECIPE)
        optimizer_step(accelerator, model, ema, optimizer, scheduler, RECIPE, 0)
    return step, accelerator.unwrap_model(model)


def frozen_encoders(batch, compile_mode, accelerator, weights):
    """() -> (caption tokens of CLIP-L text, [DINOv2-B/14 features]) for random 256 px images and token ids, as
    train.py's `next_micro_batch` computes them; both networks loaded from `weights` (`write_encoder_weights`) and
    compiled as train.py loads and compiles its frozen encoders."""
    from models.repa_encoders import load_repa_encoders
    from omegadit.compilation import compile_frozen
    from prepare_gpu_run import clip_l_text

    [dino] = load_repa_encoders("dinov2-vit-b", 256, device=device(), weights=Path(weights) / "dinov2-b.safetensors")
    clip = clip_l_text(Path(weights) / "clip-l").to(device()).eval().requires_grad_(False)
    if compile_mode != "eager":
        compile_frozen(dino.model, compile_mode)
        compile_frozen(clip, compile_mode)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device())
    token_ids = torch.randint(0, 49408, (batch, TEXT[0]), device=device())

    def compute():
        with torch.no_grad(), accelerator.autocast():
            return clip(token_ids, output_hidden_states=True).hidden_states[-2], [dino(images)]
    return compute


def write_encoder_weights(folder: Path):
    """Random DINOv2-B/14 and CLIP-L text weights in the layouts train.py reads (prepare_gpu_run.py's), written once,
    so that the start-up sections load them as train.py loads the released ones."""
    from prepare_gpu_run import write_random_encoders

    if not (folder / "dinov2-b.safetensors").is_file():
        write_random_encoders(folder)


def steady_summary(stamps, start, batch):
    """From the end times of consecutive steps: launch -> first step, launch -> first steady step, steady img/s."""
    durations = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    steady = statistics.median(durations[len(durations) // 2:])
    first_steady = next(i for i in range(len(durations)) if max(durations[i:]) <= 2 * steady or i == len(durations) - 1)
    return dict(first_step_s=stamps[0] - start, first_steady_s=stamps[first_steady] - start,
                first_steady_index=first_steady, steady_img_s=batch / steady, steps=len(durations))


def child_startup(args):
    """Launch -> steady steps of SiT-B/1 training with DINOv2-B and CLIP-L text (the full step of train.py),
    compiled `--compile-mode` with the compile cache `--cache`."""
    from torch._dynamo.utils import counters

    from omegadit.compilation import use_compile_cache

    use_compile_cache(args.cache)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    imported = time.time()
    batch = SMOKE["batch"] if args.smoke else 256
    step, _ = build_step(SMOKE["model"] if args.smoke else "SiT-B/1", batch, args.compile_mode, smoke=args.smoke,
                         encoders=None if args.smoke else args.weights)
    built = time.time()
    stamps = []
    for _ in range(SMOKE["steps"] if args.smoke else 25):
        step()
        sync()
        stamps.append(time.time())
    result = steady_summary(stamps, args.launched_at, batch)
    result.update(imports_s=imported - args.launched_at, built_s=built - args.launched_at,
                  graphs=counters["stats"]["unique_graphs"], **peak_memory())
    return result


def timed_steps(step, iters):
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - start) / iters


def child_step_ab(args):
    """Steady img/s of the SiT-B/1 step (SiT only): compiled whole with this checkout's attention, and compiled
    regionally with this checkout's attention and with the plain one, alternated three times."""
    from omegadit.compilation import use_compile_cache

    use_compile_cache(args.cache)
    torch.backends.cuda.matmul.allow_tf32 = True
    batch = SMOKE["batch"] if args.smoke else 256
    steps = {}
    for name, mode in (("model_fused", "model"), ("regional_fused", "regional"), ("regional_plain", "regional")):
        steps[name], model = build_step(SMOKE["model"] if args.smoke else "SiT-B/1", batch,
                                        "eager" if args.smoke else mode, smoke=args.smoke)
        if name.endswith("plain"):  # a class of its own: Dynamo guards on the module's type, each keeps its graph
            for block in model.blocks:
                block.attn.__class__ = PlainAttention
        timed_steps(steps[name], 2 if args.smoke else 15)  # path drop first fires at step 12: both graphs compiled
    seconds = {name: [] for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            seconds[name].append(timed_steps(step, 2 if args.smoke else 15))
    result = {f"{name}_img_s": batch / statistics.median(s) for name, s in seconds.items()}
    result["fused_gain"] = result["regional_fused_img_s"] / result["regional_plain_img_s"] - 1
    result["regional_vs_model"] = result["regional_fused_img_s"] / result["model_fused_img_s"] - 1
    return result


def child_graphs(args):
    """Steady img/s without and then with CUDA graphs (train.py --cuda-graphs), each the median of three timings:
    the SiT-B/1 step (SiT only) compiled whole, and the gpu demo's step (SiT-B/2 on 48x16x16 pixel latents, 16
    MiniLM-width caption tokens, no REPA) compiled regionally as the demo compiles it. One step at a time holds
    the GPU's memory (a graph's memory pool stays reserved until the compiled code is reset)."""
    import gc

    from omegadit.compilation import use_compile_cache

    use_compile_cache(args.cache)
    torch.backends.cuda.matmul.allow_tf32 = True
    batch = SMOKE["batch"] if args.smoke else 256
    cases = [("sit_b1_model", "SiT-B/1", "model", None), ("demo_regional", "SiT-B/2", "regional", DEMO)]
    result = {}
    for name, model_name, mode, shapes in cases:
        for graphs in (False, True):
            step, model = build_step(SMOKE["model"] if args.smoke else model_name, batch,
                                     "eager" if args.smoke else mode, smoke=args.smoke, shapes=shapes,
                                     cuda_graphs=graphs and not args.smoke)
            timed_steps(step, 2 if args.smoke else 15)  # path drop first fires at step 12
            seconds = [timed_steps(step, 2 if args.smoke else 20) for _ in range(3)]
            result[f"{name}{'_graphs' if graphs else ''}_img_s"] = batch / statistics.median(seconds)
            del step, model
            torch.compiler.reset()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return result


class PlainAttention(Attention):
    """SiT attention before the fused q/k RoPE (commit de05776), for the A/B above."""

    def forward(self, x, rope_cos, rope_sin):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, rope_cos, rope_sin).to(v.dtype)
        k = apply_rope(k, rope_cos, rope_sin).to(v.dtype)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


def child_fp8(args):
    """FP8 step img/s (regional compile) and FP8/bf16 numerics against float32 eager."""
    from omegadit.compilation import use_compile_cache

    use_compile_cache(args.cache)
    torch.backends.cuda.matmul.allow_tf32 = True
    batch = SMOKE["batch"] if args.smoke else 256
    model_name = SMOKE["model"] if args.smoke else "SiT-B/1"
    step, _ = build_step(model_name, batch, "eager" if args.smoke else "regional", fp8=True, smoke=args.smoke)
    timed_steps(step, 2 if args.smoke else 15)
    result = dict(fp8_img_s=batch / statistics.median(timed_steps(step, 2 if args.smoke else 20) for _ in range(3)))
    result.update(fp8_numerics(model_name, args.smoke))
    return result


def fp8_numerics(model_name, smoke, batch=16):
    """Relative errors of the velocity and of the blocks' gradients, bf16 and bf16 + FP8, against float32 (same
    weights, eager)."""
    from models import BACKBONES
    from omegadit.fp8 import convert_blocks_to_float8

    latent, text, z_dim = (SMOKE["latent"], SMOKE["text"], SMOKE["z_dim"]) if smoke else (LATENT, TEXT, 768)
    torch.manual_seed(0)
    reference = BACKBONES.get(model_name)(input_size=latent[1], in_channels=latent[0], text_dim=text[1],
                                          text_len=text[0], z_dims=[z_dim]).to(device()).train()
    reference.path_drop_prob = 0.0
    with torch.no_grad():  # weights of unit gain, so that the blocks (where FP8 acts) shape the output
        for p in reference.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    x = torch.randn(batch, *latent, device=device())
    t = torch.rand(batch, device=device())
    y = torch.randn(batch, *text, device=device())

    def run(model, bf16):
        model.zero_grad()
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=bf16):
            velocity, _ = model(x, t, y)
        velocity.float().square().mean().backward()
        return velocity.float(), torch.cat([p.grad.flatten() for p in model.blocks.parameters()])

    import copy
    fp8 = copy.deepcopy(reference)
    convert_blocks_to_float8(fp8)
    torch.backends.cuda.matmul.allow_tf32 = False
    v32, g32 = run(reference, False)
    torch.backends.cuda.matmul.allow_tf32 = True
    v16, g16 = run(reference, True)
    v8, g8 = run(fp8, True)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    return dict(bf16_velocity_rel_err=rel(v16, v32), bf16_grad_rel_err=rel(g16, g32),
                fp8_velocity_rel_err=rel(v8, v32), fp8_grad_rel_err=rel(g8, g32))


def child_xl(args):
    """SiT-XL/1, batch 256, gradient checkpointing, regional compile: img/s and peak memory."""
    from omegadit.compilation import use_compile_cache

    use_compile_cache(args.cache)
    torch.backends.cuda.matmul.allow_tf32 = True
    batch = SMOKE["batch"] if args.smoke else 256
    step, _ = build_step(SMOKE["model"] if args.smoke else "SiT-XL/1", batch, "eager" if args.smoke else "regional",
                         checkpointing=True, smoke=args.smoke)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    timed_steps(step, 1 if args.smoke else 4)
    return dict(img_s=batch / timed_steps(step, 2 if args.smoke else 6), **peak_memory())


def child_demo_step(args):
    """The gpu demo's training step (SiT-B/2 on 48x16x16 pixel latents, 16 MiniLM tokens, no REPA),
    eager and compiled regionally, without data loading and text encoding: img/s at batch 256 and 512."""
    from omegadit.compilation import use_compile_cache

    use_compile_cache(args.cache)
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {}
    for mode in ("eager",) if args.smoke else ("eager", "regional"):
        for batch in ((SMOKE["batch"],) if args.smoke else (256, 512)):
            step, _ = build_step(SMOKE["model"] if args.smoke else "SiT-B/2", batch, mode, smoke=args.smoke,
                                 shapes=DEMO)
            timed_steps(step, 2 if args.smoke else 15)
            result[f"{mode}_b{batch}_img_s"] = batch / timed_steps(step, 2 if args.smoke else 30)
    return result


def peak_memory():
    if not torch.cuda.is_available():
        return {}
    return dict(peak_gb=torch.cuda.max_memory_allocated() / 1e9,
                total_gb=torch.cuda.get_device_properties(0).total_memory / 1e9)


CHILDREN = {"startup": child_startup, "step_ab": child_step_ab, "fp8": child_fp8, "xl": child_xl,
            "demo_step": child_demo_step, "graphs": child_graphs}


# ------------------------------------------------------------------------------------------------------------------
# generate.py warm-up
# ------------------------------------------------------------------------------------------------------------------

def write_generate_checkpoint(path, smoke):
    """A random-weight class-conditional SiT (pixel:4 latents of 64 px images) as a self-describing checkpoint."""
    from models import BACKBONES
    from omegadit import checkpoint
    from omegadit.conditioners import ClassConditioner
    from omegadit.objectives.flow import FlowMatching

    model_name, size = ("SiT-T/2", 8) if smoke else ("SiT-B/1", 16)
    model = BACKBONES.get(model_name)(input_size=size, in_channels=48, num_classes=24, z_dims=[])
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    stats = (torch.zeros(48, 1, 1), torch.ones(48, 1, 1))
    description = checkpoint.describe(model_name, model, FlowMatching(time_shifting=True), ClassConditioner(24),
                                      "pixel:4", stats, {"sampler": "sde"})
    checkpoint.save_weights(path, model.state_dict(), description)


def generate_warmup(ckpt, cache, out, name, timeout, smoke, extra=()):
    """Run generate.py (with `extra` flags); warm-up = launch -> first batch's images, less one steady batch (from
    the images' times)."""
    batch, batches = (4, 2) if smoke else (256, 3)
    command = [sys.executable, "generate.py", "--ckpt", str(ckpt), "--no-ema", "--sample-dir", str(out), "--name",
               name, "--num-fid-samples", str(batch * batches), "--per-proc-batch-size", str(batch),
               "--num-steps", "2" if smoke else "50", "--cfg-scale", "4", "--path-drop", "--mode", "sde",
               "--compile-cache", str(cache), *(["--no-compile"] if smoke else []), *extra]
    launched = time.time()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=child_env(), timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"generate.py failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    wall = time.time() - launched
    ends = [max((out / name / f"{i:06d}.png").stat().st_mtime for i in range(b * batch, (b + 1) * batch))
            for b in range(batches)]
    per_batch = (ends[-1] - ends[0]) / (batches - 1)
    return dict(warmup_s=ends[0] - launched - per_batch, first_batch_s=ends[0] - launched, steady_batch_s=per_batch,
                img_s=batch / per_batch, wall_s=wall)


# ------------------------------------------------------------------------------------------------------------------
# The parent: run the sections, print the table
# ------------------------------------------------------------------------------------------------------------------

def child_env():
    """The children's environment: offline, and no compile cache folder but the one each section names."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    return {**env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_child(kind, extra, timeout, smoke):
    """Run one child section; returns its result dict (or {'error': ...})."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *extra,
               *(["--smoke"] if smoke else []), "--launched-at", repr(time.time())]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-1500:]}"}
    return json.loads(lines[-1][len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="write every number as JSON here")
    p.add_argument("--only", default="", help=f"comma separated sections (default: all): {', '.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=560,
                   help="seconds for all sections: a section gets at most what is left, and none starts with < 20 s")
    p.add_argument("--workdir", default=None, help="compile caches and samples (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny model, eager, CPU: checks the script, measures nothing")
    p.add_argument("--child", default=None, choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--compile-mode", default="regional", help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--launched-at", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(CHILDREN[args.child](args)), flush=True)
        return
    started = time.time()
    only = set(filter(None, args.only.split(",")))
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_issue19_"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "torch": torch.__version__}

    def startup(mode, cache):
        def run(limit):
            if not args.smoke:
                write_encoder_weights(work / "weights")
            return run_child("startup", ["--compile-mode", "eager" if args.smoke else mode, "--cache",
                                         str(work / cache), "--weights", str(work / "weights")], limit, args.smoke)
        return run

    def child(kind, cache="cache_regional"):
        return lambda t: run_child(kind, ["--cache", str(work / cache)], t, args.smoke)

    plan = [  # (section, time limit in seconds, run(time limit) -> result)
        ("startup_model_cold", 200, startup("model", "cache_model")),
        ("startup_model_warm", 90, startup("model", "cache_model")),
        ("startup_regional_cold", 90, startup("regional", "cache_regional")),
        ("startup_regional_warm", 60, startup("regional", "cache_regional")),
        ("step_fused_vs_plain", 150, child("step_ab", "cache_model")),  # the whole-model graphs are warm there
        ("xl_ckpt", 120, child("xl")),
        ("generate_cold", 120, lambda t: generate_section(work, "cold", t, args.smoke)),
        ("generate_warm", 60, lambda t: generate_section(work, "warm", t, args.smoke)),
        ("generate_fp8", 120, lambda t: generate_section(work, "fp8", t, args.smoke,
                                                         ["--fp8", "--mixed-precision", "bf16"])),
        ("fp8", 150, child("fp8") if torchao_installed() else
         lambda t: {"error": "skipped: torchao is not installed (pip install torchao; see omegadit/fp8.py)"}),
        ("demo_step", 90, child("demo_step")),
        ("cuda_graphs", 300, child("graphs", "cache_model")),
    ]
    for name, limit, run in plan:
        if only and name not in only:
            continue
        left = args.budget - (time.time() - started)
        if left < 20:
            results[name] = {"error": f"skipped: {left:.0f}s of the --budget left"}
        else:
            section_start = time.time()
            try:
                results[name] = run(min(limit, left))
            except Exception as error:  # one failing section must not hide the others' numbers
                results[name] = {"error": repr(error)[-1500:]}
            results[name]["section_s"] = round(time.time() - section_start, 1)
        print(name, json.dumps(results[name]), flush=True)
        if args.out:  # after every section, so that a killed run leaves the numbers it has
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    results["total_s"] = time.time() - started
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def generate_section(work, which, timeout, smoke, extra=()):
    ckpt = work / "generate_ckpt.safetensors"
    if not ckpt.exists():
        write_generate_checkpoint(ckpt, smoke)
    return generate_warmup(ckpt, work / "cache_generate", work / "samples", which, timeout, smoke, extra)


def torchao_installed():
    import importlib.util
    return importlib.util.find_spec("torchao") is not None


def print_table(results):
    def get(section, key, fmt="{:.1f}"):
        value = results.get(section, {}).get(key)
        return fmt.format(value) if isinstance(value, (int, float)) else "-"

    print(f"\n{results['device']}, torch {results['torch']}, {results['total_s']:.0f} s in all")
    print("| start-up, SiT-B/1 training, batch 256 | launch -> first step s | launch -> first steady step s | "
          "steady img/s | peak GB | graphs |\n| --- | --- | --- | --- | --- | --- |")
    for mode in ("model", "regional"):
        for cache in ("cold", "warm"):
            name = f"startup_{mode}_{cache}"
            print(f"| {mode}, {cache} cache | {get(name, 'first_step_s')} | {get(name, 'first_steady_s')} | "
                  f"{get(name, 'steady_img_s')} | {get(name, 'peak_gb')} | {get(name, 'graphs', '{}')} |")
    print("\n| what | value |\n| --- | --- |")
    rows = [("SiT step, whole-model compile, fused q/k RoPE img/s", "step_fused_vs_plain", "model_fused_img_s"),
            ("SiT step, regional compile, fused q/k RoPE img/s", "step_fused_vs_plain", "regional_fused_img_s"),
            ("SiT step, regional compile, plain attention img/s", "step_fused_vs_plain", "regional_plain_img_s"),
            ("step, FP8 (torchao) img/s", "fp8", "fp8_img_s"),
            ("FP8 velocity rel. err vs fp32", "fp8", "fp8_velocity_rel_err"),
            ("bf16 velocity rel. err vs fp32", "fp8", "bf16_velocity_rel_err"),
            ("FP8 block-gradient rel. err vs fp32", "fp8", "fp8_grad_rel_err"),
            ("bf16 block-gradient rel. err vs fp32", "fp8", "bf16_grad_rel_err"),
            ("SiT-XL/1 b256 ckpt img/s", "xl_ckpt", "img_s"),
            ("SiT-XL/1 b256 ckpt peak GB", "xl_ckpt", "peak_gb"),
            ("generate.py warm-up s, cold cache", "generate_cold", "warmup_s"),
            ("generate.py warm-up s, warm cache", "generate_warm", "warmup_s"),
            ("generate.py SDE-50 CFG path drop img/s", "generate_warm", "img_s"),
            ("generate.py --fp8 SDE-50 CFG path drop img/s", "generate_fp8", "img_s"),
            ("demo step (SiT-B/2, 64 px), eager, b256 img/s", "demo_step", "eager_b256_img_s"),
            ("demo step (SiT-B/2, 64 px), eager, b512 img/s", "demo_step", "eager_b512_img_s"),
            ("demo step (SiT-B/2, 64 px), regional, b256 img/s", "demo_step", "regional_b256_img_s"),
            ("demo step (SiT-B/2, 64 px), regional, b512 img/s", "demo_step", "regional_b512_img_s"),
            ("SiT-B/1 step, whole model img/s", "cuda_graphs", "sit_b1_model_img_s"),
            ("SiT-B/1 step, whole model + CUDA graphs img/s", "cuda_graphs", "sit_b1_model_graphs_img_s"),
            ("demo step, regional img/s", "cuda_graphs", "demo_regional_img_s"),
            ("demo step, regional + CUDA graphs img/s", "cuda_graphs", "demo_regional_graphs_img_s")]
    for label, section, key in rows:
        print(f"| {label} | {get(section, key, '{:.4g}')} |")
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    for name, error in errors.items():
        print(f"{name}: {error.splitlines()[-1] if error else error}")


if __name__ == "__main__":
    main()
