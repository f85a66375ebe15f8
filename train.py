"""Train a diffusion backbone on pre-encoded latents with accelerate: `accelerate launch train.py --help`.

The loop knows only the interfaces: a backbone (models/), an objective and auxiliary losses
(omegadit/objectives/, combined by loss.TrainingLoss), a conditioner (omegadit/conditioners.py) and the
checkpoint module (omegadit/checkpoint.py, omegadit/run_state.py). ARCHITECTURE.md maps them.
"""
import argparse
import math
import signal
import time
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from json_label_dataset import TransformConditions, collate
from loss import TrainingLoss
from models import BACKBONES, rebuild_backbone
from models.control import mask_input
from models.text_encoder import CLIP_OUTPUTS
from models.tokenizers import is_pixel_spec
from omegadit import checkpoint, compat
from omegadit.compilation import (COMPILE_MODES, compile_backbone, compile_enabled, compile_frozen, mark_step,
                                  use_compile_cache)
from omegadit.conditioners import (DEFAULT_TEXT_ENCODER, DEFAULT_TEXT_LEN, ClassConditioner, TextConditioner,
                                   UnconditionalConditioner)
from omegadit.evaluation_during_training import add_eval_flags, build_evaluator
from omegadit.fp8 import convert_blocks_to_float8
from omegadit.locking import ExperimentLock, ExperimentLocked, describe_holder
from omegadit.objectives import AUX_LOSSES, OBJECTIVES
from omegadit.objectives.flow import DEFAULT_SHIFT_BASE
from omegadit.options import accepted_options, explicit_options, given_options
from omegadit.run_log import log_metrics, make_logger
from omegadit.run_state import (apply_optimizer_flags, holds_ema, load_checkpoint, load_data_state, plan_resume,
                                 save_checkpoint)
from utils import ResumableBatchSampler, ema_decay_at, lr_lambda, parse_with_config, update_ema, write_json

BACKBONE_OPTIONS = ("qk_norm", "sprint_drop_ratio", "path_drop_prob", "projector_dim")
OBJECTIVE_OPTIONS = ("path_type", "weighting", "time_shifting", "shift_base", "clip_denoised")
POSITIVE = ("log_every", "checkpointing_steps", "batch_size", "max_train_steps", "gradient_accumulation_steps",
            "num_samples", "sample_steps", "text_len", "shift_base")
NON_NEGATIVE = ("keep_last", "resume_step", "num_workers", "lr_warmup_steps", "sample_every", "learning_rate",
                "max_grad_norm", "adam_weight_decay", "adam_epsilon", "fsdp_shard_size")
