"""Loss: parity with the original OmegaDiT SILoss on its fixture, and unit properties of each part."""
import json
import math

import pytest
import torch
from safetensors import safe_open

from conftest import fixture_path
from loss import LossOutput, SILoss, interpolant, time_shift
from omegadit.objectives.flow import FlowMatching

FIXTURE_CASES = [f"{path}.{cfm}.{shift}" for path in ("linear", "cosine") for cfm in ("uniform", "linear")
                 for shift in ("shift", "noshift")]


def read_safetensors(path):
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["json"]), {key: f.get_tensor(key) for key in f.keys()}


@pytest.fixture(scope="module")
def reference():
    from models.sit import from_reference

    model_meta, model_tensors = read_safetensors(fixture_path("omegadit_sit.safetensors"))
    state = {k[len("model."):]: v for k, v in model_tensors.items() if k.startswith("model.")}
    model = from_reference(state, **model_meta["config"])
    meta, tensors = read_safetensors(fixture_path("omegadit_loss.safetensors"))
    return model, meta, tensors


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_matches_reference_fixture(reference, case):
    model, meta, ref = reference
    spec = meta["cases"][case]
    loss_fn = SILoss(path_type=spec["path_type"], cfm_weighting=spec["cfm_weighting"],
                     apply_time_shift=spec["time_shifting"], shift_base=spec["shift_base"])
    with torch.no_grad():
        out = loss_fn(model, ref["x"], {"y": ref["y"]}, zs=[ref["target_zs.0"]], time_input=ref["t_raw"].clone(),
                      noises=ref["noises"])
    assert out.denoising.shape == (3,) and out.proj.dim() == 0 and out.cfm.dim() == 0
    torch.testing.assert_close(out.time, ref[f"{case}.t_used"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.denoising, ref[f"{case}.denoising"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.proj.reshape(1), ref[f"{case}.proj"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cfm.reshape(1), ref[f"{case}.cfm"], atol=1e-5, rtol=0)


class EchoModel(torch.nn.Module):
    """Velocity = a fixed linear map of the input; projector outputs are given tensors."""

    def __init__(self, zs_tilde=()):
        super().__init__()
        self.zs_tilde = list(zs_tilde)
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, y=None):
        return self.scale * x + t.view(-1, 1, 1, 1), {"repa": self.zs_tilde}


def batch(n=6, seed=0):
    """Images, raw times and noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return x, torch.rand(n, 1, 1, 1, generator=g), torch.randn(x.shape, generator=g)


def test_time_shift_fixed_points_and_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift_dim in (256, 4096, 16384):
        shifted = time_shift(t, shift_dim)
        assert shifted[0] == 0 and shifted[-1] == 1
        assert (shifted.diff() > 0).all()
        if shift_dim > 4096:
            assert (shifted[1:-1] > t[1:-1]).all()
        elif shift_dim < 4096:
            assert (shifted[1:-1] < t[1:-1]).all()
        else:
            torch.testing.assert_close(shifted, t)
    # s = sqrt(16384 / 4096) = 2: t = 0.5 -> 2 * 0.5 / (1 + 0.5) = 2/3; shift_base moves s.
    assert time_shift(torch.tensor(0.5), 16384).item() == pytest.approx(2 / 3)
    assert time_shift(torch.tensor(0.5), 16384, shift_base=1024).item() == pytest.approx(0.8)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_lognormal_times_in_open_interval(path_type):
    g = torch.Generator().manual_seed(0)
    t = FlowMatching(path_type=path_type, weighting="lognormal").sample_time((20000, 1, 1, 1), generator=g)
    assert t.shape == (20000, 1, 1, 1)
    assert (t > 0).all() and (t < 1).all()
    # sigma = exp(N(0, 1)) has median 1, mapped to t = 1/2 on both paths.
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    # P(t < a) = P(N(0, 1) < log(sigma(a))) with sigma(a) = a / (1 - a) (linear) or tan(pi a / 2) (cosine).
    for a in (0.1, 0.25, 0.8):
        sigma = a / (1 - a) if path_type == "linear" else math.tan(math.pi * a / 2)
        expected = 0.5 * (1 + math.erf(math.log(sigma) / math.sqrt(2)))
        assert (t < a).float().mean().item() == pytest.approx(expected, abs=0.01)


def test_interpolant_derivatives():
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64, requires_grad=True)
    for path_type in ("linear", "cosine"):
        alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
        grad_alpha, = torch.autograd.grad(alpha.sum(), t)
        grad_sigma, = torch.autograd.grad(sigma.sum(), t)
        torch.testing.assert_close(d_alpha.detach(), grad_alpha)
        torch.testing.assert_close(d_sigma.detach(), grad_sigma)
    with pytest.raises(ValueError, match="path_type"):
        interpolant(t, "sigmoid")


def test_denoising_and_cfm_against_explicit_formulas():
    x, t, eps = batch()
    model = EchoModel()
    uniform = SILoss(cfm_weighting="uniform")(model, x, None, [], time_input=t, noises=eps)
    linear = SILoss(cfm_weighting="linear")(model, x, None, [], time_input=t, noises=eps)
    x_t = (1 - t) * x + t * eps
    target = eps - x
    out = 0.7 * x_t + t
    torch.testing.assert_close(uniform.denoising, ((out - target) ** 2).mean(dim=(1, 2, 3)))
    other = torch.cat([target[-1:], target[:-1]])
    torch.testing.assert_close(uniform.cfm, -((out - other) ** 2).mean())
    torch.testing.assert_close(linear.cfm, -((out - other) ** 2 * t).mean())
    assert abs(linear.cfm.item() - uniform.cfm.item()) > 1e-2
    torch.testing.assert_close(linear.denoising, uniform.denoising)
    assert uniform.proj.item() == 0.0


def test_proj_loss_is_minus_one_when_aligned():
    x, t, eps = batch()
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(6, 64, 32, generator=g), torch.randn(6, 64, 16, generator=g)]
    aligned = SILoss()(EchoModel([3.0 * z for z in zs]), x, None, zs, time_input=t, noises=eps)
    assert aligned.proj.item() == pytest.approx(-1.0, abs=1e-6)
    opposite = SILoss()(EchoModel([-z for z in zs]), x, None, zs, time_input=t, noises=eps)
    assert opposite.proj.item() == pytest.approx(1.0, abs=1e-6)
    # One encoder aligned, one opposite: the average over encoders is 0.
    mixed = SILoss()(EchoModel([zs[0], -zs[1]]), x, None, zs, time_input=t, noises=eps)
    assert mixed.proj.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="projector outputs"):
        SILoss()(EchoModel(zs[:1]), x, None, zs, time_input=t, noises=eps)


def test_time_shift_applied_with_image_dimension():
    x, t, eps = batch()
    out = SILoss(apply_time_shift=True, shift_base=4096)(EchoModel(), x, None, [], time_input=t, noises=eps)
    s = math.sqrt(4 * 8 * 8 / 4096)
    torch.testing.assert_close(out.time, s * t / (1 + (s - 1) * t))


def test_generator_reproducible_and_total():
    x, _, _ = batch()
    loss_fn = SILoss(weighting="lognormal")
    first = loss_fn(EchoModel(), x, None, [], generator=torch.Generator().manual_seed(5))
    second = loss_fn(EchoModel(), x, None, [], generator=torch.Generator().manual_seed(5))
    third = loss_fn(EchoModel(), x, None, [], generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(first.time, second.time)
    torch.testing.assert_close(first.denoising, second.denoising)
    assert not torch.allclose(first.time, third.time)
    assert isinstance(first, LossOutput) and first.time.shape == (6, 1, 1, 1)
    parts = LossOutput(torch.tensor([1.0, 3.0]), torch.tensor(-0.5), torch.tensor(-4.0), torch.zeros(2, 1, 1, 1))
    assert parts.total(0.5, 0.05).item() == pytest.approx(2.0 - 0.25 - 0.2)
    assert parts.total().item() == pytest.approx(2.0)


def test_total_backpropagates():
    x, t, eps = batch()
    model = EchoModel()
    SILoss(cfm_weighting="linear")(model, x, None, [], time_input=t, noises=eps).total(0.5, 0.05).backward()
    assert model.scale.grad is not None and model.scale.grad.abs().item() > 0


def test_rejects_unknown_options():
    for kwargs in ({"path_type": "sigmoid"}, {"weighting": "beta"}, {"cfm_weighting": "cubic"}, {"prediction": "eps"}):
        with pytest.raises(ValueError, match="unknown|velocity only"):
            SILoss(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to detect host-device syncs")
def test_no_host_device_sync_cuda():
    x = torch.randn(4, 4, 8, 8, device="cuda")
    zs = [torch.randn(4, 64, 32, device="cuda")]
    model = EchoModel(zs).cuda()
    loss_fn = SILoss(weighting="lognormal", cfm_weighting="linear", apply_time_shift=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = loss_fn(model, x, None, zs, generator=generator).total(0.5, 0.05)
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()
