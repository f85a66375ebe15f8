"""Reading weights files of any origin without running code: .safetensors, or .pt/.pth through the
weights-only unpickler (argparse.Namespace, which training scripts store as 'args', admitted)."""
import argparse
from pathlib import Path

import torch

from omegadit.files import load_safetensors, load_torch

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(state_dict: dict, prefixes=WRAPPER_PREFIXES) -> dict:
    """Keys without the DDP ('module.') and torch.compile ('_orig_mod.') prefixes."""
    stripped = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        stripped[key] = value
    return stripped


def load_torch_file(path):
    """A .pt/.pth through the weights-only unpickler (omegadit.files.load_torch), argparse.Namespace admitted."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return load_torch(path)


def read_weights_file(path, use_ema: bool = True):
    """(state dict, training args as a dict) of a checkpoint file: a bare state dict, or a dict with 'ema' and/or
    'model' entries ('ema' preferred when use_ema) and optionally 'args'. In a .safetensors file the entries are
    key prefixes 'ema.' / 'model.'."""
    return read_weights_entry(path, use_ema)[:2]


def read_weights_entry(path, use_ema: bool = True):
    """read_weights_file's (state dict, args), and the entry it took: 'ema', 'model', or None for a bare state
    dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        tensors = load_safetensors(path)
        checkpoint = {entry: {k[len(entry) + 1:]: v for k, v in tensors.items() if k.startswith(entry + ".")}
                      for entry in ("ema", "model")}
        checkpoint = {k: v for k, v in checkpoint.items() if v} or tensors
    else:
        checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a checkpoint dict")
    args = checkpoint.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    for key in ("ema", "model") if use_ema else ("model", "ema"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key], args, key
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, args, None
    raise ValueError(f"{path}: no 'model' or 'ema' entry and not a bare state dict; keys are {sorted(checkpoint)[:10]}")


def load_state_dict_checked(model, state_dict: dict, source="the state dict", expected=None):
    """model.load_state_dict(state_dict) (returns the model), with one error that lists the first missing,
    unexpected and misshapen keys (expected vs found) instead of every key."""
    own = model.state_dict()
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in own.items() if k not in state_dict]
    problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in state_dict.items() if k not in own]
    problems += [f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
                 for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    if problems:
        what = expected or type(model).__name__
        more = f" (and {len(problems) - 12} more)" if len(problems) > 12 else ""
        raise ValueError(f"{source} does not hold the weights of {what}: {'; '.join(problems[:12])}{more}")
    model.load_state_dict(state_dict)
    return model
