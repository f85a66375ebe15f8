"""Training checkpoints of train.py: exps/<exp>/checkpoints/<step>/ with the self-describing weights
(model.safetensors; ema.safetensors unless the run keeps no EMA), the optimizer, schedule and per-rank random
states, written atomically. Under --fsdp the weights, EMA and optimizer moments are shards written by every process
(sharded/, omegadit/sharding.py), with the full EMA (or model) weights beside them unless
--no-fsdp-full-weights; `python -m omegadit.consolidate` makes the single weights file from the shards."""
import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from omegadit.checkpoint import SHARDED_DIR, is_sharded, load_weights, save_weights
from utils import commit_directory, rng_state, set_rng_state, write_json

CHECKPOINT_NAME = re.compile(r"^\d{7}$")
REQUIRED_FILES = ("model.safetensors", "training_state.pt")  # ema.safetensors: only when the run keeps an EMA
SHARDED_REQUIRED = (SHARDED_DIR, "training_state.pt", "description.json")

# What resume does with a flag whose value differs from the checkpoint's args.json. Frozen flags define the model,
# objective and data order being trained: a change is refused. Applied flags take their new value (and are
# logged). Flags in no family are treated as frozen.
FROZEN_ON_RESUME = (
    "model", "num_classes", "qk_norm", "sprint_drop_ratio", "path_drop_prob", "projector_dim",
    "use_json_dataset", "text_len", "clip_output", "batch_size", "gradient_accumulation_steps", "seed",
    "objective", "path_type", "weighting", "time_shifting", "shift_base", "cfg_prob", "enc_type", "proj_coeff",
    "cfm_coeff", "cfm_weighting", "ema", "control", "control_blocks", "mask_channels", "fsdp",
)
APPLIED_ON_RESUME = (
    "output_dir", "exp_name", "report_to", "log_every", "checkpointing_steps", "keep_last",
    "gradient_checkpointing", "compile", "data_dir", "data_shards", "label_file", "text_emb_dir", "text_encoder",
    "tokenizer",
    "num_workers", "enc_weights", "max_train_steps", "learning_rate", "lr_schedule", "lr_warmup_steps",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "ema_decay",
    "mixed_precision", "allow_tf32", "sample_every", "sample_prompts", "num_samples", "sample_steps", "cfg_scale",
    "guidance_low", "guidance_high", "ema_warmup", "fp8", "compile_mode", "compile_cache", "cuda_graphs",
    "clip_denoised",
    "eval_every", "eval_ref", "eval_num_samples", "eval_batch_size", "eval_steps", "eval_sampler", "eval_cfg_scale",
    "eval_prompts", "eval_inception_weights", "eval_alignment", "eval_class_names", "mask_dir", "mask_prefix",
    "image_prefix",
    "fsdp_reshard_after_forward", "fsdp_shard_size", "fsdp_full_weights",
)
# --recipe and the original's own flags (args.original_*) act through the flags they set, which are compared.
NOT_COMPARED = ("config", "explicit", "resume", "resume_step", "init_from", "recipe")
ORIGINAL_FLAG_PREFIX = "original_"


def compared_on_resume(key: str) -> bool:
    """Whether resume compares flag `key` with the checkpoint's args.json."""
    return key not in NOT_COMPARED and not key.startswith(ORIGINAL_FLAG_PREFIX)


class ResumePlan(NamedTuple):
    """The checkpoint to resume from (None: a fresh run at step 0) and what resume did, as log lines."""
    path: Optional[Path]
    notes: list


def checkpoint_root(args) -> Path:
    return Path(args.output_dir) / args.exp_name / "checkpoints"


def checkpoint_dirs(root: Path) -> list:
    """Checkpoint directories under root (complete or not), oldest first."""
    return sorted(d for d in root.glob("*") if d.is_dir() and CHECKPOINT_NAME.match(d.name))


