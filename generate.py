"""Sample images from a trained SiT on any number of processes (torchrun / accelerate launch / plain python).

Writes <sample-dir>/<name>/NNNNNN.png (one per global index; existing files are kept, so an interrupted run resumes),
then <sample-dir>/<name>.npz (ADM format: arr_0, N x H x W x 3 uint8) and <sample-dir>/<name>_grid.png.
Each image's noise comes from a generator seeded by --global-seed and its global index, so the images do not depend
on the number of processes.
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm.auto import tqdm

from models.sit import load_model, load_reference_checkpoint
from samplers import SAMPLERS
from utils import image_grid, parse_with_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file whose keys are flags of this script")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint directory of train.py, a model .safetensors, or a .pt of the original train.py")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--name", default=None, help="output name (default: derived from checkpoint and settings)")
    g = p.add_argument_group("conditions")
    g.add_argument("--prompts-file", default=None, help="text file (one prompt per line) or a labels.json")
    g.add_argument("--prompt", default=None, help="a single prompt")
    g.add_argument("--num-images-per-prompt", type=int, default=1)
    g.add_argument("--balanced-sampling", action="store_true", help="class models: labels i %% num_classes")
    g.add_argument("--num-fid-samples", type=int, default=None,
                   help="number of images (default: prompts x images per prompt; 50000 for class models)")
    g.add_argument("--per-proc-batch-size", type=int, default=64)
    g = p.add_argument_group("sampler")
    g.add_argument("--mode", default="sde", choices=["sde", "ode"])
    g.add_argument("--heun", action="store_true", help="ODE mode: Heun's second-order method instead of Euler")
    g.add_argument("--num-steps", type=int, default=50)
    g.add_argument("--cfg-scale", type=float, default=4.0)
    g.add_argument("--guidance-low", type=float, default=0.0)
    g.add_argument("--guidance-high", type=float, default=1.0)
    g.add_argument("--path-drop", action="store_true", help="path drop in the unconditional branch of guidance")
    g.add_argument("--time-shifting", action=argparse.BooleanOptionalAction, default=None,
                   help="shift the time grid (default: as in training)")
    g.add_argument("--shift-base", type=int, default=None, help="default: as in training, else 4096")
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off on CPU)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="bf16 model calls (auto: when the GPU supports bf16)")
    g = p.add_argument_group("decoding (defaults: what the checkpoint was trained with)")
    g.add_argument("--tokenizer", default=None, help="pixel, vavae:CONFIG.yaml or a diffusers AutoencoderKL")
    g.add_argument("--vae-ckpt", default=None, help="VA-VAE checkpoint path (overrides the config's ckpt_path)")
    g.add_argument("--latent-stats", default=None, help="latents_stats.pt of the training data")
    g.add_argument("--text-encoder", default=None, help="text encoder id or directory")
    g.add_argument("--grid-size", type=int, default=16, help="images in the grid PNG")
    return parse_with_config(p, argv)


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------

def load_checkpoint_for_sampling(ckpt, use_ema=True, device="cpu"):
    """(model in eval mode, training args dict) from any checkpoint format this project knows."""
    path = Path(ckpt)
    if path.is_dir():
        weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
        if not weights.exists():
            raise FileNotFoundError(f"{path} is not a train.py checkpoint directory: {weights.name} is missing")
        args_file = path / "args.json"
        return load_model(weights, device), json.loads(args_file.read_text()) if args_file.exists() else {}
    if path.suffix == ".safetensors":
        args_file = path.parent / "args.json"
        return load_model(path, device), json.loads(args_file.read_text()) if args_file.exists() else {}
    if path.suffix in (".pt", ".pth"):
        import argparse as _argparse

        with torch.serialization.safe_globals([_argparse.Namespace]):
            saved = torch.load(str(path), map_location="cpu", weights_only=True)
        train_args = vars(saved["args"]) if "args" in saved else {}
        return load_reference_checkpoint(path, use_ema=use_ema).to(device), train_args
    raise ValueError(f"{ckpt}: expected a checkpoint directory, a .safetensors or a .pt file")


def read_prompts(path):
    """Prompts from a text file (one per line) or a labels.json ([{'id':..., 'en':...}])."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.suffix == ".json":
        entries = json.loads(path.read_text())
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "en" in e for e in entries):
            raise ValueError(f"{path}: expected a JSON array of objects with an 'en' caption")
        prompts = [e["en"] for e in entries]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def conditions_for(args, model):
    """(list of per-index conditions: prompt strings or class ints, total count)."""
    if model.is_text_conditioned:
        if args.prompt:
            prompts = [args.prompt]
        elif args.prompts_file:
            prompts = read_prompts(args.prompts_file)
        else:
            raise ValueError("a text model needs --prompt or --prompts-file")
        expanded = [p for p in prompts for _ in range(args.num_images_per_prompt)]
        total = args.num_fid_samples or len(expanded)
        return [expanded[i % len(expanded)] for i in range(total)], total
    num_classes = model.config["num_classes"]
    total = args.num_fid_samples or 50000
    if args.balanced_sampling:
        return [i % num_classes for i in range(total)], total
    generator = torch.Generator().manual_seed(args.global_seed)
    return torch.randint(0, num_classes, (total,), generator=generator).tolist(), total


def output_name(args):
    ckpt = Path(args.ckpt)
    stem = ckpt.name if ckpt.is_dir() else ckpt.stem
    sampler = "sde" if args.mode == "sde" else ("heun" if args.heun else "euler")
    return (f"{stem}-{'raw' if args.no_ema else 'ema'}-{sampler}{args.num_steps}-cfg{args.cfg_scale}"
            f"-seed{args.global_seed}")


