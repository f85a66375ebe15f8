"""LightningDiT (models/lightningdit.py, omegadit/objectives/lightningdit.py) against hustvl/LightningDiT fixtures:
forward, the guided Euler sample with timestep shift, its checkpoint layout, latent statistics and conventions."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import models.backbone
from conftest import fixture_path, load_fixture_file, randomize
from models import ARCHITECTURES, BACKBONES, rebuild_backbone
from models.lightningdit import (SIZES, LightningDiT, LightningDiT_models, build_from_checkpoint, from_lightningdit,
                                 latent_normalisation, load_lightningdit_checkpoint)
from models.pos_embed import rope_2d_tables, sincos_2d
from omegadit.objectives import OBJECTIVES, build_objective
from omegadit.objectives.flow import FlowMatching
from omegadit.objectives.lightningdit import LightningDiTFlow, sampling_settings
from omegadit.sampling import sample
from omegadit.sampling.guidance import GuidedNetwork


def fixture_model(state):
    architecture, config, ours = from_lightningdit(state)
    model = rebuild_backbone(architecture, config)
    model.load_state_dict(ours)
    return model.eval()


def tiny(**overrides):
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    kwargs.update(overrides)
    model = LightningDiT(**kwargs)
    randomize(model)
    return model.eval()


def inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, cfg["num_classes"] + 1, (batch,), generator=g)


def reference_layout(model):
    """Our weights in LightningDiT's key layout: its RoPE tables added, DDP prefix as its train.py saves them."""
    state = dict(model.state_dict())
    state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = model.rope_cos, model.rope_sin
    return {f"module.{k}": v.clone() for k, v in state.items()}


def test_forward_matches_fixture():
    meta, state, t = load_fixture_file("peers/lightningdit.safetensors")
    model = fixture_model(state)
    assert {k: model.config[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                         "num_heads", "num_classes", "mlp_ratio")} == \
        {k: meta["config"][k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                        "num_heads", "num_classes", "mlp_ratio")}
    assert model.config["qk_norm"] == meta["config"]["use_qknorm"]
    assert model.config["wo_shift"] == meta["config"]["wo_shift"]
    assert model.config["learn_sigma"] == meta["config"]["learn_sigma"]
    with torch.no_grad():
        out, aux = model(t["x"], t["t"], t["y"])
    assert aux == {}
    assert (out - t["out"]).abs().max() < 1e-5


