"""Guided sampling throughput of SiT-B/1 with path-drop guidance: 50-step SDE, CFG 4, bf16, compiled, batch 256.

    python benchmarks/bench_guided_sampling.py [--guidance-high 0.85] [--fp8]

Runs on this checkout's samplers.py (its direct flow-sampler functions), so the same script times older checkouts
too. Prints img/s as the median of --repeats timed runs after one warm-up run; with --fp8 also the relative error
of one guided velocity against float32, for bf16 and for bf16 + FP8 (unit-gain random weights).
"""
import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import samplers  # noqa: E402
from models.sit import SiT_models  # noqa: E402

FLOW_SAMPLERS = getattr(samplers, "FLOW_SAMPLERS", None) or samplers.SAMPLERS


def fp8_velocity_errors(model, quantize, batch=16):
    """Relative errors against float32 of the guided velocity ([conditional | unconditional] batch, path drop) of
    `model` with unit-gain weights: in bf16, and in bf16 with the blocks' linears in FP8 (`quantize`)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    fp8 = copy.deepcopy(model)
    quantize(fp8)
    x = torch.randn(batch, 32, 16, 16, device="cuda")
    t = torch.rand(batch, device="cuda")
    y = torch.randn(batch, 77, 768, device="cuda")
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        v32 = model(x, t, y, uncond=batch // 2)[0].float()
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v16 = model(x, t, y, uncond=batch // 2)[0].float()
            v8 = fp8(x, t, y, uncond=batch // 2)[0].float()
    rel = lambda a: ((a - v32).norm() / v32.norm()).item()
    return rel(v16), rel(v8)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--no-path-drop", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fp8", action="store_true", help="the blocks' linears as FP8 matmuls (generate.py --fp8)")
    p.add_argument("--compile-mode", default="model", choices=["model", "regional"],
                   help="the whole model (as measured before) or its blocks one by one (generate.py's default)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    model = SiT_models["SiT-B/1"](input_size=16, in_channels=32, text_dim=768, z_dims=[768]).cuda().eval()
    if args.fp8:  # imported here: the script also times checkouts older than FP8 sampling
        from omegadit.fp8 import quantize_blocks_for_inference
        bf16_error, fp8_error = fp8_velocity_errors(copy.deepcopy(model), quantize_blocks_for_inference)
        print(f"guided velocity, relative error against float32: bf16 {bf16_error:.5f}, bf16 + FP8 {fp8_error:.5f}")
        quantize_blocks_for_inference(model)
    if args.compile_mode == "model":
        model.compile()
    else:
        for block in model.blocks:
            block.compile(dynamic=False)
    noise = torch.randn(args.batch, 32, 16, 16, device="cuda")
    y = torch.randn(args.batch, 77, 768, device="cuda")

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out = FLOW_SAMPLERS["sde"](model, noise, y, num_steps=args.steps, cfg_scale=args.cfg_scale,
                                       guidance_high=args.guidance_high, path_drop=not args.no_path_drop,
                                       time_shifting=True, generator=torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()
        return out

    run()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    print(f"guided_sampling compile={args.compile_mode} fp8={args.fp8} path_drop={not args.no_path_drop} "
          f"guidance_high={args.guidance_high} "
          f"batch={args.batch}: {args.batch / seconds:.1f} img/s ({seconds:.2f} s)")


if __name__ == "__main__":
    main()
