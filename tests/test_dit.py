"""DiT (Peebles & Xie 2023) as a peer system: the backbone, its checkpoint import, the Gaussian diffusion objective
and the DDPM/DDIM samplers, checked against facebookresearch/DiT outputs (peers/dit.safetensors) and closed forms."""
import argparse

import pytest
import torch
from safetensors.torch import save_file

import models.backbone
from conftest import load_fixture_file
from loss import TrainingLoss
from models import BACKBONES, build_backbone, rebuild_backbone
from models.dit import (DiT, convert_dit_state_dict, dit_from_state_dict, dit_latent_stats, dit_model_name,
                        infer_dit_config, load_dit_checkpoint, read_dit_checkpoint)
from omegadit.objectives import build_objective
from omegadit.objectives.gaussian import GaussianDiffusion, named_betas, space_timesteps
from omegadit.sampling import check_sampler, sample
from omegadit.sampling.guidance import GuidedNetwork

TOLERANCE = 1e-5
PAPER_PARAMETERS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}  # DiT paper, Table 1 (patch size 2)


def fixture_config(meta):
    """Our DiT kwargs of the fixture's constructor call (class-label dropout is the conditioner's, not ours)."""
    return {k: v for k, v in meta["config"].items() if k != "class_dropout_prob"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: one thread avoids the cost of parallel regions, large on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    meta, state, tensors = load_fixture_file("peers/dit.safetensors")
    return meta, dit_from_state_dict(state, fixture_config(meta)), tensors


def max_error(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------------------------
# Parity with facebookresearch/DiT
# ------------------------------------------------------------------------------------------------------------------

def test_config_is_read_off_the_fixture_state_dict():
    meta, state, _ = load_fixture_file("peers/dit.safetensors")
    assert infer_dit_config(state, num_heads=meta["config"]["num_heads"]) == fixture_config(meta)
    assert torch.allclose(DiT(**fixture_config(meta)).pos_embed, state["pos_embed"], atol=1e-6)


def test_forward_matches_reference(reference):
    _, model, t = reference
    with torch.no_grad():
        out, aux = model(t["x"], t["t"].float(), t["y"])
    assert aux == {} and out.shape == t["out"].shape
    assert max_error(out, t["out"]) < TOLERANCE


def test_guided_forward_matches_forward_with_cfg(reference):
    """DiT's forward_with_cfg on (x[:2] twice, t = 250, labels ddim_y = [2, 5, null, null]) guides the first 3
    channels; the rest of each half is that half's own output. GuidedNetwork(channels=3) gives the first half."""
    meta, model, t = reference
    labels = t["ddim_y"]
    objective = build_objective("gaussian")
    time = (meta["t_for_out_cfg"] + 1) / objective.num_timesteps
    network = GuidedNetwork(model, objective, labels[:2], scale=meta["cfg_scale_out_cfg"], channels=3)
    with torch.no_grad():
        guided = network(t["x"][:2], time)
        null_half, _ = model(t["x"][:2], torch.full((2,), float(meta["t_for_out_cfg"])), labels[2:])
    assert torch.equal(labels[2:], model.null_condition(2))
    assert max_error(guided, t["out_cfg"][:2]) < TOLERANCE
    assert max_error(null_half[:, 3:], t["out_cfg"][2:, 3:]) < TOLERANCE


def test_training_losses_match_reference(reference):
    _, model, t = reference
    objective = build_objective("gaussian")
    with torch.no_grad():
        output = objective(model, t["x"], {"y": t["y"]}, timesteps=t["t"], noise=t["noise"])
    assert objective.term_names == ("mse", "vb") and set(output.terms) == {"mse", "vb"}
    assert max_error(output.terms["mse"], t["loss_mse"]) < TOLERANCE
    assert max_error(output.terms["vb"], t["loss_vb"]) < TOLERANCE
    assert max_error(output.terms["mse"] + output.terms["vb"], t["loss"]) < TOLERANCE
    assert torch.allclose(output.time.flatten(), (t["t"] + 1).float() / 1000)


def test_ddim_sample_matches_reference(reference):
    """ddim10 with guidance 1.5 from DiT's doubled batch (z, z) with labels (y, null): our conditional half."""
    _, model, t = reference
    objective = build_objective("gaussian")
    network = GuidedNetwork(model, objective, t["ddim_y"][:2], scale=1.5, channels=3)
    x = sample("ddim", objective, network, t["ddim_z"][:2], num_steps=10)
    error = max_error(x, t["ddim_out"][:2])
    assert error < TOLERANCE, error


def test_training_loss_total_is_mse_plus_vb(reference):
    _, model, t = reference
    objective = build_objective("gaussian")
    batch = (model, t["x"], {"y": t["y"]})
    with torch.no_grad():
        total, values = TrainingLoss(objective)(*batch, generator=torch.Generator().manual_seed(0))
        output = objective(*batch, generator=torch.Generator().manual_seed(0))
    assert set(values) == {"mse", "vb"}
    assert torch.allclose(total, (output.terms["mse"] + output.terms["vb"]).mean())


def test_vb_term_trains_the_variance_only():
    """The vb term sees the predicted mean through a stop-gradient: no gradient reaches the noise channels."""
    output = torch.randn(3, 8, 4, 4, requires_grad=True)
    objective = GaussianDiffusion()
    out = objective(lambda x, t: (output, {}), torch.randn(3, 4, 4, 4), timesteps=torch.tensor([0, 10, 900]))
    grad, = torch.autograd.grad(out.terms["vb"].sum(), output)
    assert torch.count_nonzero(grad[:, :4]) == 0 and torch.count_nonzero(grad[:, 4:]) > 0


# ------------------------------------------------------------------------------------------------------------------
# Backbone sizes, checkpoints
# ------------------------------------------------------------------------------------------------------------------

DIT_NAMES = sorted(name for name in BACKBONES if name.startswith("DiT-"))


def test_every_size_is_registered():
    assert DIT_NAMES == sorted(f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8))


@pytest.mark.parametrize("name", DIT_NAMES)
def test_every_size_builds_runs_and_is_recognised(name):
    """Built on the meta device (shapes only): output shape, and the config read back off the state dict."""
    with torch.device("meta"):
        model = build_backbone(name, input_size=16, num_classes=10)
        out, _ = model(torch.zeros(2, 4, 16, 16), torch.zeros(2), torch.tensor([0, 10]))
    assert out.shape == (2, 8, 16, 16)
    assert infer_dit_config(model.state_dict()) == model.config
    assert dit_model_name(model.config) == name


@pytest.mark.parametrize("size", sorted(PAPER_PARAMETERS_M))
def test_parameter_counts_match_the_paper(size):
    with torch.device("meta"):
        model = build_backbone(f"DiT-{size}/2", input_size=32, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / (PAPER_PARAMETERS_M[size] * 1e6) - 1) < 5e-3  # the table rounds to millions


def test_rebuilds_from_config_and_runs_with_gradient_checkpointing(reference, monkeypatch):
    """Checkpointing wraps every block and leaves the gradients unchanged."""
    _, model, t = reference
    copy = rebuild_backbone(model.architecture, model.config)
    copy.load_state_dict(model.state_dict())
    wrapped = []
    checkpoint = models.backbone.checkpoint
    monkeypatch.setattr(models.backbone, "checkpoint", lambda block, *a, **k: wrapped.append(block) or
                        checkpoint(block, *a, **k))
    grads = {}
    for enabled in (False, True):
        copy.zero_grad()
        copy.train().set_gradient_checkpointing(enabled)
        out, _ = copy(t["x"], t["t"].float(), t["y"])
        out.square().mean().backward()
        grads[enabled] = [p.grad.clone() for p in copy.parameters() if p.requires_grad]
    assert wrapped == list(copy.blocks)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[False], grads[True]))
    assert copy.default_objective == "gaussian" and copy.conditioning == "class"


