"""U-ViT (models/uvit.py), its objective (omegadit/objectives/uvit.py) and DPM-Solver (omegadit/sampling/dpm_solver.py):
parity with baofff/U-ViT fixtures, sizes, checkpoints, and DPM-Solver on Gaussian data whose exact noise prediction
and probability-flow map are known in closed form."""
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import count_checkpointed_blocks, load_fixture_file
from models import BACKBONES, rebuild_backbone
from models.uvit import (UViT, UViT_models, convert_uvit_state_dict, load_uvit_checkpoint,
                         uvit_config_from_state_dict)
from omegadit.objectives import build_objective
from omegadit.sampling import SAMPLERS, check_sampler, sample
from omegadit.sampling import dpm_solver as dpm
from omegadit.sampling.guidance import GuidedNetwork
from omegadit.weights_io import load_state_dict_checked

FIXTURE_HEADS = 4  # head counts are not in the weights; the fixtures' configs name them


def fixture_model(state, text_len=77, null_context=None):
    converted = convert_uvit_state_dict(state)
    model = UViT(**uvit_config_from_state_dict(converted, num_heads=FIXTURE_HEADS, text_len=text_len))
    if null_context is not None:
        converted["null_context"] = null_context
    return load_state_dict_checked(model, converted).eval()


def relative_error(out, ref):
    """max |out - ref| / max(1, |ref|): absolute for small values, relative for large ones."""
    return ((out - ref).abs() / ref.abs().clamp(min=1.0)).max().item()


def tiny_uvit(**overrides):
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=5)
    kwargs.update(overrides)
    model = UViT(**kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def tiny_inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g)
    t = torch.randint(1, 1001, (batch,), generator=g).float()
    if cfg["text_dim"] is not None:
        return x, t, torch.randn(batch, cfg["text_len"], cfg["text_dim"], generator=g)
    if cfg["num_classes"] is not None:
        return x, t, torch.randint(0, cfg["num_classes"] + 1, (batch,), generator=g)
    return x, t, None


# ----------------------------------------------------------------------------------------------------------------
# Parity with baofff/U-ViT
# ----------------------------------------------------------------------------------------------------------------

def test_class_conditional_forward_matches_reference():
    meta, state, t = load_fixture_file("peers/uvit.safetensors")
    model = fixture_model(state)
    cfg = model.config
    ref = meta["config"]
    assert (cfg["hidden_size"], cfg["depth"], cfg["patch_size"], cfg["input_size"]) == (
        ref["embed_dim"], ref["depth"], ref["patch_size"], ref["img_size"])
    assert cfg["num_classes"] == ref["num_classes"] - 1  # the reference counts the null label among its classes
    with torch.no_grad():
        out, aux = model(t["x"], t["t"], t["y"])
    assert aux == {}
    assert (out - t["out"]).abs().max().item() < 1e-5
    assert torch.equal(model.null_condition(2), torch.full((2,), ref["num_classes"] - 1))


def test_long_skips_and_token_order_matter():
    """The parity above is not an accident of the layout: dropping the long skips or swapping the label and time
    tokens changes the output by over 100 times the tolerance."""
    _, state, t = load_fixture_file("peers/uvit.safetensors")
    model = fixture_model(state)
    with torch.no_grad():
        for block in model.out_blocks:
            block.skip_linear.weight[:, 64:] = 0
        no_skip, _ = model(t["x"], t["t"], t["y"])
        model = fixture_model(state)
        model.pos_embed[:, [0, 1]] = model.pos_embed[:, [1, 0]].clone()
        swapped, _ = model(t["x"], t["t"], t["y"])
    assert (no_skip - t["out"]).abs().max().item() > 1e-3
    assert (swapped - t["out"]).abs().max().item() > 1e-3


def test_text_to_image_forward_matches_reference():
    meta, state, t = load_fixture_file("peers/uvit_t2i.safetensors")
    model = fixture_model(state, text_len=meta["config"]["num_clip_token"], null_context=t["empty_context"])
    assert model.conditioning == "text" and model.config["text_dim"] == meta["config"]["clip_dim"]
    with torch.no_grad():
        out, _ = model(t["x"], t["t"], t["context"])
    assert (out - t["out"]).abs().max().item() < 1e-5
    assert torch.equal(model.null_condition(2), t["empty_context"].expand(2, -1, -1))


