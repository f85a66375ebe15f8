
import pytest
import torch

from conftest import count_checkpointed_blocks, load_fixture_file, randomize
from models.pos_embed import rope_2d_tables, sincos_2d
from models.sit import SiT, SiT_models, from_reference


def tiny_text_sit(**overrides):
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=5, num_heads=2,
                  text_dim=16, text_len=5, z_dims=[8, 12], projector_dim=16)
    kwargs.update(overrides)
    model = SiT(**kwargs)
    randomize(model)
    return model


def inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=g)
    t = torch.rand(batch, generator=g)
    if cfg["text_dim"] is not None:
        y = torch.randn(batch, cfg["text_len"], cfg["text_dim"], generator=g)
    else:
        y = torch.randint(0, cfg["num_classes"], (batch,), generator=g)
    return x, t, y


def test_reference_checkpoint_parity():
    meta, state, t = load_fixture_file("omegadit_sit.safetensors")
    model = from_reference(state, **meta["config"])
    assert not model.training
    with torch.no_grad():
        out, aux = model(t["x"], t["t"], t["y"])
        zs = aux["repa"]
        out_uncond, _ = model(t["x"], t["t"], t["y_null"], uncond=True)
    assert (out - t["out"]).abs().max() < 1e-5
    assert len(zs) == 1 and (zs[0] - t["zs.0"]).abs().max() < 1e-5
    assert (out_uncond - t["out_uncond_pathdrop"]).abs().max() < 1e-5
    assert torch.equal(model.null_condition(3), t["y_null"])


def test_fixed_position_tables_match_reference():
    meta, state, _ = load_fixture_file("omegadit_sit.safetensors")
    grid = meta["config"]["input_size"] // meta["config"]["patch_size"]
    head_dim = meta["config"]["hidden_size"] // meta["config"]["num_heads"]
    cos, sin = rope_2d_tables(head_dim, grid)
    assert torch.allclose(cos, state["feat_rope.freqs_cos"], atol=1e-6)
    assert torch.allclose(sin, state["feat_rope.freqs_sin"], atol=1e-6)
    assert torch.allclose(sincos_2d(meta["config"]["hidden_size"], grid), state["pos_embed"][0], atol=1e-6)


def to_reference_layout(model):
    """Write our weights in the original train.py layout (separate q/k/v, v1_lambda, RoPE tables)."""
    state = {}
    for key, value in model.state_dict().items():
        if ".attn.qkv." in key:
            q, k, v = value.chunk(3, dim=0)
            base, kind = key.split(".qkv.")
            state.update({f"{base}.q.{kind}": q, f"{base}.k.{kind}": k, f"{base}.v.{kind}": v})
        else:
            state[key] = value
    for i in range(1, len(model.blocks)):
        state[f"blocks.{i}.attn.v1_lambda"] = torch.tensor(0.5)
    state["feat_rope.freqs_cos"] = model.rope_cos
    state["feat_rope.freqs_sin"] = model.rope_sin
    return {f"module.{k}": v for k, v in state.items()}


@pytest.mark.parametrize("patch_size,z_dims", [(2, [8, 12]), (4, []), (1, [8])])
def test_from_reference_handles_other_configs(patch_size, z_dims):
    ours = tiny_text_sit(patch_size=patch_size, z_dims=z_dims, text_len=77).eval()
    ref_kwargs = dict(input_size=8, patch_size=patch_size, in_channels=4, hidden_size=32, decoder_hidden_size=32,
                      depth=5, num_heads=2, mlp_ratio=4.0, z_dims=z_dims, projector_dim=16, num_classes=1000,
                      use_cfg=True, encoder_depth=4, path_type="linear")
    loaded = from_reference(to_reference_layout(ours), **ref_kwargs)
    x, t, y = inputs(ours)
    with torch.no_grad():
        a, za = ours(x, t, y)
        b, zb = loaded(x, t, y)
    za, zb = za["repa"], zb["repa"]
    assert torch.equal(a, b) and len(za) == len(z_dims) == len(zb)


def test_from_reference_rejects_mismatched_config():
    ours = tiny_text_sit(text_len=77)
    with pytest.raises(ValueError, match="does not match"):
        from_reference(to_reference_layout(ours), input_size=8, patch_size=2, in_channels=4, hidden_size=32,
                       depth=6, num_heads=2, z_dims=[8, 12], projector_dim=16)