def perturbed(state, amount):
    return {k: v + amount if v.is_floating_point() else v for k, v in state.items()}


def forward(model, t):
    with torch.no_grad():
        return model(t["x"], t["t"].float(), t["y"])[0]


def test_checkpoint_round_trip_bare_and_train_py_layouts(tmp_path):
    meta, state, t = load_fixture_file("peers/dit.safetensors")
    heads = meta["config"]["num_heads"]
    torch.save(state, tmp_path / "bare.pt")
    args = argparse.Namespace(model="DiT-tiny", image_size=64, num_classes=10, global_seed=0)
    torch.save({"model": perturbed(state, 0.01), "ema": state, "opt": {"state": {}, "param_groups": []},
                "args": args}, tmp_path / "train.pt")
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "wrapped.safetensors"))
    for name in ("bare.pt", "train.pt", "wrapped.safetensors"):
        model = load_dit_checkpoint(tmp_path / name, num_heads=heads)
        assert not model.training and model.config == fixture_config(meta)
        assert max_error(forward(model, t), t["out"]) < TOLERANCE, name
    raw = load_dit_checkpoint(tmp_path / "train.pt", use_ema=False, num_heads=heads)
    assert max_error(forward(raw, t), t["out"]) > 1e-3
    architecture, config, converted = read_dit_checkpoint(tmp_path / "train.pt", num_heads=heads)
    assert architecture == "dit" and config == fixture_config(meta) and set(converted) == set(state)