def test_dpm_solver_sample_matches_reference():
    """U-ViT's sample_t2i_discrete.py: DPM-Solver 'fast' (predict_x0, order 3, time-uniform) with its guidance
    cond + s (cond - uncond), which is our uncond + w (cond - uncond) with w = s + 1."""
    meta, state, t = load_fixture_file("peers/uvit_t2i.safetensors")
    model = fixture_model(state, text_len=meta["config"]["num_clip_token"], null_context=t["empty_context"])
    objective = build_objective(model.default_objective)
    network = GuidedNetwork(model, objective, t["context"][:2], scale=meta["cfg_scale"] + 1)
    calls = []
    original = model.forward
    model.forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    out = sample(objective.default_sampler, objective, network, t["dpm_z"], meta["steps"])
    assert len(calls) == meta["steps"]
    assert out.dtype == torch.float32
    # Both sides compute in float32: our float32 sample lies 1.1e-5 from the same algorithm in float64 by this
    # measure, the reference's 0.8e-5; the margin of 2e-5 covers that rounding (1e-6 of the largest value).
    assert relative_error(out, t["dpm_out"]) < 2e-5
    assert relative_error(sample("dpm-solver", objective, network, t["dpm_z"], meta["steps"], method="multistep"),
                          t["dpm_out"]) > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Sizes, conditioning, training hooks
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(UViT_models))
def test_every_size_builds_and_runs_on_a_tiny_input(name):
    """Every registered size, with its real width and depth, on the meta device (shapes only, no weights)."""
    with torch.device("meta"):
        model = BACKBONES.build(name, input_size=8, text_dim=16, text_len=3)
        out, aux = model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 1000.0]), torch.randn(2, 3, 16))
    assert out.shape == (2, 4, 8, 8) and aux == {}
    assert len(model.in_blocks) == len(model.out_blocks) == model.config["depth"] // 2


@pytest.mark.parametrize("size,paper_millions", [("S", 44), ("M", 131), ("L", 287), ("H", 501)])
def test_parameter_counts_match_the_paper(size, paper_millions):
    """U-ViT paper, table 1, on ImageNet 256 latents (32 x 32 x 4, patch 2, 1000 classes + the null label)."""
    with torch.device("meta"):
        model = BACKBONES.build(f"U-ViT-{size}/2", input_size=32, num_classes=1000)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count - paper_millions) / paper_millions < (0.005 if size == "H" else 0.02), count


def test_conditioning_kinds_and_null_conditions():
    class_model = tiny_uvit()
    assert class_model.conditioning == "class" and class_model.null_condition(3).tolist() == [5, 5, 5]
    text_model = tiny_uvit(num_classes=None, text_dim=6, text_len=3)
    assert text_model.conditioning == "text" and torch.equal(text_model.null_condition(2), torch.zeros(2, 3, 6))
    empty = torch.randn(1, 3, 6)
    text_model.set_null_context(empty)
    assert torch.equal(text_model.null_condition(2), empty.expand(2, -1, -1))
    assert torch.equal(text_model.state_dict()["null_context"], empty[0])
    with pytest.raises(ValueError, match="null context must be"):
        text_model.set_null_context(torch.zeros(4, 6))
    plain = tiny_uvit(num_classes=None)
    assert plain.conditioning == "none" and plain.num_extra == 1
    x, t, _ = tiny_inputs(plain)
    assert plain(x, t)[0].shape == x.shape
    with pytest.raises(ValueError, match="at most one"):
        UViT(num_classes=10, text_dim=8)


def test_final_conv_and_time_mlp_options_change_the_output():
    model = tiny_uvit(conv=True, mlp_time_embed=True)
    assert "final_layer.weight" in model.state_dict() and "time_embed.0.weight" in model.state_dict()
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        out, _ = model(x, t, y)
        model.final_layer.weight.mul_(2)
        assert not torch.allclose(model(x, t, y)[0], out)


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    checkpointed = count_checkpointed_blocks(monkeypatch)
    model = tiny_uvit().train()
    x, t, y = tiny_inputs(model)
    grads = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        model(x, t, y)[0].square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(checkpointed) == model.config["depth"] + 1
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    assert len(model.compile_regions()) == model.config["depth"] + 1


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------