def test_fixed_tables_match_fixture():
    meta, state, _ = load_fixture_file("peers/lightningdit.safetensors")
    cfg = meta["config"]
    grid = cfg["input_size"] // cfg["patch_size"]
    cos, sin = rope_2d_tables(cfg["hidden_size"] // cfg["num_heads"], grid)
    assert torch.allclose(cos, state["feat_rope.freqs_cos"], atol=1e-6)
    assert torch.allclose(sin, state["feat_rope.freqs_sin"], atol=1e-6)
    assert torch.allclose(sincos_2d(cfg["hidden_size"], grid), state["pos_embed"][0], atol=1e-6)


def fixture_sample(model, objective, t, meta, **overrides):
    """Our euler sampler + GuidedNetwork with LightningDiT's settings, on the conditional half of the fixture."""
    settings = sampling_settings(meta["num_steps"], meta["cfg_scale"], meta["cfg_interval_start"])
    settings.update(overrides)
    half = t["z"].shape[0] // 2
    network = GuidedNetwork(model, objective, t["y"][:half], y_null=t["y"][half:], scale=settings["scale"],
                            interval=settings["interval"], channels=settings["channels"])
    return sample(settings["sampler"], objective, network, t["z"][:half], settings["num_steps"]), t["out"][:half]


def test_guided_euler_sample_matches_fixture():
    meta, state, t = load_fixture_file("peers/lightningdit_sample.safetensors")
    model = fixture_model(state)
    half = t["y"].shape[0] // 2
    assert torch.equal(model.null_condition(half), t["y"][half:])
    objective = build_objective("lightningdit-flow", timestep_shift=meta["timestep_shift"])
    ours, reference = fixture_sample(model, objective, t, meta)
    assert ((ours - reference).abs() / reference.abs().clamp(min=1.0)).max() < 1e-5
    for overrides in (dict(interval=(0.0, 1.0)), dict(channels=None), dict(num_steps=meta["num_steps"])):
        other, _ = fixture_sample(model, objective, t, meta, **overrides)
        assert (other - reference).abs().max() > 1e-3, f"the fixture does not distinguish {overrides}"


def test_sampling_grid_is_lightningdits_shifted_grid():
    """Our times are 1 - LightningDiT's shifted grid k s / (1 + (k - 1) s) on s = linspace(0, 1, N)."""
    k, points = 0.3, 12
    s = torch.linspace(0, 1, points, dtype=torch.float64)
    expected = (1 - k * s / (1 + (k - 1) * s)).tolist()
    ours = LightningDiTFlow(timestep_shift=k).sampling_times(points - 1, stochastic=False)
    assert ours == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", sorted(LightningDiT_models))
def test_every_size_builds_and_runs(name):
    """The full network is built without memory (meta device); one block of it runs on a tiny input."""
    size, patch = name.split("-")[1].split("/")
    with torch.device("meta"):
        full = BACKBONES.build(name, input_size=4, in_channels=4, num_classes=3)
    assert {k: full.config[k] for k in SIZES[size]} == SIZES[size] and full.config["patch_size"] == int(patch)
    assert len(full.blocks) == SIZES[size]["depth"]
    model = LightningDiT(**{**full.config, "depth": 1}).eval()
    x, t, y = inputs(model, batch=2)
    with torch.no_grad():
        out, _ = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_xl1_parameter_count_matches_paper():
    with torch.device("meta"):
        model = BACKBONES.build("LightningDiT-XL/1", input_size=16, in_channels=32, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 675e6 - 1) < 1e-3


def test_backbone_interface():
    model = tiny()
    assert ARCHITECTURES.get(model.architecture) is LightningDiT
    assert model.default_objective in OBJECTIVES and model.conditioning == "class"
    assert model.null_condition(2).tolist() == [5, 5]
    assert model.latent_shape == (4, 8, 8)
    rebuilt = rebuild_backbone(model.architecture, model.config)
    rebuilt.load_state_dict(model.state_dict())
    x, t, y = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y)[0], rebuilt.eval()(x, t, y)[0])
        assert not torch.allclose(model(x, t, y)[0], model(x, t, model.null_condition(3))[0])


def test_checkpoint_round_trip_from_fixture(tmp_path):
    """The fixture's weights saved as LightningDiT's train.py does ({'model', 'ema'}) load and compute its output;
    'ema' is preferred, 'model' on request."""
    _, state, t = load_fixture_file("peers/lightningdit.safetensors")
    broken = {k: torch.zeros_like(v) if k.startswith("blocks.") else v for k, v in state.items()}
    path = tmp_path / "0000100.pt"
    torch.save({"model": broken, "ema": state, "opt": {"lr": 1e-4}}, path)
    model = build_from_checkpoint(path)
    with torch.no_grad():
        assert (model(t["x"], t["t"], t["y"])[0] - t["out"]).abs().max() < 1e-5
        raw = build_from_checkpoint(path, use_ema=False)
        assert (raw(t["x"], t["t"], t["y"])[0] - t["out"]).abs().max() > 1e-3


def test_fixture_file_itself_loads_as_a_checkpoint():
    """A .safetensors file with 'model.'-prefixed keys (the fixture) is read like a {'model': ...} checkpoint."""
    _, _, t = load_fixture_file("peers/lightningdit.safetensors")
    model = build_from_checkpoint(fixture_path("peers/lightningdit.safetensors"))
    with torch.no_grad():
        assert (model(t["x"], t["t"], t["y"])[0] - t["out"]).abs().max() < 1e-5


@pytest.mark.parametrize("options", [dict(), dict(qk_norm=True, wo_shift=True, learn_sigma=True),
                                     dict(patch_size=1, mlp_ratio=2.0)])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip_infers_config(tmp_path, options, suffix):
    model = tiny(**options)
    path = tmp_path / f"model{suffix}"
    weights = reference_layout(model)
    if suffix == ".pt":
        torch.save(weights, path)
    else:
        save_file(weights, str(path))
    architecture, config, state = load_lightningdit_checkpoint(path)
    assert architecture == "lightningdit" and config == model.config
    loaded = rebuild_backbone(architecture, config)
    loaded.load_state_dict(state)
    x, t, y = inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t, y)[0], loaded.eval()(x, t, y)[0])