@pytest.mark.parametrize("name", sorted(SiT_models))
def test_every_variant_builds_and_runs(name):
    model = SiT_models[name](input_size=8, in_channels=4, text_dim=16, text_len=3, z_dims=[8]).eval()
    x, t, y = inputs(model, batch=1)
    with torch.no_grad():
        out, aux = model(x, t, y)
    zs = aux["repa"]
    patch = int(name.split("/")[1])
    assert out.shape == x.shape and zs[0].shape == (1, (8 // patch) ** 2, 8)
    assert torch.isfinite(out).all()


def test_sit_b1_text_parameter_count_matches_reference():
    model = SiT_models["SiT-B/1"](input_size=16, in_channels=32, text_dim=768, z_dims=[768])
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 139.49e6 - 1) < 1e-3


def test_path_drop_only_in_training():
    model = tiny_text_sit(path_drop_prob=0.5)
    x, t, y = inputs(model, batch=8)
    model.eval()
    with torch.no_grad():
        reference, _ = model(x, t, y)
        assert all(torch.equal(model(x, t, y)[0], reference) for _ in range(5))
        model.train()
        outputs = [model(x, t, y)[0] for _ in range(8)]
    assert any(not torch.allclose(o, reference) for o in outputs)


def test_path_drop_in_training_equals_uncond():
    model = tiny_text_sit(path_drop_prob=1.0).train()
    x, t, y = inputs(model)
    with torch.no_grad():
        dropped, _ = model(x, t, y)
        model.eval()
        uncond, _ = model(x, t, y, uncond=True)
        cond, _ = model(x, t, y)
    assert torch.allclose(dropped, uncond, atol=1e-6)
    assert not torch.allclose(uncond, cond)


def test_path_drop_decision_is_reproducible_from_seed():
    model = tiny_text_sit(path_drop_prob=0.5).train()
    x, t, y = inputs(model)
    runs = []
    for _ in range(2):
        model.path_drop_generator.manual_seed(123)
        with torch.no_grad():
            runs.append(torch.stack([model(x, t, y)[0] for _ in range(6)]))
    assert torch.equal(runs[0], runs[1])


def test_per_sample_uncond_matches_whole_batch_calls():
    model = tiny_text_sit().eval()
    x, t, y = inputs(model, batch=4)
    mask = torch.tensor([False, True, False, True])
    with torch.no_grad():
        mixed, _ = model(x, t, y, uncond=mask)
        cond, _ = model(x, t, y)
        uncond, _ = model(x, t, y, uncond=True)
    assert torch.allclose(mixed[~mask], cond[~mask], atol=1e-6)
    assert torch.allclose(mixed[mask], uncond[mask], atol=1e-6)


def test_sparse_token_drop_changes_training_output_only():
    model = tiny_text_sit(path_drop_prob=0.0, sprint_drop_ratio=0.5)
    dense_model = tiny_text_sit(path_drop_prob=0.0, sprint_drop_ratio=0.0)
    x, t, y = inputs(model)
    with torch.no_grad():
        model.train(), dense_model.train()
        assert not torch.allclose(model(x, t, y)[0], dense_model(x, t, y)[0])
        model.eval(), dense_model.eval()
        assert torch.allclose(model(x, t, y)[0], dense_model(x, t, y)[0])


def test_sparse_path_gradients_reach_all_parameters():
    model = tiny_text_sit(path_drop_prob=0.0, sprint_drop_ratio=0.5).train()
    x, t, y = inputs(model)
    out, aux = model(x, t, y)
    (out.square().mean() + sum(z.square().mean() for z in aux["repa"])).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    checkpointed = count_checkpointed_blocks(monkeypatch)
    grads = []
    for flag in (False, True):
        model = tiny_text_sit(path_drop_prob=0.0).train()
        model.set_gradient_checkpointing(flag)
        x, t, y = inputs(model)
        out, aux = model(x, t, y)
        (out.square().mean() + aux["repa"][0].square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert len(checkpointed) == (len(model.blocks) if flag else 0)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_class_conditioning_uses_null_class_and_label():
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2,
                num_classes=10, z_dims=[8], projector_dim=16)
    randomize(model)
    model.eval()
    x, t, y = inputs(model)
    null = model.null_condition(3)
    assert null.tolist() == [10, 10, 10]
    with torch.no_grad():
        a, _ = model(x, t, y)
        b, _ = model(x, t, (y + 1) % 10)
        c, _ = model(x, t, null)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_constructor_rejects_ambiguous_conditioning():
    with pytest.raises(ValueError, match="exactly one"):
        SiT(input_size=8, in_channels=4, hidden_size=32, depth=4, num_heads=2)
    with pytest.raises(ValueError, match="exactly one"):
        SiT(input_size=8, in_channels=4, hidden_size=32, depth=4, num_heads=2, text_dim=8, num_classes=3)