def test_released_checkpoint_layout_loads_from_a_bare_pth(tmp_path):
    """U-ViT releases bare nnet state dicts (.pth): the fixture's weights saved that way load, config inferred."""
    meta, state, t = load_fixture_file("peers/uvit_t2i.safetensors")
    path = tmp_path / "nnet_ema.pth"
    torch.save(dict(state), path)
    architecture, config, converted = load_uvit_checkpoint(path, num_heads=FIXTURE_HEADS,
                                                           text_len=meta["config"]["num_clip_token"],
                                                           null_context=t["empty_context"])
    model = load_state_dict_checked(rebuild_backbone(architecture, config), converted).eval()
    with torch.no_grad():
        assert (model(t["x"], t["t"], t["context"])[0] - t["out"]).abs().max().item() < 1e-5
    assert torch.equal(model.null_context, t["empty_context"])


@pytest.mark.parametrize("layout", ["bare", "ema", "safetensors"])
def test_checkpoint_round_trip(tmp_path, layout):
    model = tiny_uvit(qkv_bias=True, conv=True, mlp_time_embed=True)
    state = model.state_dict()
    path = tmp_path / ("model.safetensors" if layout == "safetensors" else "model.pt")
    if layout == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state if layout == "bare" else {"ema": state, "model": {}}, path)
    architecture, config, loaded = load_uvit_checkpoint(path, num_heads=2)
    assert architecture == "uvit" and config == model.config
    rebuilt = load_state_dict_checked(rebuild_backbone(architecture, config), loaded).eval()
    x, t, y = tiny_inputs(model)
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y)[0], model(x, t, y)[0])


def test_text_checkpoint_keeps_its_null_context(tmp_path):
    model = tiny_uvit(num_classes=None, text_dim=6, text_len=3)
    model.set_null_context(torch.randn(3, 6))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    _, config, loaded = load_uvit_checkpoint(tmp_path / "model.pt", num_heads=2, text_len=3)
    assert config == model.config and torch.equal(loaded["null_context"], model.null_context)