FRACTIONS = ("ema_decay", "cfg_prob", "path_drop_prob", "sprint_drop_ratio", "adam_beta1", "adam_beta2")
LOCK_FILE = "train.lock"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", help="YAML file whose keys are flags of this script (flags given here override it)")
    g = p.add_argument_group("experiment")
    g.add_argument("--output-dir", default="exps")
    g.add_argument("--exp-name", required=True)
    g.add_argument("--report-to", default="none", help="none, tensorboard, wandb or all (optional packages)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=100)
    g.add_argument("--checkpointing-steps", type=int, default=10000)
    g.add_argument("--keep-last", type=int, default=0, help="keep only the newest K checkpoints (0: keep all)")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint directory to resume from")
    g.add_argument("--resume-step", type=int, default=0, help="resume from exps/<exp-name>/checkpoints/<step>")
    g.add_argument("--init-from", default=None,
                   help="initialise the weights from a checkpoint (directory, .safetensors, original OmegaDiT .pt)")
    g = p.add_argument_group("model (backbone options apply to the backbones that take them)")
    g.add_argument("--model", default="SiT-B/1", choices=BACKBONES.names())
    g.add_argument("--num-classes", type=int, default=1000, help="class labels (0: unconditional)")
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--sprint-drop-ratio", type=float, default=0.0)
    g.add_argument("--path-drop-prob", type=float, default=0.05)
    g.add_argument("--projector-dim", type=int, default=2048)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the backbone and frozen encoders (default: on with CUDA, off on CPU)")
    g.add_argument("--fp8", action="store_true",
                   help="FP8 matmuls in the blocks' linear layers (torchao Float8Linear; needs torchao and an H100 or "
                        "newer GPU; checkpoints are unchanged)")
    g.add_argument("--compile-mode", default="model", choices=COMPILE_MODES,
                   help="model: the whole forward (fastest steps); regional: compile one block and reuse it for all "
                        "(a third of the cold start, ~3%% slower steps)")
    g.add_argument("--compile-cache", default=None,
                   help="folder of the persistent compile cache, so that the next launch starts warm "
                        "(default: <output-dir>/compile_cache; 'none': torch's temporary folder)")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="replay the compiled backbone as CUDA graphs (torch.compile 'reduce-overhead'): faster steps "
                        "for small models whose steps wait on kernel launches; needs CUDA and compilation")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", required=True,
                   help="images/ + vae-in/, an image folder (data_root/<class>/*.png), a fast-DiT features path "
                        "(<name>_features/ + <name>_labels/), or a shard dataset (a folder holding index.json, or an "
                        "s3://, gs://, azure://, hf:// URL; preprocessing/dataset_tools.py pack or encode-wds)")
    g.add_argument("--data-shards", action="store_true",
                   help="--data-dir is a shard dataset (needed only where it is not recognised by itself)")
    g.add_argument("--use-json-dataset", action="store_true", help="captions from labels.json (else class labels)")
    g.add_argument("--label-file", default=None, help="labels.json to use instead of <data-dir>/labels.json")
    g.add_argument("--text-emb-dir", default=None, help="cached caption embeddings (preprocessing encode-text)")
    g.add_argument("--text-encoder", "--clip-model-id", dest="text_encoder", default=DEFAULT_TEXT_ENCODER,
                   help="text encoder: hub id, ModelScope id, local directory or 'minilm'")
    g.add_argument("--text-len", type=int, default=DEFAULT_TEXT_LEN, help="caption tokens per image")
    g.add_argument("--clip-output", default="penultimate", choices=CLIP_OUTPUTS,
                   help="the CLIP text encoder's features: its penultimate hidden state (OmegaDiT) or its last one "
                        "(U-ViT's MS-COCO models); recorded in checkpoints. Other text encoders give their last")
    g.add_argument("--tokenizer", default=checkpoint.DEFAULT_AUTOENCODER,
                   help="image autoencoder of the latents, used to decode samples (pixel, vavae:CONFIG, diffusers id)")
    g.add_argument("--batch-size", type=int, default=8, help="global batch over all processes")
    g.add_argument("--num-workers", type=int, default=4)
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-train-steps", type=int, default=400000)
    g.add_argument("--learning-rate", type=float, default=2e-5)
    g.add_argument("--lr-schedule", default="constant", choices=["constant", "warmup", "cosine"])
    g.add_argument("--lr-warmup-steps", type=int, default=0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", type=float, default=0.0)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global grad norm (0: off)")
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="keep an EMA of the weights (saved as ema.safetensors, sampled by default); --no-ema keeps "
                        "none, as the original did")
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="EMA decay min(decay, (1+n)/(10+n)) at step n")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--mixed-precision", default="fp16", choices=["no", "fp16", "bf16"])
    g.add_argument("--allow-tf32", action="store_true")
    g = p.add_argument_group("model parallelism (FSDP2: weights, gradients, optimizer and EMA sharded over processes)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the backbone block by block with torch's fully_shard; checkpoints are shards "
                        "(python -m omegadit.consolidate makes one weights file); --mixed-precision bf16 or no")
    g.add_argument("--fsdp-reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                   help="free each block's gathered weights after its forward and gather them again for the "
                        "backward (less memory); --no-...: keep them until the backward (less communication)")
    g.add_argument("--fsdp-shard-size", type=int, default=0,
                   help="shard within groups of this many processes and replicate across groups (HSDP, e.g. the "
                        "GPUs of one node); 0: shard over all processes")
    g.add_argument("--fsdp-full-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="also write the full EMA weights (the model's with --no-ema) into each checkpoint, "
                        "gathered on the main process, so that generate.py samples the checkpoint folder directly")
    g = p.add_argument_group("objective (options apply to the objectives that take them; unset, each objective's "
                             "own defaults apply, shown here for 'flow')")
    g.add_argument("--objective", default=None, choices=OBJECTIVES.names(),
                   help="default: the backbone's own (flow for SiT)")
    g.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    g.add_argument("--weighting", default="uniform", choices=["uniform", "lognormal"])
    g.add_argument("--time-shifting", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--shift-base", type=int, default=DEFAULT_SHIFT_BASE)
    g.add_argument("--clip-denoised", action=argparse.BooleanOptionalAction, default=None,
                   help="Gaussian objectives: clip the predicted data to [-1, 1] in sampling (default: on for "
                        "unnormalised pixel data, off for latents)")
    g.add_argument("--cfg-prob", type=float, default=0.1, help="caption/label dropout for guidance")
    g.add_argument("--enc-type", default="dinov2-vit-b", help="REPA target encoders, comma separated, or 'none'")
    g.add_argument("--enc-weights", default=None, help="local weights file or folder for the REPA encoders")
    g.add_argument("--proj-coeff", type=float, default=0.5)
    g.add_argument("--cfm-coeff", type=float, default=0.05)
    g.add_argument("--cfm-weighting", default="uniform", choices=["uniform", "linear"])
    g = p.add_argument_group("sampling during training")
    g.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    g.add_argument("--sample-prompts", default=None, help="prompts file (default: the first captions)")
    g.add_argument("--num-samples", type=int, default=16)
    g.add_argument("--sample-steps", type=int, default=50)
    g.add_argument("--cfg-scale", type=float, default=4.0)
    g.add_argument("--guidance-low", type=float, default=0.0, help="guidance interval of the sample grids")
    g.add_argument("--guidance-high", type=float, default=1.0)
    g = p.add_argument_group("control (--control: a ControlNet on the trained model of --init-from)")
    g.add_argument("--control", action="store_true",
                   help="train a ControlNet branch on image/mask pairs; the --init-from model stays frozen and only "
                        "the branch is saved (models/control.py)")
    g.add_argument("--control-blocks", type=int, default=None,
                   help="transformers: base blocks copied into the branch (default: half the depth; SiT: its 2 "
                        "dense blocks)")
    g.add_argument("--mask-dir", default=None, help="masks paired by name with the images (default: DATA_DIR/masks)")
    g.add_argument("--mask-prefix", default="", help="file-name prefix of the masks, e.g. seg_ (seg_001.png)")
    g.add_argument("--image-prefix", default="", help="file-name prefix of the images, e.g. Img_ (Img_001.png)")
    g.add_argument("--mask-channels", type=int, default=1, choices=[1, 3],
                   help="1: masks read as grayscale; 3: as RGB (colour-coded labels)")
    add_eval_flags(p)
    return compat.add_original_flags(p, "train")


def parse_args(argv=None):
    parser = build_parser()
    compat.apply_recipe(parser, argv, "train")
    args = compat.resolve(parser, parse_with_config(parser, argv), "train")
    check_args(parser, args)
    if args.enc_type.lower() == "none":
        args.enc_type = "none"
    args.explicit = sorted(explicit_options(parser, args, argv))
    return args


def check_args(parser, args):
    """Stop with a usage error naming the flag when a number is out of its range."""
    def bad(key, value, expected):
        parser.error(f"--{key.replace('_', '-')} must be {expected}, got {value}")

    for key in POSITIVE:
        if getattr(args, key) < 1:
            bad(key, getattr(args, key), "a positive integer")
    for key in NON_NEGATIVE:
        value = getattr(args, key)
        if not math.isfinite(value) or value < 0:
            bad(key, value, "a finite number >= 0")
    for key in FRACTIONS:
        value = getattr(args, key)
        if not 0 <= value <= 1:
            bad(key, value, "in [0, 1]")
    if args.control and not args.init_from:
        parser.error("--control trains a ControlNet on a trained model: pass its checkpoint as --init-from BASE_CKPT")
    if args.control and (args.sample_every or args.eval_every):
        parser.error("--sample-every and --eval-every do not sample with masks: with --control, sample the "
                     "checkpoints with generate.py --controlnet CKPT --mask-folder DIR")
    if args.control and args.enc_type.lower() != "none":
        parser.error("REPA does not apply to a ControlNet branch: pass --enc-type none with --control")
    if args.batch_size % args.gradient_accumulation_steps:
        parser.error(f"--batch-size {args.batch_size} is not divisible by --gradient-accumulation-steps "
                     f"{args.gradient_accumulation_steps}")
    if args.fsdp and args.fp8:
        parser.error("--fp8 with --fsdp is not supported: train with one of them")
    if args.cuda_graphs:
        check_cuda_graphs(parser, args)


def check_cuda_graphs(parser, args):
    """--cuda-graphs needs a compiled backbone on CUDA, one micro-batch per step (a graph's gradients are overwritten
    by its next replay) and no FSDP or gradient checkpointing (both call the graphs in ways they cannot replay)."""
    if not torch.cuda.is_available() or args.compile is False:
        parser.error("--cuda-graphs replays compiled CUDA kernels: it needs a CUDA GPU and compilation (drop "
                     "--no-compile)")
    for flag, clash in (("--gradient-accumulation-steps > 1", args.gradient_accumulation_steps > 1),
                        ("--fsdp", args.fsdp), ("--gradient-checkpointing", args.gradient_checkpointing)):
        if clash:
            parser.error(f"--cuda-graphs with {flag} is not supported: drop one of them")


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------

def build_dataset(args):
    """The dataset --data-dir holds; with --control, its items carry the mask of their image (control_data.py)."""
    dataset = build_image_dataset(args)
    if not args.control:
        return dataset
    from control_data import MaskedDataset
    from omegadit.shards import ShardDataset
    if isinstance(dataset, ShardDataset):
        raise ValueError(f"--control trains on a folder dataset with masks/; {args.data_dir} holds shards")
    if args.mask_dir is None and not hasattr(dataset, "images_dir"):
        raise ValueError(f"{args.data_dir} is an image folder (class folders): pass the folder of its masks as "
                         f"--mask-dir (the same relative paths)")
    mask_dir = args.mask_dir or str(Path(args.data_dir) / "masks")
    return MaskedDataset(dataset, mask_dir, args.image_prefix, args.mask_prefix, args.mask_channels)


def build_image_dataset(args):
    """The dataset of --data-dir; its images are read only when REPA encodes them."""
    from omegadit.shards import ShardDataset, is_shard_dataset
    need_images = args.enc_type != "none"
    if args.data_shards or is_shard_dataset(args.data_dir):
        if args.text_emb_dir is not None:
            raise ValueError("--text-emb-dir: shards hold their own cached caption embeddings (pack --text-emb-dir "
                             "or encode-wds --text-encoder writes them), used when they are there")
        condition = "caption" if args.use_json_dataset else "label"
        dataset = ShardDataset(args.data_dir, condition, need_images=need_images,
                               use_text_emb=None if args.use_json_dataset else False)
        classes = dataset.meta.get("num_classes", 0)
        if not args.use_json_dataset and args.num_classes < classes:
            raise ValueError(f"{args.data_dir} holds labels up to {classes - 1} but --num-classes is "
                             f"{args.num_classes}")
        return dataset
    if args.use_json_dataset:
        from json_label_dataset import JsonLabelDataset
        return JsonLabelDataset(args.data_dir, label_file=args.label_file, text_emb_dir=args.text_emb_dir,
                                need_images=need_images)
    from fast_dit_dataset import FastDiTFeatures, is_fast_dit_features
    if is_fast_dit_features(args.data_dir):  # fast-DiT's extract_features.py output: SD-VAE latents x 0.18215
        return fast_dit_features(args, FastDiTFeatures(args.data_dir))
    from image_folder_dataset import ImageFolderDataset, is_image_folder
    if is_image_folder(args.data_dir):  # data_root/<class>/*.png, encoded with --tokenizer (cached)
        dataset = ImageFolderDataset(args.data_dir, args.tokenizer)
        args.num_classes = dataset.num_classes_for(args.num_classes, "num_classes" in args.explicit)
        return dataset
    from dataset import CustomDataset
    return CustomDataset(args.data_dir, need_images=need_images)


def fast_dit_features(args, dataset):
    """fast-DiT's latents: their labels checked against --num-classes, decoded with the SD-VAE unless --tokenizer
    names a copy of it; REPA is refused (there are no images to encode)."""
    if args.enc_type != "none":
        raise ValueError(f"{args.data_dir} holds fast-DiT's pre-extracted latents and no images, which REPA "
                         f"(--enc-type {args.enc_type}) encodes: pass --enc-type none")
    if args.num_classes:
        dataset.check_classes(args.num_classes)
    if "tokenizer" not in args.explicit:
        args.tokenizer = dataset.autoencoder
    return dataset


def build_conditioner(args, dataset, device):
    """Text (captions through the text encoder, or cached embeddings) or class labels; returns (conditioner,
    the width of its caption tokens or None)."""
    if not args.use_json_dataset:
        if args.num_classes == 0:
            return UnconditionalConditioner(), None
        return ClassConditioner(args.num_classes, dropout=args.cfg_prob), None
    conditioner = TextConditioner(args.text_encoder, args.text_len, dropout=args.cfg_prob, clip_output=args.clip_output)
    cached = getattr(dataset, "use_text_emb", args.text_emb_dir is not None)
    if not cached or args.sample_every:
        conditioner.load(device)
    if not cached:
        return conditioner, conditioner.dim
    tokens, dim = dataset[0][2].shape
    if tokens != args.text_len:
        raise ValueError(f"cached caption embeddings in {args.text_emb_dir or args.data_dir} have {tokens} tokens "
                         f"but --text-len is "
                         f"{args.text_len}: pass --text-len {tokens} or re-run encode-text with --text-len "
                         f"{args.text_len}")
    recorded = (getattr(dataset, "meta", None) or {}).get("clip_output")  # shards written by encode-wds record it
    if recorded is not None and recorded != args.clip_output:
        raise ValueError(f"the caption embeddings in {args.data_dir} hold the text encoder's {recorded} hidden state "
                         f"but --clip-output is {args.clip_output}: pass --clip-output {recorded}")
    return conditioner, dim


def build_repa_encoders(args, resolution, device):
    if args.enc_type == "none":
        return []
    from models.repa_encoders import load_repa_encoders
    return load_repa_encoders(args.enc_type, resolution, device=device, weights=args.enc_weights)


def build_backbone(args, latent_shape, text_dim, z_dims):
    """The backbone `--model` names, for latents of latent_shape, with the backbone options the user set."""
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"latents must be square, got {height}x{width}")
    factory = BACKBONES.get(args.model)
    options = given_options(factory, args, BACKBONE_OPTIONS, args.model)
    if z_dims:
        options.update(accepted_options(factory, {"z_dims": z_dims}, {"z_dims"}, f"{args.model} (REPA, --enc-type)"))
    elif "z_dims" in accepted_options(factory, {"z_dims": []}, set(), args.model):
        options["z_dims"] = []
    condition = dict(text_dim=text_dim, text_len=args.text_len) if text_dim else dict(num_classes=args.num_classes)
    return factory(input_size=height, in_channels=channels, **condition, **options)


def build_objective(args, model, dataset):
    """The objective --objective names (default: the backbone's, with the backbone's settings for it), with the
    objective options the user set on top; Gaussian objectives clip their predicted data to [-1, 1] in sampling
    when the data are pixels (`--clip-denoised` / `--no-clip-denoised` to choose)."""
    name = args.objective or model.default_objective
    factory = OBJECTIVES.get(name)
    what = f"the {name!r} objective"
    defaults = dict(model.objective_defaults) if name == model.default_objective else {}
    defaults.update(accepted_options(factory, {"clip_denoised": is_pixel_data(args.tokenizer, dataset)}, set(), what))
    return factory(**{**defaults, **given_options(factory, args, OBJECTIVE_OPTIONS, what)})


def is_pixel_data(tokenizer: str, dataset) -> bool:
    """Whether the training data are pixels in [-1, 1] as the network sees them: the pixel tokenizer, left
    unnormalised (latent statistics mean 0, std 1)."""
    return is_pixel_spec(tokenizer) and bool((dataset.latent_mean == 0).all() and (dataset.latent_std == 1).all())


def build_loss(args, objective):
    aux = {"proj": (AUX_LOSSES.build("proj"), args.proj_coeff),
           "cfm": (AUX_LOSSES.build("cfm", weighting=args.cfm_weighting), args.cfm_coeff)}
    return TrainingLoss(objective, aux)


def build_control_model(args, latent_shape, resolution, device, resume_path):
    """(control model, objective, conditioner, description) of --control: a ControlNet branch around the frozen
    model of --init-from, with that checkpoint's objective and conditioner. A resumed branch must belong to it."""
    from models.control import build_control

    base = checkpoint.load(args.init_from)
    if tuple(base.model.latent_shape) != tuple(latent_shape):
        raise ValueError(f"{args.init_from} denoises latents of shape {tuple(base.model.latent_shape)}, the data of "
                         f"{args.data_dir} has {tuple(latent_shape)}")
    conditioning = "text" if args.use_json_dataset else "class"
    if base.model.conditioning != "none" and base.model.conditioning != conditioning:
        raise ValueError(f"{args.init_from} is a {base.model.conditioning}-conditioned model but the data is read "
                         f"with {conditioning} conditions: {'add' if conditioning == 'class' else 'drop'} "
                         f"--use-json-dataset")
    if resolution % latent_shape[-1]:
        raise ValueError(f"images of {resolution}px are not a whole multiple of the {latent_shape[-1]}px latents")
    model = build_control(base.model, num_blocks=args.control_blocks, mask_channels=args.mask_channels,
                          downsample=resolution // latent_shape[-1])
    description = checkpoint.describe_control(base, args.init_from, model)
    if resume_path is not None:
        checkpoint.check_control_base(checkpoint.read_description(resume_path / "model.safetensors"), base.model,
                                      args.init_from, resume_path, description["control"]["base"]["weights_sha256"])
    conditioner = base.conditioner
    if conditioner.kind == "text" and args.text_emb_dir is None:
        conditioner.load(device, args.text_encoder if "text_encoder" in args.explicit else None)
    return model, base.objective, conditioner, description


def check_repa_tokens(encoders, image, model, device):
    """REPA aligns encoder patch features token by token with the image tokens: their counts must agree."""
    with torch.no_grad():
        tokens = [encoder(image[None].to(device)).shape[1] for encoder in encoders]
    num_patches = getattr(model, "num_patches", None)
    if any(n != num_patches for n in tokens):
        raise ValueError(f"REPA encoders give {tokens} tokens for {image.shape[-1]}px images but the backbone has "
                         f"{num_patches} image tokens; choose a patch size that matches or --enc-type none")


def build_sample_writer(args, dataset, conditioner, objective, latent_shape, device):
    from models.tokenizers import LatentDecoder, load_tokenizer
    from omegadit.preview import SampleWriter
    from omegadit.prompts import read_prompts

    if args.use_json_dataset:
        prompts = read_prompts(args.sample_prompts) if args.sample_prompts else dataset.captions[:args.num_samples]
    else:
        prompts = list(range(args.num_classes)) or [""]  # unconditional (--num-classes 0): dummy conditions
    conditions = [prompts[i % len(prompts)] for i in range(args.num_samples)]
    decode = LatentDecoder(load_tokenizer(args.tokenizer, device=device), dataset.latent_mean, dataset.latent_std)
    return SampleWriter(Path(args.output_dir) / args.exp_name / "samples", objective, conditioner, decode,
                        conditions, latent_shape, device, seed=args.seed, num_steps=args.sample_steps,
                        cfg_scale=args.cfg_scale, interval=(args.guidance_low, args.guidance_high))


def compile_for_training(model, frozen, mode="regional", cuda_graphs=False):
    """torch.compile, in place, the regions the backbone offers and the networks inside the frozen encoders: their
    repeated blocks one by one (mode 'regional') or whole ('model'; omegadit/compilation.py); the backbone's
    regions replayed as CUDA graphs with `cuda_graphs`."""
    compile_backbone(model, mode, cuda_graphs)
    for wrapper in frozen:
        compile_frozen(wrapper.model, mode)


# ------------------------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------------------------

def main(args):
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        print("fp16 mixed precision needs a GPU; training in float32 on this machine (--mixed-precision no)")
        args.mixed_precision = "no"
    if args.fsdp:
        from omegadit import sharding  # needs a recent torch; runs without --fsdp do not
        sharding.check_mixed_precision(args.mixed_precision)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=str(Path(args.output_dir) / args.exp_name))
    if args.cuda_graphs and accelerator.num_processes > 1:
        raise SystemExit(f"--cuda-graphs was measured on one GPU only; with {accelerator.num_processes} processes "
                         f"it is untried: drop --cuda-graphs")
    exp_dir = Path(args.output_dir) / args.exp_name
    lock = lock_experiment(accelerator, exp_dir / LOCK_FILE)
    try:
        train(args, accelerator, exp_dir, lock)
    finally:
        if lock is not None:
            lock.release()


def lock_experiment(accelerator, path):
    """The main process locks the experiment folder (None on the others); every process learns whether it
    could, so that all of them stop together when another run holds it."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = ExperimentLock.acquire(path)
        except ExperimentLocked as err:
            refusal = str(err)
    refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise ExperimentLocked(refusal)
    return lock


def train(args, accelerator, exp_dir, lock):
    """Build every part, resume or start, and run the loop until --max-train-steps, Ctrl-C or a non-finite loss."""
    device = accelerator.device
    log = make_logger(accelerator, exp_dir)
    if lock is not None and lock.took_over:
        log(f"took over the stale lock {lock.path} of {describe_holder(lock.took_over)}, which no longer runs")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed + accelerator.process_index)

    # Everything that can fail on bad input fails here, before the first step.
    dataset = build_dataset(args)  # may settle --num-classes (image folders), which resume compares
    plan = plan_resume(args, accelerator.num_processes)
    for note in plan.notes:
        log(f"resume: {note}")
    image, latent, *_ = dataset[0]
    resolution = getattr(dataset, "resolution", image.shape[-1])  # datasets without images state it
    latent_shape = tuple(latent.shape)
    compat.check_training_data(args, resolution, latent_shape)
    if args.control:
        model, objective, conditioner, description = build_control_model(args, latent_shape, resolution, device,
                                                                         plan.path)
        encoders = []
        model_name = description["backbone"].get("name", description["backbone"]["architecture"])
        log(f"ControlNet branch ({model.architecture}, {model.config}) on the frozen {model_name} of "
            f"{args.init_from}; masks from {dataset.mask_dir}")
    else:
        model_name = args.model
        conditioner, text_dim = build_conditioner(args, dataset, device)
        encoders = build_repa_encoders(args, resolution, device)
        model = build_backbone(args, latent_shape, text_dim, [e.z_dim for e in encoders])
        if encoders:
            check_repa_tokens(encoders, image, model, device)
        objective = build_objective(args, model, dataset)
        description = checkpoint.describe(args.model, model, objective, conditioner, args.tokenizer,
                                          (dataset.latent_mean, dataset.latent_std),
                                          {"sampler": objective.default_sampler, **model.sampling_defaults})
        if args.init_from and plan.path is None:
            checkpoint.load_state_dict_checked(model, checkpoint.load(args.init_from).model.state_dict(),
                                               args.init_from, args.model)
            log(f"initialised weights from {args.init_from}")
    loss_fn = build_loss(args, objective)
    model.seed_training_rng(args.seed)
    model.set_gradient_checkpointing(args.gradient_checkpointing)
    if args.fsdp:
        model, ema = shard_for_training(args, model, device)
    else:
        ema = deepcopy(model).to(device).eval().requires_grad_(False) if args.ema else None
        if args.fp8:
            log(f"FP8 training: {convert_blocks_to_float8(model)} linear layers of the blocks run in float8")
        model.to(device).train()
    if args.enc_type == "none":
        log("REPA is off (--enc-type none): the projection loss is 0")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{model_name}: {sum(p.numel() for p in model.parameters()):,} parameters ({trainable:,} trained); "
        f"objective {objective.name}; "
        f"data {args.data_dir}: {len(dataset):,} items, latents {latent_shape}, images {resolution}px")

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_schedule, args.lr_warmup_steps, args.max_train_steps))
    sampler = (build_sample_writer(args, dataset, conditioner, objective, latent_shape, device)
               if args.sample_every else None)
    evaluator = build_evaluator(args, dataset, conditioner, objective, latent_shape, device)

    if compile_enabled(args.compile, device):
        cache = use_compile_cache(args.compile_cache or Path(args.output_dir) / "compile_cache")
        log(f"torch.compile ({args.compile_mode}{', CUDA graphs' if args.cuda_graphs else ''}); compile cache: "
            f"{cache or 'torch default'}")
        text_encoder = getattr(conditioner, "encoder", None)
        compile_for_training(model, ([text_encoder] if text_encoder is not None else []) + encoders,
                             args.compile_mode, args.cuda_graphs)
    if not args.fsdp:  # a sharded model is not wrapped again (DDP)
        model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    step = 0
    if plan.path is not None:
        step = load_checkpoint(plan.path, accelerator, model, ema, optimizer, scheduler)
        apply_optimizer_flags(optimizer, scheduler, args)
        log(f"resumed from {plan.path} at step {step}")
        if ema is not None and not holds_ema(plan.path):
            log(f"{plan.path} holds no EMA (trained with --no-ema): the EMA starts from its weights")
    elif accelerator.is_main_process:
        exp_dir.mkdir(parents=True, exist_ok=True)
        write_json(exp_dir / "args.json", vars(args))
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.exp_name, config={k: v for k, v in vars(args).items() if v is not None})

    batches, data_state = build_batches(args, dataset, accelerator, step, plan.path, log,
                                        conditioner.batch_transform())

    waited = {"seconds": 0.0}  # host time blocked on the loader since the last log line

    def next_micro_batch():
        wait_start = time.perf_counter()
        images, latents, conditions, *masks = next(batches)
        waited["seconds"] += time.perf_counter() - wait_start
        images = images.to(device, non_blocking=True)
        latents = latents.to(device, non_blocking=True)
        y = conditioner(conditions, device)
        model_kwargs = dict(y=conditioner.drop(y, raw_model.null_condition(y.shape[0], device)))
        if masks:
            model_kwargs["control"] = mask_input(masks[0].to(device, non_blocking=True))
        with torch.no_grad(), accelerator.autocast():
            targets = [encoder(images) for encoder in encoders]
        return latents, model_kwargs, targets

    interrupted = {"flag": False}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    non_finite = torch.zeros((), device=device, dtype=torch.bool)
    names = ["loss", *loss_fn.term_names]
    sums = None
    window_start, window_steps = time.perf_counter(), 0
    started, start_step, last_saved = time.perf_counter(), step, plan.path
    progress = tqdm(total=args.max_train_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    try:
        while step < args.max_train_steps and not interrupted["flag"]:
            for micro in range(args.gradient_accumulation_steps):
                latents, model_kwargs, targets = next_micro_batch()
                sync = micro == args.gradient_accumulation_steps - 1
                mark_step(args.cuda_graphs)
                parts = forward_backward(accelerator, model, loss_fn, latents, model_kwargs, targets, args, sync)
                sums = parts if sums is None else sums + parts
                non_finite |= ~torch.isfinite(parts[0])
            grad_norm = optimizer_step(accelerator, model, ema, optimizer, scheduler, args, step)
            step += 1
            window_steps += 1
            progress.update(1)

            checkpoint_due = step % args.checkpointing_steps == 0 or step == args.max_train_steps
            if step % args.log_every == 0 or checkpoint_due:
                if any_true(accelerator, non_finite):
                    log(f"stopped: non-finite loss at or before step {step}; {last_good(last_saved)}")
                    raise SystemExit(1)
                elapsed = time.perf_counter() - window_start
                mean = accelerator.reduce(sums, "mean") / (window_steps * args.gradient_accumulation_steps)
                slowest_wait = accelerator.gather(torch.tensor([waited["seconds"]], device=device)).max().item()
                record = {"step": step, **{("loss" if n == "loss" else f"loss_{n}"): v
                                           for n, v in zip(names, mean.tolist())},
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                          "step_time": elapsed / window_steps, "data_wait": slowest_wait / window_steps,
                          "images_per_sec": window_steps * args.batch_size / elapsed}
                log_metrics(accelerator, exp_dir, record, loss_fn.term_names)
                progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.1f}")
                sums, window_start, window_steps, waited["seconds"] = None, time.perf_counter(), 0, 0.0
            sample_due = sampler is not None and step % args.sample_every == 0
            eval_due = evaluator is not None and step % args.eval_every == 0
            if args.fsdp and (sample_due or eval_due):
                sampled_ema, sampled_raw = gather_for_sampling(raw_model, ema, description, device), None
            else:
                sampled_ema, sampled_raw = ema, raw_model
            if sample_due:
                if accelerator.is_main_process:
                    log(f"samples written to {write_samples(sampler, sampled_ema, sampled_raw, step, accelerator)}")
                accelerator.wait_for_everyone()
            if eval_due:  # FID; its time is not counted as step time
                window_start += evaluator.run(accelerator, sampled_raw if sampled_ema is None else sampled_ema,
                                              step, exp_dir, log)
            if checkpoint_due:
                last_saved = save_checkpoint(accelerator, args, step, model, ema, optimizer, scheduler, description,
                                             data_state())
                log(f"saved checkpoint {last_saved}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        progress.close()
    if interrupted["flag"]:
        if any_true(accelerator, non_finite):
            log(f"interrupted after a non-finite loss; no checkpoint written; {last_good(last_saved)}")
            raise SystemExit(1)
        path = save_checkpoint(accelerator, args, step, model, ema, optimizer, scheduler, description, data_state())
        log(f"interrupted: saved checkpoint {path}; continue with --resume latest")
        raise SystemExit(130)
    accelerator.end_training()
    log(f"done at step {step}: {step - start_step} steps in {time.perf_counter() - started:.1f}s")


def build_batches(args, dataset, accelerator, step, resume_path, log, transform=None):
    """(endless micro-batches of this process, a function giving the loader state to checkpoint). A folder
    dataset's position is the step (ResumableBatchSampler; no state); a shard dataset's is LitData's loader state,
    saved in each checkpoint and restored from `resume_path`. `transform` (the conditioner's batch_transform:
    caption tokenization) runs on each batch's conditions in the loader's workers."""
    from omegadit.shards import ShardDataset

    micro_batch = args.batch_size // args.gradient_accumulation_steps
    pin_memory = accelerator.device.type == "cuda"
    collate_fn = collate if transform is None else TransformConditions(collate, transform)
    if not isinstance(dataset, ShardDataset):
        batch_sampler = ResumableBatchSampler(len(dataset), micro_batch, accelerator.process_index,
                                              accelerator.num_processes, args.seed,
                                              start_batch=step * args.gradient_accumulation_steps)
        loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.num_workers, collate_fn=collate_fn,
                            pin_memory=pin_memory, persistent_workers=args.num_workers > 0,
                            generator=torch.Generator().manual_seed(args.seed))
        return iter(loader), lambda: None
    if micro_batch % accelerator.num_processes:
        raise ValueError(f"--batch-size {args.batch_size} (per micro-batch {micro_batch}) is not divisible by the "
                         f"{accelerator.num_processes} processes")
    loader = dataset.loader(micro_batch // accelerator.num_processes, args.num_workers, args.seed, collate_fn,
                            pin_memory)
    if resume_path is not None:
        state = load_data_state(resume_path, accelerator.process_index)
        if state is None:
            log(f"resume: WARNING: {resume_path} holds no data loader state of process {accelerator.process_index}: "
                f"the shards start a new epoch, so the resume is not exact")
        else:
            for note in loader.load_state_dict(state):
                log(f"resume: {note}")
    return loader, loader.state_dict


def forward_backward(accelerator, model, loss_fn, latents, model_kwargs, targets, args, sync=True):
    """Loss and gradients of one micro-batch (model_kwargs: y, and the control input of a ControlNet); returns the
    detached [total, *terms] (no host sync)."""
    with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
        loss, terms = loss_fn(model, latents, model_kwargs, targets)
        accelerator.backward(loss / args.gradient_accumulation_steps)
    return torch.stack([loss.detach().float(), *terms.values()])


def optimizer_step(accelerator, model, ema, optimizer, scheduler, args, step):
    """Clip, step the optimizer and the schedule, update the EMA (of `step` steps before this one); returns the
    grad norm as a device tensor. Parameters the backbone did not use in this step are left untouched."""
    raw = accelerator.unwrap_model(model)
    for parameter in raw.take_unused_parameters():
        parameter.grad = None
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under --fsdp
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        update_ema(ema, raw, ema_decay_at(step, args.ema_decay, args.ema_warmup))
    return grad_norm


def shard_for_training(args, model, device):
    """(model, EMA or None) sharded with FSDP2 per `shard_units`, on `device`, both starting from the main
    process's weights."""
    from omegadit import sharding

    mesh = sharding.device_mesh(device, args.fsdp_shard_size)
    full = model.state_dict()
    ema = deepcopy(model).eval().requires_grad_(False) if args.ema else None
    param_dtype = sharding.PARAM_DTYPES[args.mixed_precision]
    sharding.shard(model, model.shard_units(), mesh, param_dtype, args.fsdp_reshard_after_forward)
    sharding.load_full_state_dict(model, full)
    if ema is not None:
        sharding.shard(ema, ema.shard_units(), mesh)
        sharding.load_full_state_dict(ema, full)
    return model.train(), ema


def gather_for_sampling(raw_model, ema, description, device):
    """Under --fsdp: a full copy of the EMA (or of the raw weights) in eval mode on the main process, for sample
    grids and FID; None on the others. Every process must call it."""
    from omegadit import sharding

    weights = sharding.full_state_dict(raw_model if ema is None else ema)
    if not weights:
        return None
    backbone = description["backbone"]
    model = rebuild_backbone(backbone["architecture"], backbone["config"])
    checkpoint.load_state_dict_checked(model, weights, "the gathered training weights", backbone["name"])
    return model.to(device).eval()


def write_samples(sampler, ema, raw_model, step, accelerator):
    """A sample grid of the EMA, or of the raw weights (in eval mode for the call) when there is no EMA."""
    if ema is not None:
        return sampler.write(ema, step, accelerator.autocast)
    raw_model.eval()
    try:
        return sampler.write(raw_model, step, accelerator.autocast)
    finally:
        raw_model.train()


def last_good(path):
    """Which checkpoint a run stopped by a non-finite loss leaves to resume from."""
    if path is None:
        return "no good checkpoint exists: this run saved none and did not resume from one"
    return f"the last good checkpoint is {path} (continue from it with --resume {path})"


def any_true(accelerator, flag):
    """True when the flag is set on any process (one host sync)."""
    return bool(accelerator.reduce(flag.float(), "max"))


if __name__ == "__main__":
    main(parse_args())