def test_checkpoint_of_another_size_is_a_clear_error(tmp_path):
    _, state, _ = load_fixture_file("peers/lightningdit.safetensors")
    path = tmp_path / "small.pt"
    torch.save({"ema": state}, path)
    with pytest.raises(ValueError, match="depth: expected 28, found 2; hidden_size: expected 1152, found 64"):
        load_lightningdit_checkpoint(path, model_name="LightningDiT-XL/1")
    with pytest.raises(ValueError, match="unknown LightningDiT model"):
        load_lightningdit_checkpoint(path, model_name="LightningDiT-H/1")


def test_checkpoint_without_rope_or_swiglu_is_a_clear_error(tmp_path):
    weights = reference_layout(tiny())
    for missing, message in (("feat_rope.freqs_cos", "use_rope=True"), ("blocks.0.mlp.w3.weight", "use_swiglu=True")):
        path = tmp_path / "model.pt"
        torch.save({k: v for k, v in weights.items() if k != f"module.{missing}"}, path)
        with pytest.raises(ValueError, match=message):
            load_lightningdit_checkpoint(path)


def test_checkpoint_with_extra_or_misshapen_weights_is_a_clear_error(tmp_path):
    weights = reference_layout(tiny())
    weights["module.blocks.1.attn.v1_lambda"] = torch.tensor(0.5)
    weights["module.blocks.1.attn.proj.bias"] = torch.zeros(7)
    path = tmp_path / "model.pt"
    torch.save(weights, path)
    with pytest.raises(ValueError, match=r"unexpected blocks.1.attn.v1_lambda; blocks.1.attn.proj.bias: expected "
                                         r"shape \(32,\), found \(7,\)"):
        load_lightningdit_checkpoint(path)


def test_checkpoint_with_other_rope_layout_is_rejected(tmp_path):
    weights = reference_layout(tiny())
    weights["module.feat_rope.freqs_cos"] = weights["module.feat_rope.freqs_cos"].flip(-1)
    path = tmp_path / "model.pt"
    torch.save(weights, path)
    with pytest.raises(ValueError, match="feat_rope.freqs_cos differs"):
        load_lightningdit_checkpoint(path)


def test_wo_shift_block_is_a_block_with_zero_shifts():
    shifted, unshifted = tiny(), tiny(wo_shift=True)
    state = unshifted.state_dict()
    for key, value in shifted.state_dict().items():
        if "adaLN_modulation" in key and key.startswith("blocks."):
            scale_msa, gate_msa, scale_mlp, gate_mlp = state[key].chunk(4, dim=0)
            zero = torch.zeros_like(scale_msa)
            state[key] = torch.cat([zero, scale_msa, gate_msa, zero, scale_mlp, gate_mlp], dim=0)
        assert state[key].shape == value.shape
    shifted.load_state_dict(state)
    x, t, y = inputs(shifted)
    with torch.no_grad():
        assert torch.allclose(shifted(x, t, y)[0], unshifted(x, t, y)[0], atol=1e-6)


def test_learn_sigma_returns_the_first_half_of_the_channels():
    sigma, plain = tiny(learn_sigma=True), tiny()
    state = sigma.state_dict()
    out_channels = 2 * sigma.in_channels
    keep = torch.arange(state["final_layer.linear.weight"].shape[0]) % out_channels < sigma.in_channels
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"][keep]
    state["final_layer.linear.bias"] = state["final_layer.linear.bias"][keep]
    plain.load_state_dict(state)
    x, t, y = inputs(plain)
    with torch.no_grad():
        assert torch.equal(sigma(x, t, y)[0], plain(x, t, y)[0])


def test_gradient_checkpointing_wraps_every_block(monkeypatch):
    calls = []
    original = models.backbone.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(function)
        return original(function, *args, **kwargs)

    monkeypatch.setattr(models.backbone, "checkpoint", counting)
    grads = []
    for enabled in (False, True):
        model = tiny().train()
        model.set_gradient_checkpointing(enabled)
        x, t, y = inputs(model)
        model(x, t, y)[0].square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert len(calls) == (len(model.blocks) if enabled else 0)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


class Recorder:
    """A network that records its inputs and returns a fixed function of its target."""

    def __init__(self, respond):
        self.respond, self.seen = respond, {}

    def __call__(self, x, t):
        self.seen = dict(x=x, t=t)
        return self.respond(x, t), {}


