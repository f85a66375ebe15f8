"""What train.py --fsdp costs on one GPU, and the largest SiT at /1 it trains at batch 256 there.

    python benchmarks/bench_fsdp.py --out bench_fsdp.json

Cases (`--only` picks some): SiT-B/1 at batch 256 trained three ways, with train.py's own parts
(`forward_backward`, `optimizer_step`, `shard_for_training`, torch.compile as train.py applies it):
  plain_B1   one process, no wrapper (what train.py does on one GPU without --fsdp)
  ddp_B1     DistributedDataParallel in a one-process group
  fsdp_B1    FSDP2 per block in a one-process group (train.py --fsdp), bf16 parameters
and SiT-L/1, SiT-XL/1 at batch 256 with FSDP + gradient checkpointing (fsdp_gc_L1, fsdp_gc_XL1). Random weights,
16x16x32 latents with 77x768 caption tokens and REPA features as in bench_gpu.py, data already on the device, bf16,
fused AdamW, clipping, EMA. No network: nothing is downloaded. Prints one table at the end.
"""
import argparse
import gc
import json
import sys
import time
from argparse import Namespace
from copy import deepcopy
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loss import TrainingLoss
from models.sit import SiT_models
from omegadit import sharding
from omegadit.objectives.auxiliary import ContrastiveFlowMatching, RepaLoss
from omegadit.objectives.flow import FlowMatching
from train import compile_for_training, forward_backward, optimizer_step, shard_for_training
from utils import lr_lambda

LATENT = (32, 16, 16)
TEXT = (77, 768)
REPA = (256, 768)
CASES = {  # name: (model, mode, gradient checkpointing)
    "plain_B1": ("SiT-B/1", "plain", False),
    "ddp_B1": ("SiT-B/1", "ddp", False),
    "fsdp_B1": ("SiT-B/1", "fsdp", False),
    "fsdp_gc_L1": ("SiT-L/1", "fsdp", True),
    "fsdp_gc_XL1": ("SiT-XL/1", "fsdp", True),
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(model_name, mode, checkpointing, batch, device, mixed_precision, compile_model, latent=LATENT,
               text=TEXT, repa=REPA):
    """A closure running one train.py training step of `model_name` wrapped as `mode` ('plain', 'ddp', 'fsdp')."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    model = SiT_models[model_name](input_size=latent[1], in_channels=latent[0], text_dim=text[1], text_len=text[0],
                                   z_dims=[repa[1]])
    model.set_gradient_checkpointing(checkpointing)
    args = Namespace(ema=True, mixed_precision=mixed_precision, fsdp_shard_size=0, fsdp_reshard_after_forward=True,
                     gradient_accumulation_steps=1, max_grad_norm=1.0, ema_decay=0.9999, ema_warmup=False)
    if mode == "fsdp":
        model, ema = shard_for_training(args, model, device)
    else:
        ema = deepcopy(model).to(device).eval().requires_grad_(False)
        model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("constant", 0, 1))
    if compile_model:
        compile_for_training(model, [], "model")
    if mode == "ddp":
        sharding.device_mesh(device)  # the one-process group
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index or 0]
                                                          if device.type == "cuda" else None)
    elif mode == "plain":
        model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = TrainingLoss(FlowMatching(time_shifting=True), {"proj": (RepaLoss(), 0.5),
                                                              "cfm": (ContrastiveFlowMatching(), 0.05)})
    latents = torch.randn(batch, *latent, device=device)
    y = torch.randn(batch, *text, device=device)
    zs = [torch.randn(batch, *repa, device=device)]

    def step():
        forward_backward(accelerator, model, loss_fn, latents, dict(y=y), zs, args)
        optimizer_step(accelerator, model, ema, optimizer, scheduler, args, 0)
    return step


def run_case(model_name, mode, checkpointing, batch, device, mixed_precision="bf16", compile_model=True,
             warmup=3, iters=10, **shapes):
    """img/s, ms per step and peak memory (GB, CUDA only) of `iters` steps after `warmup` (+3 when compiled)."""
    step = build_step(model_name, mode, checkpointing, batch, device, mixed_precision, compile_model, **shapes)
    for _ in range(warmup + (3 if compile_model else 0)):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return dict(model=model_name, mode=mode, gradient_checkpointing=checkpointing, batch=batch,
                img_s=batch / seconds, step_ms=seconds * 1e3, peak_gb=peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--only", default="", help=f"comma separated cases (default: all of {', '.join(CASES)})")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile as train.py does on a GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fsdp.py measures a GPU; none is visible")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda", torch.cuda.current_device())
    unknown = set(filter(None, args.only.split(","))) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    names = [n for n in CASES if not args.only or n in args.only.split(",")]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "compile": args.compile}
    for name in names:
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        try:
            results[name] = run_case(*CASES[name], args.batch, device, compile_model=args.compile)
        except Exception as error:  # an out-of-memory case must not hide the others' numbers
            results[name] = {"model": CASES[name][0], "error": repr(error)[:500]}
        print(name, json.dumps(results[name]), flush=True)
    print("\n| case | model | gradient checkpointing | img/s | peak GB |\n| --- | --- | --- | --- | --- |")
    for name in names:
        r = results[name]
        if "error" in r:
            print(f"| {name} | {r['model']} | | failed: {r['error'][:80]} | |")
        else:
            print(f"| {name} | {r['model']} | {r['gradient_checkpointing']} | {r['img_s']:.1f} | {r['peak_gb']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
