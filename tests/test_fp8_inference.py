"""FP8 sampling (generate.py --fp8, omegadit/fp8.py) against the plain path: on CPU the e4m3 operands are multiplied
in float32 (CPUs' _scaled_mm takes one scale per tensor); on a GPU, _scaled_mm is checked against that product."""
import copy

import pytest
import torch

from omegadit.fp8 import (
    E4M3_MAX, FP8_CAPABILITY, Float8InferenceLinear, check_fp8_device, quantize_blocks_for_inference,
    rowwise_e4m3)
from test_fast_path import BF16_TOLERANCE, relative_error, unit_gain_
from test_sit import inputs, tiny_text_sit

E4M3_STEP = 2 ** -3  # 3 mantissa bits: neighbouring e4m3 values are up to 12.5% apart, rounding error up to half


def test_rowwise_e4m3_scales_each_row_to_the_format_and_back():
    x = torch.randn(5, 64) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.0]).unsqueeze(1)
    values, scale = rowwise_e4m3(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert torch.equal(values[:4].float().abs().amax(dim=1), torch.full((4,), E4M3_MAX))
    back = values.float() * scale
    assert torch.equal(back[4], torch.zeros(64))  # a row of zeros stays zero (no division by 0)
    assert ((back[:4] - x[:4]).abs() <= x[:4].abs() * E4M3_STEP / 2 + scale[:4] * 2 ** -9).all()


def test_float8_linear_computes_the_linear_within_e4m3_rounding():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    fp8 = Float8InferenceLinear(linear)
    x = torch.randn(3, 7, 64)
    assert fp8(x).shape == (3, 7, 48) and fp8(x).dtype == torch.float32
    assert 1e-3 < relative_error(fp8(x), linear(x)) < 0.06  # rounded (really FP8), and close
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp8(x)
        assert out.dtype == torch.bfloat16
        assert 1e-3 < relative_error(out, linear(x)) < 0.06
    without_bias = torch.nn.Linear(64, 48, bias=False)
    assert relative_error(Float8InferenceLinear(without_bias)(x), without_bias(x)) < 0.06


def unit_gain_sit():
    """A tiny text SiT with weights of unit gain (seeded)."""
    torch.manual_seed(0)
    return unit_gain_(tiny_text_sit().eval())


def test_fp8_blocks_keep_the_sampling_velocity_close():
    model = unit_gain_sit()
    fp8 = copy.deepcopy(model)
    assert quantize_blocks_for_inference(fp8) == 2 * len(fp8.blocks)  # qkv and proj; SwiGLU widths are not x16
    assert isinstance(fp8.blocks[0].attn.qkv, Float8InferenceLinear)
    assert not isinstance(fp8.blocks[0].adaLN_modulation[1], Float8InferenceLinear)
    x, t, y = inputs(model, batch=4)
    with torch.no_grad():
        v32 = model(x, t, y, uncond=2)[0]
        v8_in_float32 = fp8(x, t, y, uncond=2)[0]  # FP8 matmuls, everything else float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            v8 = fp8(x, t, y, uncond=2)[0]
    assert 1e-5 < relative_error(v8_in_float32, v32) < 1e-2  # the FP8 matmuls changed the velocity, a little
    assert relative_error(v8, v32) < BF16_TOLERANCE  # with bf16 elsewhere: as close as the bf16 path must be


def test_gpus_without_fp8_tensor_cores_are_refused(monkeypatch):
    check_fp8_device(torch.device("cpu"))  # the float32 emulation
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="FP8 tensor cores .*NVIDIA A100 has 8.0"):
        check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda"))


def test_a_model_without_eligible_blocks_is_refused():
    with pytest.raises(ValueError, match="--fp8: Sequential has no linear layer"):
        quantize_blocks_for_inference(torch.nn.Sequential(torch.nn.Linear(16, 16)))


needs_fp8_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < FP8_CAPABILITY,
    reason="needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer)")


@needs_fp8_gpu
def test_scaled_mm_on_the_gpu_computes_the_product_of_the_e4m3_operands():
    torch.manual_seed(0)
    fp8 = Float8InferenceLinear(torch.nn.Linear(256, 512)).cuda()
    x = torch.randn(1000, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fp8(x)
    reference = fp8.dequantised_matmul(*rowwise_e4m3(x)) + fp8.bias
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference) < 4e-3  # bf16 output rounding only


@needs_fp8_gpu
def test_compiled_fp8_blocks_on_the_gpu_match_eager_fp8():
    """The CUDA path (_scaled_mm with rowwise scales, bf16 out) under torch.compile, as generate.py runs it."""
    model = unit_gain_sit().cuda()
    quantize_blocks_for_inference(model)
    x, t, y = (tensor.cuda() for tensor in inputs(model, batch=4))
    compiled = copy.deepcopy(model)
    compiled.compile()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager_velocity = model(x, t, y, uncond=2)[0]
        compiled_velocity = compiled(x, t, y, uncond=2)[0]
    assert compiled_velocity.dtype == torch.bfloat16
    assert relative_error(compiled_velocity, eager_velocity) < BF16_TOLERANCE
