"""Sample images from a checkpoint on any number of processes (torchrun / accelerate launch / plain python).

The checkpoint describes itself (omegadit/checkpoint.py): backbone, objective, conditioner, autoencoder and latent
statistics, so it samples without its training data. Writes <sample-dir>/<name>/NNNNNN.png (one per global index;
existing files are kept, so an interrupted run resumes), then <sample-dir>/<name>.npz (ADM format: arr_0,
N x H x W x 3 uint8) and <sample-dir>/<name>_grid.png. Each image's noise comes from a generator seeded by
--global-seed and its global index, so the images do not depend on the number of processes.
<sample-dir>/<name>/manifest.json records the weights, prompts and settings the images come from; a run into a
folder whose images were made otherwise stops with the differences (omegadit/manifest.py).

With a ControlNet (--controlnet, a checkpoint of train.py --control on the model of --ckpt) each image follows a
mask (--mask, or --mask-folder: image i takes mask (i // --num-images-per-prompt) mod #masks, in name order, as it
takes its prompt), and <sample-dir>/<name>_compare/NNNNNN.png shows mask | sample side by side, with
<sample-dir>/<name>_compare_grid.png.
"""
import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm.auto import tqdm

from models.control import mask_input
from omegadit import checkpoint, compat
from omegadit import manifest as manifests
from omegadit.compilation import COMPILE_MODES, compile_backbone, compile_enabled, use_compile_cache
from omegadit.fp8 import check_fp8_device, quantize_blocks_for_inference
from omegadit.importers import IMPORTERS
from omegadit.prompts import read_prompts
from omegadit.sampling import SAMPLERS, check_sampler
from omegadit.sampling.guidance import GuidedNetwork
from utils import image_grid, parse_with_config

SAMPLING_FALLBACKS = {"num_steps": 50, "cfg_scale": 4.0, "guidance_low": 0.0, "guidance_high": 1.0}
POSITIVE = ("num_steps", "per_proc_batch_size", "num_images_per_prompt", "grid_size", "num_fid_samples", "shift_base")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file whose keys are flags of this script")
    p.add_argument("--ckpt", required=True,
                   help="checkpoint directory of train.py, a model .safetensors, or a .pt of the original train.py")
    p.add_argument("--ckpt-format", default=None, choices=IMPORTERS.names(),
                   help="format of a checkpoint released by another project (default: detected from its keys)")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--name", default=None,
                   help="output name (default: checkpoint, sampler, steps, scale, seed and a hash of all settings)")
    g = p.add_argument_group("conditions")
    g.add_argument("--prompts-file", default=None, help="text file (one prompt per line) or a labels.json")
    g.add_argument("--prompt", default=None, help="a single prompt")
    g.add_argument("--num-images-per-prompt", type=int, default=1)
    g.add_argument("--balanced-sampling", action=argparse.BooleanOptionalAction, default=False,
                   help="class models: labels i %% num_classes")
    g.add_argument("--num-fid-samples", type=int, default=None,
                   help="number of images (default: prompts x images per prompt; 50000 for class models)")
    g.add_argument("--per-proc-batch-size", type=int, default=64)
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", default=None, choices=SAMPLERS.names(),
                   help="default: from --mode, else the checkpoint's objective's own")
    g.add_argument("--mode", default=None, choices=["sde", "ode"], help="flow models: sde (Euler-Maruyama) or ode")
    g.add_argument("--heun", action=argparse.BooleanOptionalAction, default=False,
                   help="ODE mode: Heun's second-order method instead of Euler")
    g.add_argument("--num-steps", type=int, default=None, help="default: the checkpoint's, else 50")
    g.add_argument("--cfg-scale", type=float, default=None, help="default: the checkpoint's, else 4.0")
    g.add_argument("--guidance-low", type=float, default=None, help="default: the checkpoint's, else 0")
    g.add_argument("--guidance-high", type=float, default=None, help="default: the checkpoint's, else 1")
    g.add_argument("--path-drop", action=argparse.BooleanOptionalAction, default=False,
                   help="path drop in the unconditional branch of guidance (the original's default)")
    g.add_argument("--time-shifting", action=argparse.BooleanOptionalAction, default=None,
                   help="shift the time grid (default: as in training)")
    g.add_argument("--shift-base", type=int, default=None, help="default: as in training")
    g.add_argument("--global-seed", type=int, default=0)
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off on CPU)")
    g.add_argument("--compile-mode", default="regional", choices=COMPILE_MODES,
                   help="regional: compile one block and reuse it for all (fast start); model: the whole forward")
    g.add_argument("--compile-cache", default=None,
                   help="folder of the persistent compile cache, so that the next call starts warm "
                        "(default: <sample-dir>/compile_cache; 'none': torch's temporary folder)")
    g.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"],
                   help="bf16 model calls (auto: when the GPU supports bf16)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="TF32 matmuls on the GPU (the original's default)")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 matmuls (rowwise-scaled e4m3) in the blocks' linear layers: faster on H100 and newer, "
                        "samples differ slightly from bf16's; needs bf16")
    g = p.add_argument_group("decoding (defaults: what the checkpoint records)")
    g.add_argument("--tokenizer", default=None, help="pixel, vavae:CONFIG.yaml or a diffusers AutoencoderKL")
    g.add_argument("--vae-ckpt", default=None, help="VA-VAE checkpoint path (overrides the config's ckpt_path)")
    g.add_argument("--latent-stats", default=None, help="latents_stats.pt of the training data")
    g.add_argument("--text-encoder", "--clip-model-id", dest="text_encoder", default=None,
                   help="text encoder id or directory")
    g.add_argument("--grid-size", type=int, default=16, help="images in the grid PNG")
    g = p.add_argument_group("control (a ControlNet of train.py --control)")
    g.add_argument("--controlnet", default=None, help="ControlNet checkpoint trained on the model of --ckpt")
    masks = g.add_mutually_exclusive_group()
    masks.add_argument("--mask", default=None, help="one mask image for every sample")
    masks.add_argument("--mask-folder", default=None, help="masks in name order (subfolders included)")
    g.add_argument("--controlnet-scale", type=float, default=1.0,
                   help="strength of the control: 0 ignores the mask, 1 as trained, above 1 follows it more strictly")
    compat.add_original_flags(p, "generate")
    compat.apply_recipe(p, argv, "generate")
    args = compat.resolve(p, parse_with_config(p, argv), "generate")
    check_args(p, args)
    return args


