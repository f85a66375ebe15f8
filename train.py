"""Train an OmegaDiT SiT on pre-encoded latents with accelerate: `accelerate launch train.py --help`."""
import argparse
import json
import math
import os
import re
import shutil
import signal
import time
from contextlib import nullcontext
from copy import deepcopy
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from json_label_dataset import collate
from loss import SILoss
from models.sit import SiT_models, load_reference_checkpoint, save_model
from utils import (ResumableBatchSampler, commit_directory, image_grid, lr_lambda, parse_with_config, rng_state,
                   set_rng_state, update_ema, write_json)

CHECKPOINT_NAME = re.compile(r"^\d{7}$")


def parse_args(argv=None):
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
    g.add_argument("--init-from", default=None, help="initialise weights from a checkpoint of the original train.py")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="SiT-B/1", choices=sorted(SiT_models))
    g.add_argument("--num-classes", type=int, default=1000)
    g.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--sprint-drop-ratio", type=float, default=0.0)
    g.add_argument("--path-drop-prob", type=float, default=0.05)
    g.add_argument("--projector-dim", type=int, default=2048)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the transformer blocks (default: on with CUDA, off on CPU)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", required=True)
    g.add_argument("--use-json-dataset", action="store_true", help="captions from labels.json (else class labels)")
    g.add_argument("--label-file", default=None, help="labels.json to use instead of <data-dir>/labels.json")
    g.add_argument("--text-emb-dir", default=None, help="cached caption embeddings (preprocessing encode-text)")
    g.add_argument("--clip-model-id", default="AI-ModelScope/CLIP-GmP-ViT-L-14",
                   help="text encoder: hub id, ModelScope id or local directory")
    g.add_argument("--text-len", type=int, default=77, help="caption tokens per image (padded or truncated)")
    g.add_argument("--tokenizer", default="vavae:tokenizer/configs/vavae_f16d32_vfdinov2.yaml",
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
    g.add_argument("--ema-decay", type=float, default=0.9999)
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--mixed-precision", default="fp16", choices=["no", "fp16", "bf16"])
    g.add_argument("--allow-tf32", action="store_true")
    g = p.add_argument_group("objective")
    g.add_argument("--path-type", default="linear", choices=["linear", "cosine"])
    g.add_argument("--prediction", default="v", choices=["v"])
    g.add_argument("--weighting", default="uniform", choices=["uniform", "lognormal"])
    g.add_argument("--cfg-prob", type=float, default=0.1)
    g.add_argument("--enc-type", default="dinov2-vit-b", help="REPA target encoders, comma separated, or 'none'")
    g.add_argument("--enc-weights", default=None, help="local weights file or folder for the REPA encoders")
    g.add_argument("--proj-coeff", type=float, default=0.5)
    g.add_argument("--cfm-coeff", type=float, default=0.05)
    g.add_argument("--cfm-weighting", default="uniform", choices=["uniform", "linear"])
    g.add_argument("--time-shifting", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--shift-base", type=int, default=4096)
    g = p.add_argument_group("sampling during training")
    g.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    g.add_argument("--sample-prompts", default=None, help="text file, one prompt per line (default: first captions)")
    g.add_argument("--num-samples", type=int, default=16)
    g.add_argument("--sample-steps", type=int, default=50)
    g.add_argument("--cfg-scale", type=float, default=4.0)
    args = parse_with_config(p, argv)
    if args.enc_type.lower() == "none":
        args.enc_type = "none"
    return args


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------

def build_dataset(args):
    if args.use_json_dataset:
        from json_label_dataset import JsonLabelDataset
        return JsonLabelDataset(args.data_dir, label_file=args.label_file, text_emb_dir=args.text_emb_dir)
    from dataset import CustomDataset
    return CustomDataset(args.data_dir)


def build_text_encoder(args, device):
    """The frozen caption encoder, or None when captions come cached or the model is class-conditional."""
    if not args.use_json_dataset or args.text_emb_dir:
        return None
    from models.text_encoder import TextEncoder
    return TextEncoder.load(args.clip_model_id, device=device, max_length=args.text_len)


def cached_text_dim(dataset, args):
    """Width of the cached caption embeddings, after checking that they hold --text-len tokens."""
    tokens, dim = dataset[0][2].shape
    if tokens != args.text_len:
        raise ValueError(f"cached caption embeddings in {args.text_emb_dir} have {tokens} tokens but --text-len is "
                         f"{args.text_len}: pass --text-len {tokens} or re-run encode-text with --text-len "
                         f"{args.text_len}")
    return dim


def build_repa_encoders(args, resolution, device):
    if args.enc_type == "none":
        return []
    from models.repa_encoders import load_repa_encoders
    return load_repa_encoders(args.enc_type, resolution, device=device, weights=args.enc_weights)


def build_model(args, latent_shape, text_dim, z_dims):
    channels, height, width = latent_shape
    if height != width:
        raise ValueError(f"latents must be square, got {height}x{width}")
    if text_dim is not None:
        conditioning = dict(text_dim=text_dim, text_len=args.text_len)
    else:
        conditioning = dict(num_classes=args.num_classes)
    return SiT_models[args.model](
        input_size=height, in_channels=channels, z_dims=z_dims, projector_dim=args.projector_dim,
        cfg_prob=args.cfg_prob, qk_norm=args.qk_norm, sprint_drop_ratio=args.sprint_drop_ratio,
        path_drop_prob=args.path_drop_prob, **conditioning,
    )


def compile_for_training(model, frozen):
    """torch.compile the SiT (block by block under gradient checkpointing, whose memory saving a whole-graph
    compile would undo) and the networks inside the frozen encoders, in place: state-dict keys stay the same."""
    if model.gradient_checkpointing:
        for block in model.blocks:
            block.compile()
    else:
        model.compile()
    for wrapper in frozen:
        if wrapper is not None:
            wrapper.model.compile()


def check_repa_tokens(encoders, image, num_patches, model_name, device):
    """REPA aligns encoder patch features token by token with the SiT image tokens: their counts must agree."""
    with torch.no_grad():
        tokens = [encoder(image[None].to(device)).shape[1] for encoder in encoders]
    if any(n != num_patches for n in tokens):
        raise ValueError(f"REPA encoders give {tokens} tokens for {image.shape[-1]}px images but {model_name} has "
                         f"{num_patches} image tokens; choose a patch size that matches or --enc-type none")


def checkpoint_root(args):
    return Path(args.output_dir) / args.exp_name / "checkpoints"


def find_resume_dir(args):
    """The checkpoint directory to resume from, or None for a fresh run."""
    root = checkpoint_root(args)
    if args.resume_step:
        path = root / f"{args.resume_step:07d}"
    elif args.resume == "latest":
        steps = sorted(d.name for d in root.glob("*") if d.is_dir() and CHECKPOINT_NAME.match(d.name))
        if not steps:
            return None
        path = root / steps[-1]
    elif args.resume:
        path = Path(args.resume)
    else:
        return None
    if not (path / "training_state.pt").exists():
        raise FileNotFoundError(f"no complete checkpoint at {path} (training_state.pt missing)")
    return path


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------------

def save_checkpoint(accelerator, args, step, model, ema, optimizer, scheduler):
    """Write exps/<exp>/checkpoints/<step> atomically: weights (safetensors), optimizer, schedule, RNG per rank."""
    root = checkpoint_root(args)
    final = root / f"{step:07d}"
    tmp = root / f"{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        save_model(raw, tmp / "model.safetensors")
        save_model(ema, tmp / "ema.safetensors")
        torch.save({
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "path_drop_generator": raw.path_drop_generator.get_state(),
            "batches_consumed": step * args.gradient_accumulation_steps,
        }, tmp / "training_state.pt")
        write_json(tmp / "args.json", vars(args))
        commit_directory(tmp, final)
        if args.keep_last > 0:
            steps = sorted(d for d in root.glob("*") if d.is_dir() and CHECKPOINT_NAME.match(d.name))
            for old in steps[:-args.keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path, accelerator, model, ema, optimizer, scheduler):
    """Restore everything `save_checkpoint` wrote; returns the step."""
    raw = accelerator.unwrap_model(model)
    raw.load_state_dict(load_file(str(path / "model.safetensors")))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    raw.path_drop_generator.set_state(state["path_drop_generator"])
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state["step"]


# ------------------------------------------------------------------------------------------------------------------
# Sampling during training
# ------------------------------------------------------------------------------------------------------------------

class SampleWriter:
    """Writes a grid of samples from fixed noise and fixed prompts (or labels) with the EMA model."""

    def __init__(self, args, dataset, text_encoder, latent_shape, device):
        from json_label_dataset import load_latent_stats
        from models.tokenizers import load_tokenizer

        self.args = args
        self.tokenizer = load_tokenizer(args.tokenizer, device=device)
        mean, std = load_latent_stats(Path(args.data_dir) / "vae-in" / "latents_stats.pt")
        self.mean, self.std = mean.to(device), std.to(device)
        generator = torch.Generator().manual_seed(args.seed)
        self.noise = torch.randn(args.num_samples, *latent_shape, generator=generator).to(device)
        if args.use_json_dataset:
            if args.sample_prompts:
                prompts = [l.strip() for l in Path(args.sample_prompts).read_text().splitlines() if l.strip()]
            else:
                prompts = dataset.captions[: args.num_samples]
            self.captions = [prompts[i % len(prompts)] for i in range(args.num_samples)]
            encoder = text_encoder or _load_text_encoder_for_samples(args, device)
            self.condition = encoder(self.captions)
        else:
            labels = torch.arange(args.num_samples) % args.num_classes
            self.captions = [str(int(label)) for label in labels]
            self.condition = labels.to(device)
        self.directory = Path(args.output_dir) / args.exp_name / "samples"
        self.directory.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def write(self, ema, step, autocast):
        from samplers import euler_maruyama_sampler

        with autocast():
            latents = euler_maruyama_sampler(
                ema, self.noise, self.condition, num_steps=self.args.sample_steps, cfg_scale=self.args.cfg_scale,
                path_type=self.args.path_type, y_null=ema.null_condition(len(self.noise), self.noise.device),
                time_shifting=self.args.time_shifting, shift_base=self.args.shift_base,
                generator=torch.Generator(self.noise.device).manual_seed(self.args.seed),
            )
        images = self.tokenizer.decode(latents.float() * self.std + self.mean)
        path = self.directory / f"{step:07d}.png"
        image_grid(images.permute(0, 2, 3, 1).cpu().numpy(), self.captions).save(path)
        return path


def _load_text_encoder_for_samples(args, device):
    from models.text_encoder import TextEncoder
    return TextEncoder.load(args.clip_model_id, device=device, max_length=args.text_len)


# ------------------------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------------------------

def main(args):
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        print("fp16 mixed precision needs a GPU; training in float32 on this machine (--mixed-precision no)")
        args.mixed_precision = "no"
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=args.mixed_precision,
                              log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=str(Path(args.output_dir) / args.exp_name))
    device = accelerator.device
    exp_dir = Path(args.output_dir) / args.exp_name
    log = make_logger(accelerator, exp_dir)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed + accelerator.process_index)

    # Everything that can fail on bad input fails here, before the first step.
    dataset = build_dataset(args)
    image, latent, _ = dataset[0]
    resolution = image.shape[-1]
    text_encoder = build_text_encoder(args, device)
    encoders = build_repa_encoders(args, resolution, device)
    if args.use_json_dataset:
        text_dim = text_encoder.dim if text_encoder is not None else cached_text_dim(dataset, args)
    else:
        text_dim = None
    model = build_model(args, tuple(latent.shape), text_dim, [e.z_dim for e in encoders])
    check_repa_tokens(encoders, image, model.num_patches, args.model, device)
    if args.init_from:
        reference = load_reference_checkpoint(args.init_from)
        model.load_state_dict(reference.state_dict())
        log(f"initialised weights from the original checkpoint {args.init_from}")
    model.path_drop_generator.manual_seed(args.seed)
    model.gradient_checkpointing = args.gradient_checkpointing
    ema = deepcopy(model).to(device).eval().requires_grad_(False)
    model.to(device).train()
    if args.enc_type == "none":
        log("REPA is off (--enc-type none): the projection loss is 0")
    log(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; data {args.data_dir}: "
        f"{len(dataset):,} items, latents {tuple(latent.shape)}, images {resolution}px")

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_schedule, args.lr_warmup_steps, args.max_train_steps))
    loss_fn = SILoss(prediction=args.prediction, path_type=args.path_type, weighting=args.weighting,
                     cfm_weighting=args.cfm_weighting, apply_time_shift=args.time_shifting,
                     shift_base=args.shift_base)
    sampler = SampleWriter(args, dataset, text_encoder, tuple(latent.shape), device) if args.sample_every else None

    if args.compile if args.compile is not None else device.type == "cuda":
        compile_for_training(model, [text_encoder, *encoders])
    model, optimizer = accelerator.prepare(model, optimizer)

    step = 0
    resume_dir = find_resume_dir(args)
    if resume_dir is not None:
        step = load_checkpoint(resume_dir, accelerator, model, ema, optimizer, scheduler)
        log(f"resumed from {resume_dir} at step {step}")
    elif accelerator.is_main_process:
        exp_dir.mkdir(parents=True, exist_ok=True)
        write_json(exp_dir / "args.json", vars(args))
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(args.exp_name, config={k: v for k, v in vars(args).items() if v is not None})

    batch_sampler = ResumableBatchSampler(len(dataset), args.batch_size // args.gradient_accumulation_steps,
                                          accelerator.process_index, accelerator.num_processes, args.seed,
                                          start_batch=step * args.gradient_accumulation_steps)
    loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.num_workers, collate_fn=collate,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    batches = iter(loader)

    def condition(caption_batch):
        if text_encoder is not None:
            return text_encoder(list(caption_batch))
        return caption_batch.to(device)

    def next_micro_batch():
        images, latents, captions = next(batches)
        images = images.to(device, non_blocking=True)
        latents = latents.to(device, non_blocking=True)
        with torch.no_grad(), accelerator.autocast():
            targets = [encoder(images) for encoder in encoders]
            y = condition(captions)
        return latents, y, targets

    interrupted = {"flag": False}
    previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    non_finite = torch.zeros((), device=device, dtype=torch.bool)
    sums = None
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm(total=args.max_train_steps, initial=step, desc="train", disable=not accelerator.is_main_process)
    try:
        while step < args.max_train_steps and not interrupted["flag"]:
            for micro in range(args.gradient_accumulation_steps):
                latents, y, targets = next_micro_batch()
                sync = micro == args.gradient_accumulation_steps - 1
                parts = forward_backward(accelerator, model, loss_fn, latents, y, targets, args, sync)
                sums = parts if sums is None else sums + parts
                non_finite |= ~torch.isfinite(parts[0])
            grad_norm = optimizer_step(accelerator, model, ema, optimizer, scheduler, args)
            step += 1
            window_steps += 1
            progress.update(1)

            checkpoint_due = step % args.checkpointing_steps == 0 or step == args.max_train_steps
            if step % args.log_every == 0 or checkpoint_due:
                if any_true(accelerator, non_finite):
                    log(f"stopped: non-finite loss at or before step {step}; the last good checkpoint is kept")
                    raise SystemExit(1)
                elapsed = time.perf_counter() - window_start
                mean = accelerator.reduce(sums, "mean") / (window_steps * args.gradient_accumulation_steps)
                record = dict(step=step, loss=mean[0].item(), loss_denoise=mean[1].item(), loss_proj=mean[2].item(),
                              loss_cfm=mean[3].item(), lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                              step_time=elapsed / window_steps, images_per_sec=window_steps * args.batch_size / elapsed)
                log_metrics(accelerator, exp_dir, record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_sec']:.1f}")
                sums, window_start, window_steps = None, time.perf_counter(), 0
            if sampler is not None and step % args.sample_every == 0:
                if accelerator.is_main_process:
                    log(f"samples written to {sampler.write(ema, step, accelerator.autocast)}")
                accelerator.wait_for_everyone()
            if checkpoint_due:
                log(f"saved checkpoint {save_checkpoint(accelerator, args, step, model, ema, optimizer, scheduler)}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        progress.close()
    if interrupted["flag"]:
        if any_true(accelerator, non_finite):
            log(f"interrupted after a non-finite loss; no checkpoint written, the last good one is kept")
            raise SystemExit(1)
        path = save_checkpoint(accelerator, args, step, model, ema, optimizer, scheduler)
        log(f"interrupted: saved checkpoint {path}; continue with --resume latest")
        raise SystemExit(130)
    accelerator.end_training()
    log("done")


def forward_backward(accelerator, model, loss_fn, latents, y, targets, args, sync=True):
    """Loss and gradients of one micro-batch; returns the detached [total, denoise, proj, cfm] (no host sync)."""
    with (nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
        out = loss_fn(model, latents, dict(y=y), targets)
        loss = out.total(args.proj_coeff, args.cfm_coeff)
        accelerator.backward(loss / args.gradient_accumulation_steps)
    return torch.stack([loss.detach(), out.denoising.detach().mean(), out.proj.detach().float(),
                        out.cfm.detach().float()])


def optimizer_step(accelerator, model, ema, optimizer, scheduler, args):
    """Clip, step the optimizer and the schedule, update the EMA; returns the grad norm as a device tensor."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, accelerator.unwrap_model(model), args.ema_decay)
    return grad_norm


def any_true(accelerator, flag):
    """True when the flag is set on any process (one host sync)."""
    return bool(accelerator.reduce(flag.float(), "max"))


def make_logger(accelerator, exp_dir):
    """Console + exps/<exp>/log.txt logging from the main process only."""
    def log(message):
        if accelerator.is_main_process:
            exp_dir.mkdir(parents=True, exist_ok=True)
            line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
            tqdm.write(line)
            with open(exp_dir / "log.txt", "a") as f:
                f.write(line + "\n")
    return log


def log_metrics(accelerator, exp_dir, record):
    """One metrics record to the console, exps/<exp>/metrics.jsonl and the trackers (main process only)."""
    if not accelerator.is_main_process:
        return
    tqdm.write("step {step}: loss {loss:.4f} (denoise {loss_denoise:.4f}, proj {loss_proj:.4f}, cfm {loss_cfm:.4f}) "
               "lr {lr:.2e} grad_norm {grad_norm:.3f} {step_time:.3f}s/step {images_per_sec:.1f} img/s"
               .format(**record))
    with open(exp_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


if __name__ == "__main__":
    main(parse_args())