def test_objective_conventions_against_flow_matching():
    """Same noisy input as 'flow' at the same (t, noise); the network gets 1 - t; its target is minus our velocity
    target; a perfect prediction has zero loss terms, the opposite one direction loss 2."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.rand(4, generator=g)
    flow, ours = Recorder(lambda x, s: torch.zeros_like(x)), Recorder(lambda x, s: torch.zeros_like(x))
    flow_out = FlowMatching(time_shifting=False)(flow, x0, time_input=t, noise=noise)
    out = LightningDiTFlow()(ours, x0, time_input=t, noise=noise)
    assert torch.equal(flow.seen["x"], ours.seen["x"]) and torch.allclose(ours.seen["t"], 1 - t)
    assert torch.allclose(LightningDiTFlow().velocity(out.target, None, 0.5), flow_out.target)
    for sign, direction in ((1, 0.0), (-1, 2.0)):
        objective = LightningDiTFlow()
        result = objective(lambda x, s: (sign * (x0 - noise), {}), x0, time_input=t, noise=noise)
        assert set(result.terms) == set(objective.term_names) == {"denoise", "direction"}
        assert torch.allclose(result.terms["direction"], torch.full((4,), direction), atol=1e-6)
    assert torch.allclose(LightningDiTFlow()(lambda x, s: (x0 - noise, {}), x0, time_input=t,
                                             noise=noise).terms["denoise"], torch.zeros(4))
    assert LightningDiTFlow(direction_loss=False).term_names == ("denoise",)


def test_objective_rebuilds_from_its_description():
    objective = LightningDiTFlow(weighting="uniform", direction_loss=False, timestep_shift=0.5)
    description = objective.describe()
    rebuilt = build_objective(description["name"], **description["config"])
    assert rebuilt.config == objective.config and rebuilt.sampling_times(4, False) == objective.sampling_times(4, False)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_latent_statistics_give_lightningdits_normalisation(tmp_path, suffix):
    """(z - mean) / std with our (mean, std) equals LightningDiT's (z - mean) / std * multiplier."""
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(1, 6, 1, 1, generator=g), torch.rand(1, 6, 1, 1, generator=g) + 0.5
    path = tmp_path / f"latents_stats{suffix}"
    if suffix == ".pt":
        torch.save({"mean": mean, "std": std}, path)
    else:
        save_file({"mean": mean, "std": std}, str(path))
    z = torch.randn(2, 6, 4, 4, generator=g)
    for multiplier in (1.0, 0.5):
        our_mean, our_std = latent_normalisation(path, multiplier)
        assert our_mean.shape == our_std.shape == (6, 1, 1)
        assert torch.allclose((z - our_mean) / our_std, (z - mean) / std * multiplier, atol=1e-6)
    our_mean, our_std = latent_normalisation(None, 0.18215)
    assert torch.allclose((z - our_mean) / our_std, z * 0.18215)


def test_latent_statistics_without_std_is_a_clear_error(tmp_path):
    path = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.zeros(1, 4, 1, 1)}, path)
    with pytest.raises(ValueError, match="missing \\['std'\\]"):
        latent_normalisation(path)


def test_train_keeps_the_objectives_own_defaults_unless_a_flag_is_given(tmp_path):
    """train.py passes an objective only the options the user set: LightningDiT's objective keeps its logit-normal
    times (train.py's --weighting default is 'uniform', the flow objective's), SiT's flow objective its time
    shifting; --weighting on the command line, even at the parser's default value, or in a --config file wins."""
    import train

    base = ["--exp-name", "x", "--data-dir", "d", "--model", "LightningDiT-B/1"]
    data = SimpleNamespace(latent_mean=torch.zeros(4, 1, 1), latent_std=torch.ones(4, 1, 1))
    model = tiny()

    def objective(*argv):
        return train.build_objective(train.parse_args([*base, *argv]), model, data)

    assert objective().weighting == "lognormal" and objective().time_shifting is False
    assert objective("--weighting", "uniform").weighting == "uniform"
    config = tmp_path / "run.yaml"
    config.write_text("weighting: uniform\n")
    assert objective("--config", str(config)).weighting == "uniform"
    with pytest.raises(ValueError, match="does not take --shift-base"):
        objective("--shift-base", "4096")
    sit = SimpleNamespace(default_objective="flow", objective_defaults={})
    flow = train.build_objective(train.parse_args(base[:4]), sit, data)
    assert (flow.name, flow.weighting, flow.time_shifting) == ("flow", "uniform", True)
    assert train.build_objective(train.parse_args([*base[:4], "--no-time-shifting"]), sit, data).time_shifting is False