def check_args(parser, args):
    """Stop with a usage error naming the flag when a value is out of its range (before anything is loaded).
    Sampling settings left to the checkpoint (None here) are checked by `check_sampling` once it is read."""
    for key in POSITIVE:
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    try:
        check_sampling(args)
    except ValueError as err:
        parser.error(str(err))
    has_masks = args.mask is not None or args.mask_folder is not None
    if has_masks != (args.controlnet is not None):
        parser.error("--mask / --mask-folder and --controlnet go together: a ControlNet checkpoint and the masks it "
                     "follows")
    if not math.isfinite(args.controlnet_scale) or args.controlnet_scale < 0:
        parser.error(f"--controlnet-scale must be a finite number >= 0, got {args.controlnet_scale}")
    if args.fp8 and args.mixed_precision == "no":
        parser.error("--fp8 runs inside bf16 autocast: drop --mixed-precision no")


def check_sampling(args):
    """A finite guidance scale and 0 <= --guidance-low <= --guidance-high <= 1, for the values that are set."""
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    low = 0.0 if args.guidance_low is None else args.guidance_low
    high = 1.0 if args.guidance_high is None else args.guidance_high
    if not 0 <= low <= high <= 1:
        raise ValueError(f"the guidance interval needs 0 <= --guidance-low <= --guidance-high <= 1, got "
                         f"--guidance-low {args.guidance_low} and --guidance-high {args.guidance_high}")


def check_writable(folder: Path):
    """Create --sample-dir if needed and make sure a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise OSError(f"--sample-dir {folder} is not a writable folder: {err}") from err


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------

def sampler_name(args, objective, defaults) -> str:
    """--sampler, else --mode (sde, or ode: euler / heun), else the checkpoint's, else the objective's default."""
    if args.sampler:
        return args.sampler
    if args.mode == "ode":
        return "heun" if args.heun else "euler"
    if args.mode == "sde":
        return "sde"
    return defaults.get("sampler") or objective.default_sampler


def fill_sampling_defaults(args, defaults):
    """Sampling flags not given take the checkpoint's recorded defaults, else SAMPLING_FALLBACKS."""
    for key, fallback in SAMPLING_FALLBACKS.items():
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key, fallback))


def apply_overrides(loaded, args):
    """The objective with --time-shifting / --shift-base applied where it takes them."""
    config = dict(loaded.objective.config)
    for key in ("time_shifting", "shift_base"):
        value = getattr(args, key)
        if value is not None:
            if key not in config:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to the {loaded.objective.name!r} objective")
            config[key] = value
    return type(loaded.objective)(**config)