# ------------------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------------------

def main(args):
    # Without cpu=True, accelerate leaves CPU-only processes started by torchrun undistributed: each would sample all.
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = state.device
    model, train_args = load_checkpoint_for_sampling(args.ckpt, use_ema=not args.no_ema, device=device)
    conditions, total = conditions_for(args, model)
    time_shifting = args.time_shifting if args.time_shifting is not None else train_args.get("time_shifting", True)
    shift_base = args.shift_base or train_args.get("shift_base", 4096)
    path_type = train_args.get("path_type", "linear")
    decoder = build_decoder(args, train_args, device)
    text_encoder = build_text_encoder(args, train_args, model, device)
    use_bf16 = args.mixed_precision == "bf16" or (
        args.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    sampler = SAMPLERS["sde" if args.mode == "sde" else ("heun" if args.heun else "euler")]
    if args.compile if args.compile is not None else device.type == "cuda":
        model.compile()

    name = args.name or output_name(args)
    image_dir = Path(args.sample_dir) / name
    if state.is_main_process:
        image_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"sampling {total} images on {state.num_processes} process(es) into {image_dir}")
    mine = [i for i in range(state.process_index, total, state.num_processes)
            if not (image_dir / f"{i:06d}.png").exists()]
    cfg = model.config
    latent_shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    progress = tqdm(total=len(mine) * state.num_processes, desc="sampling", unit="img",
                    disable=not state.is_main_process)
    started = time.perf_counter()
    for start in range(0, len(mine), args.per_proc_batch_size):
        indices = mine[start:start + args.per_proc_batch_size]
        generators = [torch.Generator(device).manual_seed(args.global_seed * 1_000_003 + i) for i in indices]
        noise = torch.stack([torch.randn(latent_shape, generator=g, device=device) for g in generators])
        y = condition_batch([conditions[i] for i in indices], model, text_encoder, device)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            latents = sampler(model, noise, y, num_steps=args.num_steps, cfg_scale=args.cfg_scale,
                              guidance_low=args.guidance_low, guidance_high=args.guidance_high, path_type=path_type,
                              y_null=model.null_condition(len(indices), device), path_drop=args.path_drop,
                              time_shifting=time_shifting, shift_base=shift_base, generator=generators)
        images = decoder(latents.float()).permute(0, 2, 3, 1).cpu().numpy()
        for i, image in zip(indices, images):
            write_png(image, image_dir / f"{i:06d}.png")
        progress.update(len(indices) * state.num_processes)
        progress.set_postfix(img_s=f"{progress.n / (time.perf_counter() - started):.1f}")
    progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        npz_path = Path(args.sample_dir) / f"{name}.npz"
        samples = collect_npz(image_dir, total, npz_path)
        shown = min(args.grid_size, total)
        grid_path = Path(args.sample_dir) / f"{name}_grid.png"
        image_grid(samples[:shown], [str(c) for c in conditions[:shown]]).save(grid_path)
        print(f"wrote {total} images to {image_dir}, {npz_path} and {grid_path}")


def build_decoder(args, train_args, device):
    """latents (normalised as in training) -> uint8 images, with the training tokenizer and latent statistics."""
    from json_label_dataset import load_latent_stats
    from models.tokenizers import load_tokenizer

    spec = args.tokenizer or train_args.get("tokenizer") or "vavae:tokenizer/configs/vavae_f16d32_vfdinov2.yaml"
    stats_path = args.latent_stats or (Path(train_args["data_dir"]) / "vae-in" / "latents_stats.pt"
                                       if train_args.get("data_dir") else None)
    if stats_path is None or not Path(stats_path).exists():
        raise FileNotFoundError(f"latent statistics not found at {stats_path}: pass --latent-stats "
                                f"<data-dir>/vae-in/latents_stats.pt of the training data")
    mean, std = (s.to(device) for s in load_latent_stats(stats_path))
    tokenizer = load_tokenizer(spec, device=device, ckpt_path=args.vae_ckpt)
    return lambda latents: tokenizer.decode(latents * std + mean)


def build_text_encoder(args, train_args, model, device):
    if not model.is_text_conditioned:
        return None
    from models.text_encoder import TextEncoder

    model_id = args.text_encoder or train_args.get("clip_model_id") or "AI-ModelScope/CLIP-GmP-ViT-L-14"
    encoder = TextEncoder.load(model_id, device=device, max_length=model.config["text_len"])
    if encoder.dim != model.config["text_dim"]:
        raise ValueError(f"text encoder {model_id} gives {encoder.dim}-d tokens but the model expects "
                         f"{model.config['text_dim']}-d: pass the --text-encoder it was trained with")
    return encoder


def condition_batch(conditions, model, text_encoder, device):
    if model.is_text_conditioned:
        return text_encoder(conditions).to(device)
    return torch.tensor(conditions, dtype=torch.long, device=device)


def write_png(image, path):
    """Write a PNG atomically so that an interrupted run never leaves a truncated file behind (the temporary name
    carries the process id: runs sharing a folder never rename each other's file)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    tmp.replace(path)


def collect_npz(image_dir, total, npz_path):
    """Stack images 0..total-1 into an ADM-format npz (arr_0: N x H x W x 3 uint8)."""
    first = np.asarray(Image.open(image_dir / f"{0:06d}.png").convert("RGB"))
    samples = np.empty((total, *first.shape), dtype=np.uint8)
    for i in tqdm(range(total), desc="npz", unit="img"):
        samples[i] = np.asarray(Image.open(image_dir / f"{i:06d}.png").convert("RGB"))
    np.savez(npz_path, arr_0=samples)
    return samples


if __name__ == "__main__":
    main(parse_args())