def test_checkpoint_of_another_size_or_layout_is_refused(tmp_path):
    meta, state, _ = load_fixture_file("peers/dit.safetensors")
    torch.save(state, tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="expected a DiT-XL/2"):
        read_dit_checkpoint(tmp_path / "tiny.pt", expected="DiT-XL/2", num_heads=4)
    with pytest.raises(ValueError, match="pass num_heads"):
        read_dit_checkpoint(tmp_path / "tiny.pt")
    with torch.device("meta"):
        xl = build_backbone("DiT-XL/2", input_size=8, num_classes=10).state_dict()
    with pytest.raises(ValueError, match=r"wrong shapes \['blocks.0.adaLN_modulation.1.bias: expected \(384,\), "
                                         r"found \(6912,\)"):
        convert_dit_state_dict(xl, fixture_config(meta))
    renamed = dict(state)
    renamed["blocks.0.attn.qkv_weight"] = renamed.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(ValueError, match=r"missing keys \['blocks.0.attn.qkv.weight'\], unexpected keys "
                                         r"\['blocks.0.attn.qkv_weight'\]"):
        convert_dit_state_dict(renamed, fixture_config(meta))
    with pytest.raises(ValueError, match="expected key 'x_embedder.proj.weight'"):
        infer_dit_config({"weight": torch.zeros(1)})


def test_dit_latent_stats_reproduce_the_sd_vae_scaling():
    raw = torch.randn(2, 4, 8, 8)
    mean, std = dit_latent_stats()
    assert mean.shape == std.shape == (4, 1, 1)
    assert torch.allclose((raw - mean) / std, raw * 0.18215)


# ------------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# ------------------------------------------------------------------------------------------------------------------

def cumulative_alphas(schedule="linear", steps=1000):
    """abar_i written out here: DDPM's linear betas (scaled by 1000 / T) or Stable Diffusion's scaled linear."""
    i = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    if schedule == "linear":
        betas = (1000 / steps) * (1e-4 + i * (0.02 - 1e-4))
    else:
        betas = (0.00085 ** 0.5 + i * (0.012 ** 0.5 - 0.00085 ** 0.5)) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("linear", 250), ("scaled_linear", 1000)])
def test_beta_schedules(schedule, steps):
    objective = GaussianDiffusion(num_timesteps=steps, beta_schedule=schedule)
    assert torch.allclose(objective.chain.alphas_cumprod, cumulative_alphas(schedule, steps), rtol=1e-12)
    assert torch.allclose(named_betas(schedule, steps), objective.chain.betas)


def test_respacing_keeps_cumulative_alphas_and_maps_back_to_original_timesteps():
    objective = GaussianDiffusion()
    for spacing, count in (("250", 250), ("ddim10", 10), ("ddim50", 50), ("10,20,5", 35), ("1000", 1000)):
        chain = objective.respaced(spacing)
        kept = chain.timesteps
        assert len(chain) == len(kept) == count and kept == sorted(set(kept))
        assert torch.allclose(chain.alphas_cumprod, objective.chain.alphas_cumprod[kept], rtol=1e-12)
        times = torch.tensor([chain.time(k) for k in range(len(chain))], dtype=torch.float32)
        assert torch.equal(objective.network_time(times), torch.tensor(kept, dtype=torch.float32))
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, "250")[0] == 0 and space_timesteps(1000, "250")[-1] == 999
    assert space_timesteps(1000, "10,20,5")[:2] == [0, 37] and space_timesteps(1000, "10,20,5")[-1] == 999
    with pytest.raises(ValueError, match="stride"):
        space_timesteps(1000, "ddim600")
    assert objective.network_time(torch.tensor([1.0, 0.001])).tolist() == [999.0, 0.0]


def test_gaussian_samplers_refuse_flow_objectives_and_vice_versa():
    with pytest.raises(ValueError, match="does not apply"):
        check_sampler("ddim", build_objective("flow"))
    with pytest.raises(ValueError, match="does not apply"):
        check_sampler("euler", build_objective("gaussian"))


# ------------------------------------------------------------------------------------------------------------------
# Samplers on Gaussian data, whose exact noise prediction is known in closed form
# ------------------------------------------------------------------------------------------------------------------

MEAN, STD = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 1.5], dtype=torch.float64)
NUM_SAMPLES = 16384


