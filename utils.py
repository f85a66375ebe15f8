"""Small helpers shared by train.py and generate.py: config files, EMA, LR schedules, data order, images, I/O."""
import argparse
import json
import math
import os
import random
import shutil
import textwrap
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from omegadit.options import record_preset_options


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------

def parse_with_config(parser, argv=None):
    """Parse argv; `--config FILE.yaml` supplies defaults (keys are flag names, dashes or underscores) that flags
    override."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    if config_path:
        with open(config_path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{config_path}: expected a mapping of flag names to values")
        actions = {action.dest: action for action in parser._actions}
        for key, value in values.items():
            dest = key.lstrip("-").replace("-", "_")
            if dest not in actions:
                raise ValueError(f"{config_path}: unknown key '{key}' (not a flag of this script)")
            parser.set_defaults(**{dest: value})
            actions[dest].required = False
        record_preset_options(parser, (key.lstrip("-").replace("-", "_") for key in values))
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# Training helpers
# ------------------------------------------------------------------------------------------------------------------

def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay for the update after `step` optimizer steps: `decay`, or with warm-up min(decay, (1 + step) /
    (10 + step)), so that the average of a short run is not dominated by its random initial weights."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over trainable parameters; buffers are copied."""
    pairs = [(e, p.detach()) for e, p in zip(ema_model.parameters(), model.parameters()) if p.requires_grad]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def lr_lambda(schedule, warmup_steps, max_steps, final_ratio=0.1):
    """Multiplier of the base learning rate at a step.

    constant: 1. warmup: linear from 0 to 1 over warmup_steps, then 1. cosine: warmup as above, then a half cosine
    from 1 down to final_ratio at max_steps (the OmegaDiT recipe decays to 0.1x).
    """
    if schedule not in ("constant", "warmup", "cosine"):
        raise ValueError(f"unknown lr schedule '{schedule}' (constant, warmup or cosine)")

    def multiplier(step):
        if schedule == "constant":
            return 1.0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "warmup":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless per-rank batches: each epoch a seeded permutation, cut into global batches, each split across ranks.

    The position is a count of global batches already consumed, so a run resumed at the same position sees
    exactly the batches a continuous run would have seen, whatever happened before.
    """

    def __init__(self, dataset_size, global_batch_size, rank=0, world_size=1, seed=0, start_batch=0):
        if global_batch_size % world_size:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {world_size} processes")
        self.batches_per_epoch = dataset_size // global_batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {dataset_size} items is smaller than the global batch {global_batch_size}")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.start_batch = start_batch

    def __iter__(self):
        position = self.start_batch
        while True:
            epoch, index = divmod(position, self.batches_per_epoch)
            order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
            start = index * self.global_batch_size + self.rank * self.local_batch_size
            yield order[start:start + self.local_batch_size].tolist()
            position += 1

    def __len__(self):
        return self.batches_per_epoch


def rng_state():
    """Every random generator the training loop draws from on this process, as tensors and plain Python values
    (so that `torch.load(..., weights_only=True)` reads it back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                          cached), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------------

def write_json(path, value):
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)


def commit_directory(tmp_dir, final_dir):
    """Atomically publish a fully written directory under its final name, replacing an older one."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


# ------------------------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------------------------

def image_grid(images, captions=None, ncols=None, caption_lines=3, min_tile=128):
    """Tile uint8 images (N, H, W, 3) into one PIL image, with each caption written under its tile when given.
    Tiles smaller than `min_tile` pixels are enlarged by a whole factor (nearest neighbour) to stay legible."""
    images = np.asarray(images)
    scale = max(1, math.ceil(min_tile / max(images.shape[1:3])))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    font = ImageFont.load_default()
    chars_per_line = max(8, w // 6)
    text_h = (caption_lines * 11 + 4) if captions is not None else 0
    grid = Image.new("RGB", (ncols * w, nrows * (h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        row, col = divmod(i, ncols)
        x, y = col * w, row * (h + text_h)
        grid.paste(Image.fromarray(images[i]), (x, y))
        if captions is not None:
            lines = textwrap.wrap(str(captions[i]), chars_per_line)[:caption_lines]
            draw.multiline_text((x + 2, y + h + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    return grid