def test_checkpoint_of_another_size_is_a_clear_error(tmp_path):
    torch.save(tiny_uvit().state_dict(), tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"not a U-ViT-H/2: expected .*'hidden_size': 1152.*found .*'hidden_size': 32"):
        load_uvit_checkpoint(tmp_path / "model.pt", name="U-ViT-H/2")
    _, config, state = load_uvit_checkpoint(tmp_path / "model.pt", num_heads=2)
    wider = UViT(**dict(config, hidden_size=64))
    with pytest.raises(ValueError, match=r"patch_embed.proj.weight: expected \(64, 4, 2, 2\), found \(32, 4, 2, 2\)"):
        load_state_dict_checked(wider, state)
    with pytest.raises(ValueError, match="expected key 'patch_embed.proj.weight'"):
        uvit_config_from_state_dict({"something": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------

def reference_alphas_cumprod(n=1000):
    """abar_n for n = 1..N, written out here from the Stable Diffusion betas."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class Recorder:
    """A 'network' returning a fixed function of its input, recording what it was given."""

    def __call__(self, x, t, y=None):
        self.x, self.t = x, t
        return torch.tanh(x), {"seen": True}


def test_training_pass_forms_x_n_and_regresses_epsilon():
    objective = build_objective("uvit-eps")
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    steps = torch.tensor([1, 2, 250, 500, 999, 1000])
    net = Recorder()
    out = objective(net, x0, steps=steps, noise=noise)
    abar = reference_alphas_cumprod()[steps - 1].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(net.x, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    assert torch.equal(net.t, steps.float())
    torch.testing.assert_close(out.terms["denoise"], ((torch.tanh(net.x) - noise) ** 2).mean(dim=(1, 2, 3)))
    assert torch.equal(out.target, noise) and out.aux == {"seen": True}
    torch.testing.assert_close(out.time.flatten(), steps / 1000)
    torch.testing.assert_close(objective.network_time(out.time.flatten()), steps.float())


def test_training_timesteps_are_uniform_over_one_to_n():
    objective = build_objective("uvit-eps", num_timesteps=10)
    steps = objective.sample_steps(20000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(steps, minlength=11)
    assert counts[0] == 0 and steps.max() == 10
    assert ((counts[1:] - 2000).abs() < 4 * 2000**0.5).all(), counts


def test_schedule_interpolates_log_alpha_between_the_knots():
    """DPM-Solver's discrete schedule: log alpha piecewise linear through (n / N, log sqrt(abar_n))."""
    objective = build_objective("uvit-eps")
    log_alpha = 0.5 * reference_alphas_cumprod().log()
    for n in (1, 2, 500, 1000):
        assert objective.marginal_log_mean_coeff(n / 1000) == pytest.approx(float(log_alpha[n - 1]), abs=1e-12)
    midpoint = objective.marginal_log_mean_coeff(0.4995)
    assert midpoint == pytest.approx(float(log_alpha[498] + log_alpha[499]) / 2, abs=1e-12)
    for t in (0.001, 0.0123, 0.5, 0.98765, 1.0):
        alpha, sigma = math.exp(objective.marginal_log_mean_coeff(t)), objective.marginal_std(t)
        assert alpha**2 + sigma**2 == pytest.approx(1.0)
        assert objective.marginal_lambda(t) == pytest.approx(math.log(alpha / sigma))
        assert objective.inverse_lambda(objective.marginal_lambda(t)) == pytest.approx(t, abs=1e-12)


def test_sampler_pairing():
    objective = build_objective("uvit-eps")
    assert objective.default_sampler == "dpm-solver" and UViT.default_objective == "uvit-eps"
    assert check_sampler("dpm-solver", objective) is SAMPLERS.get("dpm-solver")
    with pytest.raises(ValueError, match="does not apply"):
        check_sampler("dpm-solver", build_objective("flow"))
    with pytest.raises(ValueError, match="does not apply"):
        check_sampler("euler", objective)


# ----------------------------------------------------------------------------------------------------------------
# DPM-Solver on Gaussian data
# ----------------------------------------------------------------------------------------------------------------

MEANS, STDS = [[1.0, -0.5], [-1.0, 2.0]], [[0.5, 1.5], [1.0, 0.3]]


class GaussianEps:
    """Exact noise prediction E[eps | x_t] = sigma (x - alpha m) / (alpha^2 s^2 + sigma^2) for data
    x0 ~ N(m, diag(s^2)), m, s chosen by the class y (class 1 is the null class of the guidance test)."""

    def __init__(self, objective):
        self.objective = objective
        self.calls = 0

    def eps(self, x, t, y):
        alpha, sigma = math.exp(self.objective.marginal_log_mean_coeff(t)), self.objective.marginal_std(t)
        shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
        y = torch.as_tensor(y).expand(x.shape[0])
        m = torch.tensor(MEANS, dtype=torch.float64)[y].view(shape)
        s = torch.tensor(STDS, dtype=torch.float64)[y].view(shape)
        return sigma * (x.double() - alpha * m) / (alpha**2 * s**2 + sigma**2)

    def __call__(self, x, t_net, y):
        self.calls += 1
        assert (t_net == t_net[0]).all()
        return self.eps(x, float(t_net[0]) / self.objective.num_timesteps, y).to(x.dtype), {}

    def null_condition(self, batch_size, device=None):
        return torch.ones(batch_size, dtype=torch.long, device=device)


def exact_transport(noise, y=0):
    """The probability-flow map from t = 1 to t = 1 / N for Gaussian data: the monotone affine map between the
    marginals N(alpha m, alpha^2 s^2 + sigma^2), their alpha taken from abar_N and abar_1 computed here."""
    abar = reference_alphas_cumprod()
    m = torch.tensor(MEANS[y], dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(STDS[y], dtype=torch.float64).view(1, -1, 1, 1)
    std_start = (abar[-1] * s**2 + 1 - abar[-1]).sqrt()
    std_end = (abar[0] * s**2 + 1 - abar[0]).sqrt()
    return abar[0].sqrt() * m + std_end * (noise.double() - abar[-1].sqrt() * m) / std_start


def gaussian_noise(n=256, seed=0):
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed))


def solve_float64(objective, method, num_steps, order, noise):
    """The solver run in float64 on a logSNR grid, so that the error is the discretisation error alone."""
    model = GaussianEps(objective)
    network = lambda x, t: model.eps(x, t, 0)  # noqa: E731
    solve = dpm.singlestep if method == "singlestep" else dpm.multistep
    return solve(objective, network, noise.double(), dpm.time_grid(objective, num_steps, "logSNR"), order)


def convergence_rates(errors, steps):
    return [math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)]


@pytest.mark.parametrize("method,order,steps", [
    ("singlestep", 2, [32, 64, 128]),
    ("singlestep", 3, [96, 192, 384]),
    ("multistep", 2, [32, 64, 128]),
])
def test_dpm_solver_converges_at_its_order(method, order, steps):
    objective = build_objective("uvit-eps")
    noise = gaussian_noise()
    exact = exact_transport(noise)
    errors = [(solve_float64(objective, method, n, order, noise) - exact).abs().max().item() for n in steps]
    rates = convergence_rates(errors, steps)
    assert all(order - 0.25 < rate < order + 0.5 for rate in rates), (errors, rates)


