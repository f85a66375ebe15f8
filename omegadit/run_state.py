"""Training checkpoints of train.py: exps/<exp>/checkpoints/<step>/ with the self-describing weights
(model.safetensors; ema.safetensors unless the run keeps no EMA), the optimizer, schedule and per-rank random
states, written atomically."""
import re
import shutil
from pathlib import Path

import torch

from omegadit.checkpoint import load_weights, save_weights
from utils import commit_directory, rng_state, set_rng_state, write_json

CHECKPOINT_NAME = re.compile(r"^\d{7}$")


def checkpoint_root(args) -> Path:
    return Path(args.output_dir) / args.exp_name / "checkpoints"


def complete_checkpoints(root: Path) -> list:
    """Checkpoint directories under root, oldest first."""
    return sorted(d for d in root.glob("*") if d.is_dir() and CHECKPOINT_NAME.match(d.name))


def find_resume_dir(args):
    """The checkpoint directory to resume from, or None for a fresh run."""
    root = checkpoint_root(args)
    if args.resume_step:
        path = root / f"{args.resume_step:07d}"
    elif args.resume == "latest":
        steps = complete_checkpoints(root)
        if not steps:
            return None
        path = steps[-1]
    elif args.resume:
        path = Path(args.resume)
    else:
        return None
    if not (path / "training_state.pt").exists():
        raise FileNotFoundError(f"no complete checkpoint at {path} (training_state.pt missing)")
    return path


def save_checkpoint(accelerator, args, step, model, ema, optimizer, scheduler, description):
    """Write exps/<exp>/checkpoints/<step> atomically (no ema.safetensors when `ema` is None); returns its path."""
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
        save_weights(tmp / "model.safetensors", raw.state_dict(), description)
        if ema is not None:
            save_weights(tmp / "ema.safetensors", ema.state_dict(), description)
        torch.save({
            "step": step,
            "optimizer": optimizer.state_dict(),
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
    raw.load_state_dict(load_weights(path / "model.safetensors"))
    if ema is not None:
        has_ema = (path / "ema.safetensors").exists()
        ema.load_state_dict(load_weights(path / "ema.safetensors") if has_ema else raw.state_dict())
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    # Checkpoints written before the backbone interface kept SiT's path-drop state at the top level.
    raw.load_training_rng_state(state.get("backbone_rng", state))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state["step"]