def missing_files(path: Path) -> list:
    """The files of a complete checkpoint that `path` lacks."""
    if is_sharded(path):
        return [name for name in SHARDED_REQUIRED if not (Path(path) / name).exists()]
    return [name for name in REQUIRED_FILES if not (Path(path) / name).is_file()]


def holds_ema(path: Path) -> bool:
    """Whether a checkpoint holds EMA weights."""
    if is_sharded(path):
        from omegadit import sharding
        return "ema" in sharding.saved_parts(path)
    return (Path(path) / "ema.safetensors").exists()


def complete_checkpoints(root: Path) -> list:
    """Checkpoint directories under root that hold every required file, oldest first."""
    return [d for d in checkpoint_dirs(root) if not missing_files(d)]


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def plan_resume(args, num_processes: int = 1) -> ResumePlan:
    """Where to resume from and what that changes, checked before any work starts: refuses an incomplete
    checkpoint that was asked for by name, a changed frozen flag, and a fresh run over existing checkpoints."""
    notes = []
    path = resume_dir(args, notes)
    if path is None:
        return ResumePlan(None, notes)
    notes.extend(compare_args(path, vars(args)))
    notes.extend(rng_warnings(path, num_processes))
    if args.init_from and not getattr(args, "control", False):  # a ControlNet's --init-from is its frozen base
        notes.append(f"{flag('init_from')} {args.init_from} is ignored: the weights come from {path}")
    return ResumePlan(path, notes)


def resume_dir(args, notes: list) -> Optional[Path]:
    """The checkpoint directory --resume / --resume-step name (None for a fresh run); adds log lines to notes."""
    root = checkpoint_root(args)
    if args.resume_step or (args.resume and args.resume != "latest"):
        path = root / f"{args.resume_step:07d}" if args.resume_step else Path(args.resume)
        missing = missing_files(path)
        if missing:
            raise FileNotFoundError(f"cannot resume from {path}: it is not a complete checkpoint "
                                    f"({', '.join(missing)} missing)")
        return path
    if args.resume != "latest":
        refuse_fresh_start(root)
        notes.append("none, a fresh run from step 0")
        return None
    for path in reversed(checkpoint_dirs(root)):
        missing = missing_files(path)
        if not missing:
            return path
        notes.append(f"skipped incomplete checkpoint {path} ({', '.join(missing)} missing)")
    notes.append(f"--resume latest: no complete checkpoint under {root}; starting fresh at step 0")
    return None


def refuse_fresh_start(root: Path):
    """A fresh run would overwrite the checkpoints of an earlier run in the same experiment folder."""
    existing = complete_checkpoints(root)
    if existing:
        raise FileExistsError(f"{root} already holds checkpoints of an earlier run (newest: {existing[-1].name}); "
                              f"pass --resume latest to continue it, or choose another --exp-name or --output-dir "
                              f"(a fresh run would overwrite them)")


def compare_args(path: Path, current: dict) -> list:
    """Log lines for the flags that differ from the checkpoint's args.json; raises for frozen ones."""
    args_file = path / "args.json"
    if not args_file.is_file():
        return [f"{args_file} is missing: flags not compared with the checkpoint's"]
    recorded = json.loads(args_file.read_text())
    current = json.loads(json.dumps(current, default=str))
    changed = sorted(k for k in current if k in recorded and compared_on_resume(k) and current[k] != recorded[k])
    refused = [f"{flag(k)} {recorded[k]} -> {current[k]}" for k in changed if k not in APPLIED_ON_RESUME]
    if refused:
        raise ValueError(f"cannot resume from {path} with other settings of the model, objective or data: "
                         f"{', '.join(refused)} (args.json of the checkpoint against this command); "
                         f"start a new experiment with --init-from {path} to change them")
    return [f"{flag(k)} changed {recorded[k]} -> {current[k]}: applied" for k in changed]


