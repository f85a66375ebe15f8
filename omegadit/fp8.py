"""FP8 matmuls in a backbone's blocks: opt-in, for training (train.py --fp8) and sampling (generate.py --fp8).

Training swaps the eligible linears for torchao's `Float8Linear` (dynamic tensorwise scaling: e4m3 inputs and
weights, e5m2 output gradients); master weights, optimizer and checkpoints stay as they are (same state-dict keys).
torchao is optional and imported only there. Sampling swaps them for `Float8InferenceLinear`: weights quantised once
per output row, activations per row at every call, both e4m3 with float32 scales, multiplied by `torch._scaled_mm` on
the GPU; on a CPU (where `_scaled_mm` takes one scale per tensor, and torchao's inference quantisation refuses to
run) the same e4m3 values are multiplied in float32. Both are fast only on GPUs with FP8 tensor cores (compute
capability 8.9: L40S, RTX 4090, H100 and later).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FP8_CAPABILITY = (8, 9)  # CUDA compute capability of the first GPUs with FP8 tensor cores
FP8_MULTIPLE = 16  # float8 matmuls need both dimensions of the weight divisible by 16
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max
SMALLEST_SCALE = 1e-12  # a row of zeros keeps a finite scale


def fp8_eligible(module: nn.Module, name: str) -> bool:
    """A linear inside `blocks.*`, both dimensions multiples of 16; adaLN modulation is left out (its matmul has one
    row per sample, too few to gain from FP8)."""
    return (isinstance(module, nn.Linear) and name.startswith("blocks.") and "adaLN_modulation" not in name
            and module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0)


def _eligible_names(model: nn.Module) -> set:
    names = {name for name, module in model.named_modules() if fp8_eligible(module, name)}
    if not names:
        raise ValueError(f"--fp8: {type(model).__name__} has no linear layer in `blocks` that FP8 can run")
    return names


def convert_blocks_to_float8(model: nn.Module) -> int:
    """Swap the eligible linears of `model` for torchao Float8Linear in place; returns how many were swapped."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ImportError("--fp8 needs torchao: pip install torchao (a release built for this torch version)") from err
    names = _eligible_names(model)
    convert_to_float8_training(model, module_filter_fn=lambda module, name: name in names)
    return len(names)


def rowwise_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, k) -> (x / scale in float8 e4m3, float32 scale (rows, 1)), each row's largest magnitude at e4m3's
    largest value."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=SMALLEST_SCALE) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


class Float8InferenceLinear(nn.Module):
    """A frozen `nn.Linear` computed as a float8 matmul with rowwise scales. The output has the autocast dtype where
    autocast is on (bf16: what FP8 tensor cores return), else the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight, scale = rowwise_e4m3(linear.weight.detach())
        self.register_buffer("weight", weight)  # (out, in): its transpose is the column-major operand _scaled_mm takes
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        rows, row_scale = rowwise_e4m3(x.reshape(-1, x.shape[-1]))
        if x.is_cuda:
            out = torch._scaled_mm(rows, self.weight.t(), scale_a=row_scale, scale_b=self.weight_scale,
                                   bias=None if self.bias is None else self.bias.to(dtype), out_dtype=dtype)
        else:
            out = self.dequantised_matmul(rows, row_scale)
            out = (out if self.bias is None else out + self.bias).to(dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def dequantised_matmul(self, rows: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """The float32 product of the e4m3 operands times their scales (what `_scaled_mm` computes, without bias)."""
        with torch.autocast(rows.device.type, enabled=False):
            return F.linear(rows.float() * row_scale, self.weight.float() * self.weight_scale.t())


def check_fp8_device(device: torch.device):
    """Raise ValueError on a CUDA GPU without FP8 tensor cores (a CPU runs the float32 emulation)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ValueError(f"--fp8 needs a GPU with FP8 tensor cores (compute capability {FP8_CAPABILITY[0]}."
                         f"{FP8_CAPABILITY[1]} or newer: L40S, RTX 4090, H100, ...); "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")


def quantize_blocks_for_inference(model: nn.Module) -> int:
    """Swap the eligible linears of a sampling model for `Float8InferenceLinear` in place; returns how many."""
    names = _eligible_names(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Float8InferenceLinear(getattr(parent, child)))
    return len(names)