class ExactNoisePrediction:
    """E[eps | x_i] = b (x - a m_y) / (a^2 s^2 + b^2) for data of class y ~ N(m_y, diag(s^2)), x_i = a x0 + b eps,
    a^2 = abar_i; class 0 has mean MEAN, class 1 MEAN + 2.

    Takes the network's timestep index (the objective's network_time). With `variance_value` it appends that
    constant as the learned-range variance channels; with `scale` it is the guided field eps_1 + w (eps_0 - eps_1).
    """

    def __init__(self, variance_value=None, scale=None):
        self.abar = cumulative_alphas()
        self.means = torch.stack([MEAN, MEAN + 2.0])
        self.variance_value = variance_value
        self.scale = scale

    def eps(self, x, t, y):
        abar = self.abar[t.round().long()].view(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        m, s = self.means[y].view(-1, 2, 1, 1), STD.view(1, -1, 1, 1)
        return (b * (x.double() - a * m) / (a ** 2 * s ** 2 + b ** 2)).float()

    def __call__(self, x, t, y):
        eps = self.eps(x, t, y)
        if self.scale is not None:
            uncond = self.eps(x, t, torch.ones_like(y))
            eps = uncond + self.scale * (self.eps(x, t, torch.zeros_like(y)) - uncond)
        if self.variance_value is not None:
            eps = torch.cat([eps, torch.full_like(eps, self.variance_value)], dim=1)
        return eps, {}


def gaussian_noise_batch(n=NUM_SAMPLES, seed=0):
    return torch.randn(n, 2, 1, 1, generator=torch.Generator().manual_seed(seed))


def run_sampler(name, variance, steps, model=None, seed=1, **options):
    objective = GaussianDiffusion(variance=variance)
    model = model or ExactNoisePrediction(-1.0 if variance == "learned_range" else None)
    network = GuidedNetwork(model, objective, torch.zeros(NUM_SAMPLES, dtype=torch.long))
    return sample(name, objective, network, gaussian_noise_batch(), steps,
                  generator=torch.Generator().manual_seed(seed), **options)


def moment_error(x):
    x = x.flatten(1).double()
    return max((x.mean(0) - MEAN).abs().max().item(), (torch.cov(x.T) - torch.diag(STD ** 2)).abs().max().item())


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_reproduces_data_moments(variance):
    """The error against the data distribution falls with the number of steps, to below 0.1 at DiT's 250 steps:
    the discretisation bias, O(1 / steps) (the fixed small variance is biased low, the large one high), plus the
    sampling error of 16384 samples (standard errors: mean 0.012, covariance 0.025)."""
    errors = [moment_error(run_sampler("ddpm", variance, steps)) for steps in (10, 50, 250)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.1, errors


def test_ddim_converges_to_the_exact_transport_map():
    """DDIM with the exact noise prediction discretises the probability-flow ODE, whose map from x at timestep
    999 to data is x -> m + s (x - a m) / sqrt(a^2 s^2 + b^2): per-sample error, first order in 1 / steps."""
    noise = gaussian_noise_batch().double()
    abar = cumulative_alphas()[-1]
    m, s = MEAN.view(1, -1, 1, 1), STD.view(1, -1, 1, 1)
    exact = m + s * (noise - abar.sqrt() * m) / (abar * s ** 2 + 1 - abar).sqrt()
    errors = {}
    for steps in (10, 20, 40, 80):
        errors[steps] = (run_sampler("ddim", "fixed_small", steps, spacing="even").double() - exact).abs().max().item()
    assert errors[80] < 0.15, errors  # the largest of 16384 samples, whose noise reaches |z| = 4
    for steps in (10, 20, 40):
        assert 1.5 < errors[steps] / errors[2 * steps] < 2.5, errors


def test_learned_range_variance_interpolates_the_fixed_ones():
    """Variance values -1 and 1 are the fixed small and fixed large variances; eta = 1 DDIM with even spacing is
    DDPM with the fixed small variance (Song et al. 2021, sec. 4.1)."""
    small = run_sampler("ddpm", "fixed_small", 20)
    large = run_sampler("ddpm", "fixed_large", 20)
    assert torch.allclose(run_sampler("ddpm", "learned_range", 20, ExactNoisePrediction(-1.0)), small, atol=1e-5)
    assert torch.allclose(run_sampler("ddpm", "learned_range", 20, ExactNoisePrediction(1.0)), large, atol=1e-5)
    assert max_error(small, large) > 0.01
    ddim_eta1 = run_sampler("ddim", "fixed_small", 20, spacing="even", eta=1.0)
    assert max_error(ddim_eta1, small) < 1e-4


def test_guidance_equals_sampling_the_guided_field():
    """CFG on the (conditional, null) pair equals DDIM on the field eps_u + w (eps_c - eps_u) itself."""
    objective = GaussianDiffusion(variance="fixed_small")
    labels = torch.zeros(256, dtype=torch.long)
    noise = gaussian_noise_batch(256)
    model = ExactNoisePrediction()
    guided = sample("ddim", objective, GuidedNetwork(model, objective, labels, torch.ones_like(labels), 3.0), noise, 12)
    direct = sample("ddim", objective, GuidedNetwork(ExactNoisePrediction(scale=3.0), objective, labels), noise, 12)
    plain = sample("ddim", objective, GuidedNetwork(model, objective, labels), noise, 12)
    torch.testing.assert_close(guided, direct, atol=1e-5, rtol=1e-5)
    assert max_error(guided, plain) > 0.1