def conditions_for(args, model, num_masks=0):
    """(list of per-index conditions: prompt strings or class ints, total count). Class models sample 50000 images
    unless --num-fid-samples says otherwise, or #masks x --num-images-per-prompt with masks."""
    if model.conditioning == "text":
        if args.prompt:
            prompts = [args.prompt]
        elif args.prompts_file:
            prompts = read_prompts(args.prompts_file)
        else:
            compat.say(f"no --prompt or --prompts-file: sampling the original OmegaDiT's evaluation prompts "
                       f"({compat.ORIGINAL_PROMPTS.relative_to(compat.REPO_ROOT)})")
            prompts = read_prompts(compat.ORIGINAL_PROMPTS)
        expanded = [p for p in prompts for _ in range(args.num_images_per_prompt)]
        total = args.num_fid_samples or len(expanded)
        return [expanded[i % len(expanded)] for i in range(total)], total
    total = args.num_fid_samples or (num_masks * args.num_images_per_prompt if num_masks else 50000)
    if model.conditioning == "none":
        return [""] * total, total
    num_classes = model.config["num_classes"]
    if args.balanced_sampling:
        return [i % num_classes for i in range(total)], total
    generator = torch.Generator().manual_seed(args.global_seed)
    return torch.randint(0, num_classes, (total,), generator=generator).tolist(), total


def output_name(args, sampler, manifest):
    """The default folder name: the main settings to read, and a hash of everything the images depend on, so
    that runs with different settings never share a folder."""
    ckpt = Path(args.ckpt)
    stem = ckpt.name if ckpt.is_dir() else ckpt.stem
    return (f"{stem}-{'raw' if args.no_ema else 'ema'}-{sampler}{args.num_steps}-cfg{args.cfg_scale}"
            f"-seed{args.global_seed}-{manifests.short_hash(manifest)}")


def latent_stats(args, loaded):
    """(mean, std) of the training latents: --latent-stats, else what the checkpoint records."""
    from json_label_dataset import load_latent_stats

    stats = load_latent_stats(args.latent_stats) if args.latent_stats else loaded.latent_stats
    if stats is None:
        raise FileNotFoundError(f"{args.ckpt} records no latent statistics and its training data folder is gone: "
                                f"pass --latent-stats <data-dir>/vae-in/latents_stats.pt of the training data")
    channels = loaded.model.latent_shape[0]
    if stats[0].shape[0] != channels:
        source = args.latent_stats or f"the statistics recorded in {args.ckpt}"
        raise ValueError(f"{source} has statistics for {stats[0].shape[0]} latent channels; the model denoises "
                         f"{channels}")
    return stats


def sample_manifest(args, loaded, objective, sampler, conditions, stats, use_bf16, masks=None) -> dict:
    """Everything the images depend on (omegadit/manifest.py): weights, conditions, sampler and decoding, and a
    ControlNet's weights, masks and scale."""
    weights = checkpoint.weights_file(args.controlnet or args.ckpt, use_ema=not args.no_ema)
    control = {} if masks is None else {
        "base_checkpoint": str(Path(args.ckpt).resolve()),
        "controlnet_scale": args.controlnet_scale,
        "masks_sha256": manifests.digest([masks.shape, masks.flatten().tolist()]),
    }
    return {**control,
        "checkpoint": str(weights.resolve()),
        "weights_fingerprint": manifests.file_fingerprint(weights),
        "ema": not args.no_ema,
        "conditions_sha256": manifests.digest(conditions),
        "num_images": len(conditions),
        "sampler": sampler,
        "num_steps": args.num_steps,
        "cfg_scale": args.cfg_scale,
        "guidance_interval": [args.guidance_low, args.guidance_high],
        "path_drop": args.path_drop,
        "global_seed": args.global_seed,
        "objective": objective.describe(),
        "bf16": use_bf16,
        **({"fp8": True} if args.fp8 else {}),  # only when on: folders of earlier runs keep their names
        "autoencoder": args.tokenizer or loaded.autoencoder,
        "vae_ckpt": str(Path(args.vae_ckpt).resolve()) if args.vae_ckpt else None,
        "latent_stats_sha256": manifests.digest([t.flatten().tolist() for t in stats]),
        "text_encoder": args.text_encoder or loaded.conditioner.config.get("text_encoder"),
    }


