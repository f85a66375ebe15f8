"""Opt-in FP8 training (train.py --fp8): the linear layers of a backbone's blocks run their matmuls in float8 through
torchao's `Float8Linear` (dynamic tensorwise scaling: e4m3 inputs and weights, e5m2 output gradients); master weights,
optimizer and checkpoints stay as they are (same state-dict keys). Needs torchao and a GPU with FP8 tensor cores
(H100 and later) to be fast; torchao is optional and imported only here.
"""
import torch.nn as nn

FP8_MULTIPLE = 16  # float8 matmuls need both dimensions of the weight divisible by 16


def fp8_eligible(module: nn.Module, name: str) -> bool:
    """A linear inside `blocks.*`, both dimensions multiples of 16; adaLN modulation is left out (its matmul has one
    row per sample, too few to gain from FP8)."""
    return (isinstance(module, nn.Linear) and name.startswith("blocks.") and "adaLN_modulation" not in name
            and module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0)


def convert_blocks_to_float8(model: nn.Module) -> int:
    """Swap the eligible linears of `model` for torchao Float8Linear in place; returns how many were swapped."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ImportError("--fp8 needs torchao: pip install torchao (a release built for this torch version)") from err
    names = {name for name, module in model.named_modules() if fp8_eligible(module, name)}
    if not names:
        raise ValueError(f"--fp8: {type(model).__name__} has no linear layer in `blocks` that FP8 can run")
    convert_to_float8_training(model, module_filter_fn=lambda module, name: name in names)
    return len(names)