def test_third_order_multistep_update_is_third_order():
    """DPM-Solver++(3M) steps from an exact history (the exact solution at the first two grid points) converge at
    third order; with its first-order first step the whole sampler falls at second order, below 2M."""
    objective = build_objective("uvit-eps")
    noise = gaussian_noise()
    model = GaussianEps(objective)
    network = lambda x, t: model.eps(x, t, 0)  # noqa: E731
    steps, errors = [24, 48, 96], []
    for n in steps:
        times = dpm.time_grid(objective, n, "logSNR")
        x, ds = noise.double(), []
        for i, t in enumerate(times[1:]):
            ds = (ds + [dpm.data_prediction(objective, network, x, times[i])])[-3:]
            x = exact_at(noise, t, objective) if i < 2 else dpm.multistep_update(objective, x, times[:i + 1], ds, t)
        errors.append((x - exact_transport(noise)).abs().max().item())
    assert all(2.75 < rate < 4.5 for rate in convergence_rates(errors, steps)), errors
    exact = exact_transport(noise)
    full = [(solve_float64(objective, "multistep", n, 3, noise) - exact).abs().max().item() for n in (64, 128)]
    two_m = (solve_float64(objective, "multistep", 128, 2, noise) - exact).abs().max().item()
    assert 1.75 < convergence_rates(full, [64, 128])[0] < 2.5 and full[1] < two_m / 4, (full, two_m)


def exact_at(noise, t, objective):
    """The exact probability-flow solution at time t (the marginals' map from t = 1)."""
    alpha, sigma = math.exp(objective.marginal_log_mean_coeff(t)), objective.marginal_std(t)
    alpha_start, sigma_start = math.exp(objective.marginal_log_mean_coeff(1.0)), objective.marginal_std(1.0)
    m = torch.tensor(MEANS[0], dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(STDS[0], dtype=torch.float64).view(1, -1, 1, 1)
    std = (alpha**2 * s**2 + sigma**2).sqrt()
    std_start = (alpha_start**2 * s**2 + sigma_start**2).sqrt()
    return alpha * m + std * (noise.double() - alpha_start * m) / std_start


@pytest.mark.parametrize("order", [2, 3])
def test_sampler_on_uvits_grid_approaches_the_exact_map(order):
    """The registered sampler as U-ViT uses it (float32, time-uniform grid): one network call per step, and the
    error falls with the number of steps."""
    objective = build_objective("uvit-eps")
    noise = gaussian_noise()
    model = GaussianEps(objective)
    network = GuidedNetwork(model, objective, torch.zeros(256, dtype=torch.long))
    errors = []
    for n in (24, 96, 384):
        model.calls = 0
        out = sample("dpm-solver", objective, network, noise, n, order=order)
        assert out.dtype == torch.float32 and model.calls == n
        errors.append((out.double() - exact_transport(noise)).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-2, errors


def test_guidance_equals_sampling_the_guided_noise_prediction():
    objective = build_objective("uvit-eps")
    noise = gaussian_noise(64)
    labels = torch.zeros(64, dtype=torch.long)
    model = GaussianEps(objective)
    guided = sample("dpm-solver", objective, GuidedNetwork(model, objective, labels, scale=4.0), noise, 12)

    def guided_eps(x, t):
        cond, uncond = model.eps(x, t, labels), model.eps(x, t, torch.ones_like(labels))
        return (uncond + 4.0 * (cond - uncond)).float()

    direct = sample("dpm-solver", objective, guided_eps, noise, 12)
    torch.testing.assert_close(guided, direct, atol=1e-5, rtol=1e-5)
    unguided = sample("dpm-solver", objective, GuidedNetwork(model, objective, labels), noise, 12)
    assert (guided - unguided).abs().max() > 0.1


def test_singlestep_orders_spend_the_evaluations():
    for n in range(1, 20):
        for order in (1, 2, 3):
            orders = dpm.singlestep_orders(n, order)
            assert sum(orders) == n and max(orders) <= order
    assert dpm.singlestep_orders(12, 3) == [3, 3, 3, 2, 1]
    with pytest.raises(ValueError, match="order"):
        sample("dpm-solver", build_objective("uvit-eps"), None, gaussian_noise(2), 4, order=4)