def warn_truncated(conditioner, conditions):
    """Print one warning when prompts have more tokens than the model's caption length (the tokenizer cuts them)."""
    if conditioner.kind != "text":
        return
    prompts = list(dict.fromkeys(conditions))
    lengths = [len(ids) for ids in conditioner.encoder.tokenizer(prompts, truncation=False)["input_ids"]]
    cut = [p for p, n in zip(prompts, lengths) if n > conditioner.text_len]
    if cut:
        print(f"WARNING: {len(cut)} of {len(prompts)} prompts are longer than the model's {conditioner.text_len} "
              f"caption tokens and are truncated, e.g. {cut[0]!r}")


# ------------------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------------------

def mask_files(args) -> list:
    """The mask files of --mask or --mask-folder (in name order)."""
    from json_label_dataset import IMAGE_EXTENSIONS, list_files

    if args.mask is not None:
        if not Path(args.mask).is_file():
            raise FileNotFoundError(f"--mask {args.mask} does not exist")
        return [Path(args.mask)]
    files = [Path(args.mask_folder) / rel for rel in list_files(args.mask_folder, IMAGE_EXTENSIONS)]
    if not files:
        raise FileNotFoundError(f"--mask-folder {args.mask_folder} holds no images")
    return files


def read_masks(files, channels: int, size: int) -> torch.Tensor:
    """uint8 (M, channels, size, size) masks; a mask of another size is an error naming it."""
    from control_data import read_mask

    masks = [read_mask(path, channels) for path in files]
    wrong = [f"{path} ({mask.shape[-1]}x{mask.shape[-2]})" for path, mask in zip(files, masks)
             if mask.shape[-2:] != (size, size)]
    if wrong:
        raise ValueError(f"the ControlNet takes masks of the training images' size, {size}x{size}: "
                         f"{len(wrong)} masks differ ({', '.join(wrong[:5])})")
    return torch.stack(masks)


def load_model(args):
    """The checkpoint of --ckpt, or with --controlnet its control model around it (the base loaded with the
    weights the branch was trained on; the branch's EMA unless --no-ema)."""
    if args.controlnet is None:
        return checkpoint.load(args.ckpt, use_ema=not args.no_ema, source_format=args.ckpt_format)
    base_weights = checkpoint.control_base_weights(args.controlnet)
    base = checkpoint.load(args.ckpt, use_ema=base_weights != "model", source_format=args.ckpt_format)
    return checkpoint.load_control(args.controlnet, base, args.ckpt, use_ema=not args.no_ema)


def write_comparisons(image_dir, masks, mask_of, total, compare_dir):
    """compare_dir/NNNNNN.png: mask | sample side by side, for images 0..total-1; returns them as an array."""
    compare_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(total):
        sample = np.asarray(Image.open(image_dir / f"{i:06d}.png").convert("RGB"))
        mask = masks[mask_of(i)].permute(1, 2, 0).expand(-1, -1, 3).numpy()
        pair = np.concatenate([mask, sample], axis=1)
        write_png(pair, compare_dir / f"{i:06d}.png")
        pairs.append(pair)
    return np.stack(pairs)


