"""The fast training path computes the same function as plain float32 eager: bf16 autocast and train.py's
torch.compile, checked on CPU with a tiny SiT (benchmarks/bench_gpu.py runs the same check at full size on a GPU)."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from models.pos_embed import apply_rope, rope_2d_tables
from models.sit import Attention, RMSNorm
from omegadit.compilation import CACHE_ENV, repeated_blocks, use_compile_cache
from test_sit import inputs, tiny_text_sit
from train import compile_for_training

BF16_TOLERANCE = 2e-2  # bf16 keeps 8 bits of mantissa: unit roundoff 3.9e-3, a few roundings deep here


def relative_error(fast, reference):
    return ((fast.float() - reference.float()).norm() / reference.float().norm()).item()


def velocity_and_gradients(model, x, t, y, bf16):
    """The velocity and the gradient of every parameter for a loss that touches both outputs."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        velocity, aux = model(x, t, y)
    loss = velocity.float().square().mean() + sum(z.float().square().mean() for z in aux["repa"])
    loss.backward()
    gradients = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return velocity.detach(), gradients


def deterministic_training_model():
    """A tiny text SiT in training mode with its random part (path drop) switched off."""
    model = tiny_text_sit().train()
    model.path_drop_prob = 0.0
    return model


def unit_gain_(model):
    """Give `model` weights of unit gain in place, so that its blocks (where FP8 acts) shape outputs and gradients."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p[0].numel() ** -0.5 if p.dim() > 1 else 0.02)
    return model


def test_bf16_autocast_matches_float32():
    model = deterministic_training_model()
    x, t, y = inputs(model, batch=4)
    v32, g32 = velocity_and_gradients(model, x, t, y, bf16=False)
    v16, g16 = velocity_and_gradients(model, x, t, y, bf16=True)
    assert v16.dtype == torch.bfloat16  # autocast really ran the blocks in bf16
    assert 0 < relative_error(v16, v32) < BF16_TOLERANCE
    assert 0 < relative_error(g16, g32) < BF16_TOLERANCE


def test_rmsnorm_runs_in_the_activation_dtype():
    norm = RMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    reference = torch.nn.RMSNorm(64, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = norm(x)
    assert out.dtype == torch.bfloat16
    assert not [w for w in caught if "Mismatch dtype" in str(w.message)]  # took the fused kernel
    assert 0 < relative_error(out, reference(x.float())) < BF16_TOLERANCE
    torch.testing.assert_close(norm(x.float()), reference(x.float()), rtol=0, atol=0)


def test_compiled_training_model_matches_eager():
    eager = deterministic_training_model()
    compiled = copy.deepcopy(eager)
    compile_for_training(compiled, [])
    x, t, y = inputs(eager, batch=4)
    v_eager, g_eager = velocity_and_gradients(eager, x, t, y, bf16=False)
    counters.clear()
    v_compiled, g_compiled = velocity_and_gradients(compiled, x, t, y, bf16=False)
    assert counters["stats"]["unique_graphs"] == 1  # regional: one graph, traced once, serves all 5 blocks
    assert relative_error(v_compiled, v_eager) < 1e-5
    assert relative_error(g_compiled, g_eager) < 1e-5
    v_fast, g_fast = velocity_and_gradients(compiled, x, t, y, bf16=True)
    assert relative_error(v_fast, v_eager) < BF16_TOLERANCE
    assert relative_error(g_fast, g_eager) < BF16_TOLERANCE
    assert list(compiled.state_dict()) == list(eager.state_dict())


def plain_attention(attention, x, cos, sin):
    """The attention of models/sit.py before its fast path: q, k and v split, each rotated on its own."""
    batch, tokens, dim = x.shape
    qkv = attention.qkv(x).view(batch, tokens, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = apply_rope(q, cos, sin).to(v.dtype), apply_rope(k, cos, sin).to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v)
    return attention.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("per_sample_tables", [False, True])
def test_fused_qk_rope_attention_matches_the_plain_path(qk_norm, per_sample_tables):
    torch.manual_seed(0)
    attention = Attention(32, 4, qk_norm=qk_norm)
    for p in attention.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cos, sin = rope_2d_tables(8, 4)  # 16 image tokens
    fast_tables = plain_tables = cos, sin
    if per_sample_tables:  # SPRINT's kept tokens: (N, tokens, 1, head_dim); the plain path's (N, 1, tokens, head_dim)
        keep = torch.stack([torch.randperm(16)[:10] for _ in range(3)])
        cos, sin = cos[keep], sin[keep]
        fast_tables, plain_tables = (cos.unsqueeze(2), sin.unsqueeze(2)), (cos.unsqueeze(1), sin.unsqueeze(1))
    x = torch.randn(3, cos.shape[-2], 32, requires_grad=True)
    fast = attention(x, *fast_tables)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, *attention.parameters()])
    plain = plain_attention(attention, x, *plain_tables)
    grads_plain = torch.autograd.grad(plain.square().sum(), [x, *attention.parameters()])
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_fast, grads_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_regional_compile_wraps_the_blocks_and_model_mode_the_whole_network():
    regional, whole = tiny_text_sit(), tiny_text_sit()
    compile_for_training(regional, [])
    compile_for_training(whole, [], mode="model")
    assert regional._compiled_call_impl is None
    assert all(block._compiled_call_impl is not None for block in regional.blocks)
    assert whole._compiled_call_impl is not None
    assert all(block._compiled_call_impl is None for block in whole.blocks)


def test_frozen_timm_encoder_is_compiled_where_it_is_called():
    from models.repa_encoders import build_repa_encoder

    regional, whole = (build_repa_encoder("dinov2-vit-s", resolution=64, depth=2) for _ in range(2))
    compile_for_training(tiny_text_sit(), [regional], mode="regional")
    compile_for_training(tiny_text_sit(), [whole], mode="model")
    assert all(block._compiled_call_impl is not None for block in regional.model.blocks)
    assert hasattr(whole.model.forward_features, "_torchdynamo_orig_callable")  # RepaEncoder calls forward_features


def test_repeated_blocks_are_the_longest_list_of_one_class():
    model = tiny_text_sit()
    assert repeated_blocks(model) == list(model.blocks)  # not the 2 projectors
    assert repeated_blocks(model.final_layer) == [model.final_layer]


def test_compile_cache_folder_is_set_for_the_process_unless_the_environment_names_one(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert use_compile_cache("none") is None and CACHE_ENV not in os.environ
    assert use_compile_cache(tmp_path / "cache") == str(tmp_path / "cache")
    assert os.environ[CACHE_ENV] == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert use_compile_cache(tmp_path / "other") == str(tmp_path / "cache")  # the environment's folder wins
    monkeypatch.delenv(CACHE_ENV)
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="--compile-cache .*file"):
        use_compile_cache(tmp_path / "file" / "cache")


def test_fp8_blocks_keep_the_checkpoint_keys_and_stay_close_to_float32():
    pytest.importorskip("torchao", reason="FP8 training is optional (pip install torchao)")
    from omegadit.fp8 import convert_blocks_to_float8

    reference = unit_gain_(deterministic_training_model())
    fp8 = copy.deepcopy(reference)
    assert convert_blocks_to_float8(fp8) == 2 * len(fp8.blocks)  # qkv and proj; SwiGLU widths are not x16 here
    assert list(fp8.state_dict()) == list(reference.state_dict())
    x, t, y = inputs(reference, batch=4)
    v32, _ = velocity_and_gradients(reference, x, t, y, bf16=False)
    g32 = torch.cat([p.grad.flatten() for p in reference.blocks.parameters()])
    v8, _ = velocity_and_gradients(fp8, x, t, y, bf16=False)
    g8 = torch.cat([p.grad.flatten() for p in fp8.blocks.parameters()])
    assert 1e-3 < relative_error(g8, g32) < 0.1  # FP8 really ran (e4m3 rounds to 2^-4), and stays close
    assert relative_error(v8, v32) < 0.1