def rng_warnings(path: Path, num_processes: int) -> list:
    """A WARNING line when some process has no saved random state in the checkpoint."""
    missing = [f"rng_state_{rank}.pt" for rank in range(num_processes)
               if not (path / f"rng_state_{rank}.pt").is_file()]
    if not missing:
        return []
    return [f"WARNING: {path} has no {', '.join(missing)}: those processes keep the random state of a fresh "
            f"start, so the resume is not exact (it will not repeat an uninterrupted run)"]


def save_checkpoint(accelerator, args, step, model, ema, optimizer, scheduler, description, data_state=None):
    """Write exps/<exp>/checkpoints/<step> atomically (no ema.safetensors when `ema` is None); returns its path.
    Every process takes part (under --fsdp each writes its shards). `data_state`: this process's data loader state
    (shard datasets), written as data_state_<rank>.json."""
    root = checkpoint_root(args)
    final = root / f"{step:07d}"
    tmp = root / f"{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    if data_state is not None:
        write_json(tmp / f"data_state_{accelerator.process_index}.json", data_state)
    if args.fsdp:
        from omegadit import sharding
        optimizer_state = {"param_groups": sharding.save(tmp, model, ema, optimizer)}
        full = sharding.full_state_dict(model if ema is None else ema) if args.fsdp_full_weights else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        if args.fsdp:
            write_json(tmp / "description.json", description)
            if full is not None:
                save_weights(tmp / ("model.safetensors" if ema is None else "ema.safetensors"), full, description)
        else:
            optimizer_state = optimizer.state_dict()
            save_weights(tmp / "model.safetensors", raw.state_dict(), description)
            if ema is not None:
                save_weights(tmp / "ema.safetensors", ema.state_dict(), description)
        torch.save({
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "backbone_rng": raw.training_rng_state(),
            "batches_consumed": step * args.gradient_accumulation_steps,
        }, tmp / "training_state.pt")
        write_json(tmp / "args.json", vars(args))
        commit_directory(tmp, final)
        if args.keep_last > 0:
            for old in complete_checkpoints(root)[:-args.keep_last]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path, accelerator, model, ema, optimizer, scheduler) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step. An EMA (`ema` not None) resumed from a
    checkpoint without one starts from the model's weights."""
    raw = accelerator.unwrap_model(model)
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    if is_sharded(path) != is_fsdp_module(raw):
        kind = "an --fsdp run (sharded)" if is_sharded(path) else "a run without --fsdp"
        raise ValueError(f"{path} is a checkpoint of {kind}: resume it the same way, or start a new experiment "
                         f"with --init-from {path}")
    if is_sharded(path):
        from omegadit import sharding
        sharding.load(path, raw, ema, optimizer, state["optimizer"]["param_groups"])
    else:
        raw.load_state_dict(load_weights(path / "model.safetensors"))
        if ema is not None:
            has_ema = (path / "ema.safetensors").exists()
            ema.load_state_dict(load_weights(path / "ema.safetensors") if has_ema else raw.state_dict())
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # Checkpoints written before the backbone interface kept SiT's path-drop state at the top level.
    raw.load_training_rng_state(state.get("backbone_rng", state))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state["step"]


def load_data_state(path, rank: int):
    """The data loader state process `rank` saved in checkpoint `path`, or None when there is none."""
    state_file = Path(path) / f"data_state_{rank}.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else None


def is_fsdp_module(module) -> bool:
    """Whether `module` was sharded by torch's fully_shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 shards nothing
        return False
    return isinstance(module, FSDPModule)


def apply_optimizer_flags(optimizer, scheduler, args):
    """Give a restored optimizer and schedule this command's learning rate and Adam settings (a loaded optimizer
    state carries the checkpoint's); with unchanged flags nothing changes."""
    for group in optimizer.param_groups:
        group.update(initial_lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                     weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    scheduler.base_lrs = [args.learning_rate] * len(optimizer.param_groups)
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = args.learning_rate * schedule(scheduler.last_epoch)