def main(args):
    check_writable(Path(args.sample_dir))
    # Without cpu=True, accelerate leaves CPU-only processes started by torchrun undistributed: each would sample all.
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    device = state.device
    files = mask_files(args) if args.controlnet else []
    loaded = load_model(args)
    if not args.no_ema and loaded.weights == "model":
        compat.say(f"{args.controlnet or args.ckpt} holds no EMA weights (trained without EMA): sampling its raw "
                   f"weights")
        args.no_ema = True
    model = loaded.model.to(device)
    objective = apply_overrides(loaded, args)
    defaults = loaded.description.get("sampling", {})
    fill_sampling_defaults(args, defaults)
    check_sampling(args)
    sampler = sampler_name(args, objective, defaults)
    sample_fn = check_sampler(sampler, objective)
    backbone = getattr(model, "base", model)  # a ControlNet takes its base model's conditions
    conditions, total = conditions_for(args, backbone, len(files))
    masks = None
    if files:
        config = loaded.description["control"]["config"]
        masks = read_masks(files, config["mask_channels"], model.latent_shape[-1] * config["downsample"])
    stats = latent_stats(args, loaded)
    use_bf16 = args.mixed_precision == "bf16" or (
        args.mixed_precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if args.fp8:
        if not use_bf16:
            raise ValueError("--fp8 runs inside bf16 autocast, which --mixed-precision auto turns on only on CUDA "
                             "GPUs with bf16: add --mixed-precision bf16")
        check_fp8_device(device)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    manifest = sample_manifest(args, loaded, objective, sampler, conditions, stats, use_bf16, masks)
    name = args.name or output_name(args, sampler, manifest)
    image_dir = Path(args.sample_dir) / name
    manifests.check_folder(image_dir, manifest)
    decode = build_decoder(args, loaded, stats, device)
    compat.check_checkpoint(args, loaded, decode.tokenizer.downsample)
    conditioner = build_conditioner(args, loaded, backbone, device)
    if state.is_main_process:
        warn_truncated(conditioner, conditions)
    if args.fp8:
        swapped = quantize_blocks_for_inference(backbone)
        if state.is_main_process:
            print(f"FP8: {swapped} linear layers of the blocks run as float8 matmuls")
    if compile_enabled(args.compile, device):
        use_compile_cache(args.compile_cache or Path(args.sample_dir) / "compile_cache")
        compile_backbone(model, args.compile_mode)

    state.wait_for_everyone()  # every process has checked the folder before its manifest is written
    if state.is_main_process:
        image_dir.mkdir(parents=True, exist_ok=True)
        manifests.write(image_dir, manifest)
    state.wait_for_everyone()
    if state.is_main_process:
        control = f" with the ControlNet {args.controlnet} (scale {args.controlnet_scale})" if masks is not None else ""
        print(f"sampling {total} images with {'raw' if args.no_ema else 'EMA'} weights of {args.ckpt}{control} "
              f"({sampler}, {args.num_steps} steps) on {state.num_processes} process(es) into {image_dir}")
    mine = [i for i in range(state.process_index, total, state.num_processes)
            if not (image_dir / f"{i:06d}.png").exists()]

    def mask_of(i):
        return (i // args.num_images_per_prompt) % len(files)

    progress = tqdm(total=len(mine) * state.num_processes, desc="sampling", unit="img",
                    disable=not state.is_main_process)
    started = time.perf_counter()
    for start in range(0, len(mine), args.per_proc_batch_size):
        indices = mine[start:start + args.per_proc_batch_size]
        generators = [torch.Generator(device).manual_seed(args.global_seed * 1_000_003 + i) for i in indices]
        noise = torch.stack([torch.randn(model.latent_shape, generator=g, device=device) for g in generators])
        y = conditioner([conditions[i] for i in indices], device)
        control = {} if masks is None else {
            "control": mask_input(masks[[mask_of(i) for i in indices]].to(device)),
            "control_scale": args.controlnet_scale}
        network = GuidedNetwork(model, objective, y, scale=args.cfg_scale,
                                interval=(args.guidance_low, args.guidance_high), path_drop=args.path_drop,
                                channels=defaults.get("guidance_channels"), model_kwargs=control)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            latents = sample_fn(objective, network, noise, args.num_steps, generator=generators)
        images = decode(latents.float()).permute(0, 2, 3, 1).cpu().numpy()
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
        if masks is not None:
            compare_dir = Path(args.sample_dir) / f"{name}_compare"
            pairs = write_comparisons(image_dir, masks, mask_of, total, compare_dir)
            compare_grid = Path(args.sample_dir) / f"{name}_compare_grid.png"
            image_grid(pairs[:shown], [str(c) for c in conditions[:shown]]).save(compare_grid)
            print(f"wrote mask | sample comparisons to {compare_dir} and {compare_grid}")


def build_decoder(args, loaded, stats, device):
    """Normalised latents -> uint8 images, with the checkpoint's autoencoder (or --tokenizer) and `stats`."""
    from models.tokenizers import LatentDecoder, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or loaded.autoencoder, device=device, ckpt_path=args.vae_ckpt)
    return LatentDecoder(tokenizer, *stats)


def build_conditioner(args, loaded, model, device):
    """The checkpoint's conditioner, its text encoder loaded (--text-encoder overrides the recorded one)."""
    conditioner = loaded.conditioner
    if conditioner.kind != "text":
        return conditioner
    conditioner.load(device, args.text_encoder)
    if conditioner.dim != model.config["text_dim"]:
        name = args.text_encoder or conditioner.config["text_encoder"]
        raise ValueError(f"text encoder {name} gives {conditioner.dim}-d tokens but the model expects "
                         f"{model.config['text_dim']}-d: pass the --text-encoder it was trained with")
    return conditioner


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
