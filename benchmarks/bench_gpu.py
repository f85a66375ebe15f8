"""Training-step and sampler throughput, model FLOPs and peak memory on one GPU, with random weights of real sizes.

    python benchmarks/bench_gpu.py --out bench.json

SiT-B/1 for 16x16x32 latents and 77x768 caption tokens; DINOv2 ViT-B/14 (timm) and a CLIP-L/14 text model
(transformers config) with random weights; data already on the GPU. The training step is train.py's own
`forward_backward` + `optimizer_step`; sampling is samplers.py. Prints one table at the end.
"""
import argparse
import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loss import TrainingLoss
from models.repa_encoders import build_repa_encoder
from models.sit import SiT_models
from omegadit.objectives.auxiliary import ContrastiveFlowMatching, RepaLoss
from omegadit.objectives.flow import FlowMatching
from samplers import FLOW_SAMPLERS
from train import compile_for_training, forward_backward, optimizer_step
from utils import lr_lambda

LATENT = (32, 16, 16)
TEXT = (77, 768)
RESOLUTION = 256
RECIPE = Namespace(gradient_accumulation_steps=1, max_grad_norm=1.0, ema_decay=0.9999, ema_warmup=False)


def timed(fn, warmup, iters):
    """Median-free simple timing: warm up, then wall time of `iters` calls between device synchronisations."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def build_sit(compile_mode, checkpointing=False):
    """SiT-B/1 on the GPU; compile_mode: False (eager), 'blocks' (each block compiled) or 'model' (whole forward)."""
    model = SiT_models["SiT-B/1"](input_size=LATENT[1], in_channels=LATENT[0], text_dim=TEXT[1], z_dims=[768])
    model.set_gradient_checkpointing(checkpointing)
    if compile_mode == "model":
        compile_for_training(model, [], "model")
    elif compile_mode:
        for block in model.blocks:
            block.compile()
    return model.cuda().train()


def build_clip_text():
    from prepare_gpu_run import clip_l_text

    return clip_l_text().cuda().eval().requires_grad_(False)


def training_setup(compile_mode, checkpointing=False):
    accelerator = Accelerator(mixed_precision="bf16")
    model = build_sit(compile_mode, checkpointing)
    ema = build_sit(False).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 0, 1))
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = TrainingLoss(FlowMatching(time_shifting=True), {"proj": (RepaLoss(), 0.5),
                                                              "cfm": (ContrastiveFlowMatching(), 0.05)})
    return accelerator, model, ema, optimizer, scheduler, loss_fn


def sit_training_step(batch, compile_mode, checkpointing=False):
    """A closure running one SiT-only training step (REPA features and caption embeddings given)."""
    accelerator, model, ema, optimizer, scheduler, loss_fn = training_setup(compile_mode, checkpointing)
    latents = torch.randn(batch, *LATENT, device="cuda")
    y = torch.randn(batch, *TEXT, device="cuda")
    zs = [torch.randn(batch, 256, 768, device="cuda")]

    def step():
        forward_backward(accelerator, model, loss_fn, latents, dict(y=y), zs, RECIPE)
        optimizer_step(accelerator, model, ema, optimizer, scheduler, RECIPE, 0)
    return step


def sit_step_bench(batch, compile_mode, checkpointing=False, warmup=5, iters=20):
    step = sit_training_step(batch, compile_mode, checkpointing)
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, warmup + (10 if compile_mode else 0), iters)
    return dict(img_s=batch / seconds, step_ms=seconds * 1e3, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


def full_step_bench(batch, compile_mode, checkpointing=False, warmup=5, iters=20, compile_encoders=False,
                    cached_text=False):
    """DINOv2-B features and CLIP-L caption tokens computed in every step, then the SiT step; with `cached_text` the
    caption tokens are given instead (train.py --text-emb-dir), and only DINOv2 runs."""
    accelerator, model, ema, optimizer, scheduler, loss_fn = training_setup(compile_mode, checkpointing)
    dino = build_repa_encoder("dinov2-vit-b", resolution=RESOLUTION, pretrained=False).cuda()
    clip = None if cached_text else build_clip_text()
    if compile_encoders:
        dino.compile()
        if clip is not None:
            clip.compile()
    images = torch.randint(0, 256, (batch, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8, device="cuda")
    token_ids = torch.randint(0, 49408, (batch, TEXT[0]), device="cuda")
    caption_tokens = torch.randn(batch, *TEXT, device="cuda")
    latents = torch.randn(batch, *LATENT, device="cuda")

    def step():
        with torch.no_grad(), accelerator.autocast():
            zs = [dino(images)]
            y = caption_tokens if clip is None else clip(token_ids, output_hidden_states=True).hidden_states[-2]
        forward_backward(accelerator, model, loss_fn, latents, dict(y=y), zs, RECIPE)
        optimizer_step(accelerator, model, ema, optimizer, scheduler, RECIPE, 0)

    torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, warmup + (10 if compile_mode else 0), iters)
    return dict(img_s=batch / seconds, step_ms=seconds * 1e3, peak_gb=torch.cuda.max_memory_allocated() / 1e9)


def model_flops_per_image(batch=8):
    """Forward + backward FLOPs of SiT-B/1 per image, counted by torch's FlopCounterMode."""
    model = build_sit(False)
    latents = torch.randn(batch, *LATENT, device="cuda")
    t = torch.rand(batch, device="cuda")
    y = torch.randn(batch, *TEXT, device="cuda")
    counter = FlopCounterMode(display=False)
    with counter:
        out, aux = model(latents, t, y)
        (out.square().mean() + aux["repa"][0].square().mean()).backward()
    return counter.get_total_flops() / batch


def sampling_bench(mode, batch, bf16, compile_mode, steps=50, cfg=4.0):
    model = build_sit(compile_mode).eval()
    noise = torch.randn(batch, *LATENT, device="cuda")
    y = torch.randn(batch, *TEXT, device="cuda")
    y_null = model.null_condition(batch, "cuda")

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            FLOW_SAMPLERS[mode](model, noise, y, num_steps=steps, cfg_scale=cfg, y_null=y_null, time_shifting=True,
                           generator=torch.Generator("cuda").manual_seed(0))

    seconds = timed(run, 2, 3)
    return dict(img_s=batch / seconds, seconds=seconds)


def profile_step(batch, top=15):
    """Top CUDA kernels of a compiled training step (SiT only), as a table and as (name, share) rows."""
    from torch.profiler import ProfilerActivity, profile

    step = sit_training_step(batch, "model")
    timed(step, 12, 1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    table = [(e.key[:90], round(100 * e.self_device_time_total / total, 1)) for e in rows]
    for name, share in table:
        print(f"  {share:5.1f}%  {name}")
    return dict(top_kernels=table, gpu_ms_per_step=total / 3 / 1e3)


def numerics_check(batch=16):
    """Relative error of the fast path (bf16 autocast, compiled blocks) against float32 eager, same weights."""
    torch.manual_seed(0)
    reference = build_sit(False)
    with torch.no_grad():
        for p in reference.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    fast = build_sit("model")
    fast.load_state_dict(reference.state_dict())
    for m in (reference, fast):
        m.path_drop_prob = 0.0
    latents = torch.randn(batch, *LATENT, device="cuda")
    t = torch.rand(batch, device="cuda")
    y = torch.randn(batch, *TEXT, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    out_ref, _ = reference(latents, t, y)
    out_ref.square().mean().backward()
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_fast, _ = fast(latents, t, y)
    out_fast.float().square().mean().backward()
    grads = lambda m: torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                 for p in m.parameters() if p.requires_grad])
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    return dict(velocity_rel_err=rel(out_fast, out_ref), grad_rel_err=rel(grads(fast), grads(reference)))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--only", default="", help="comma separated sections to run (default: all)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    only = set(filter(None, args.only.split(",")))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch}

    def record(name, fn):
        if only and name not in only:
            return
        torch.cuda.empty_cache()
        try:
            results[name] = fn()
        except Exception as error:  # one failing section must not hide the others' numbers
            results[name] = {"error": repr(error)}
        print(name, json.dumps(results[name]), flush=True)

    record("numerics", numerics_check)
    record("flops", lambda: dict(gflop_per_image=model_flops_per_image() / 1e9))
    record("sit_step_eager", lambda: sit_step_bench(args.batch, False))
    record("sit_step_compiled_blocks", lambda: sit_step_bench(args.batch, "blocks"))
    record("sit_step_compiled_model", lambda: sit_step_bench(args.batch, "model"))
    record("full_step_compiled_model", lambda: full_step_bench(args.batch, "model"))
    record("full_step_compiled_all", lambda: full_step_bench(args.batch, "model", compile_encoders=True))
    record("full_step_cached_text", lambda: full_step_bench(args.batch, "model", compile_encoders=True,
                                                            cached_text=True))
    record("full_step_ckpt_1024", lambda: full_step_bench(1024, "model", checkpointing=True, warmup=2, iters=5,
                                                                compile_encoders=True))
    record("sample_sde_fp32_b64", lambda: sampling_bench("sde", 64, False, False))
    record("sample_sde_bf16_b64", lambda: sampling_bench("sde", 64, True, False))
    record("sample_sde_bf16_compiled_model_b64", lambda: sampling_bench("sde", 64, True, "model"))
    record("sample_sde_bf16_compiled_model_b256", lambda: sampling_bench("sde", 256, True, "model"))
    record("sample_ode_euler_bf16_compiled_model_b256", lambda: sampling_bench("euler", 256, True, "model"))
    record("profile_sit_step", lambda: profile_step(args.batch))

    flops = results.get("flops", {}).get("gflop_per_image")
    print("\n| what | img/s | TFLOP/s | peak GB |\n| --- | --- | --- | --- |")
    for name, value in results.items():
        if isinstance(value, dict) and "img_s" in value:
            tflops = f"{value['img_s'] * flops / 1e3:.0f}" if flops and "step" in name else ""
            print(f"| {name} | {value['img_s']:.1f} | {tflops} | {value.get('peak_gb', float('nan')):.1f} |")
    if "numerics" in results:
        print(f"numerics (bf16+compile vs fp32): {results['numerics']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
