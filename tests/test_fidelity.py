"""Differences from the original OmegaDiT that were fixed in the model and the trainer: q/k/v initialisation,
the mask token on steps without path drop, and the EMA warm-up."""
import math

import torch

from models.sit import SiT_models
from test_sit import inputs, tiny_text_sit
from utils import ema_decay_at


def test_qkv_initialised_as_three_separate_xavier_layers():
    model = SiT_models["SiT-T/2"](input_size=8, in_channels=4, text_dim=16, text_len=3, z_dims=[])
    dim = model.config["hidden_size"]
    for block in model.blocks:
        for projection in block.attn.qkv.weight.chunk(3, dim=0):
            bound = math.sqrt(6 / (dim + dim))  # xavier_uniform of a (dim, dim) layer
            assert projection.abs().max() <= bound
            assert abs(projection.std().item() / (bound / math.sqrt(3)) - 1) < 0.03


def adam_steps(model, optimizer, num_steps):
    x, t, y = inputs(model, batch=2)
    for _ in range(num_steps):
        out, _ = model(x, t, y)
        out.square().mean().backward()
        for parameter in model.take_unused_parameters():
            parameter.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_mask_token_untouched_by_steps_without_path_drop():
    model = tiny_text_sit(path_drop_prob=1.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.mask_token.detach().clone()
    adam_steps(model, optimizer, 1)
    after_drop = model.mask_token.detach().clone()
    assert not torch.equal(before, after_drop)  # used, so trained
    model.path_drop_prob = 0.0
    adam_steps(model, optimizer, 3)
    assert torch.equal(model.mask_token, after_drop)  # Adam's momentum alone must not move it
    model.sprint_drop_ratio = 0.5  # SPRINT token drop pads with the mask token: it is used again
    adam_steps(model, optimizer, 1)
    assert not torch.equal(model.mask_token, after_drop)


def test_ema_warmup_decay():
    assert ema_decay_at(0, 0.9999, warmup=True) == 0.1
    assert ema_decay_at(90, 0.9999, warmup=True) == 0.91
    assert ema_decay_at(10 ** 7, 0.9999, warmup=True) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999


def test_split_point_path_drop_equals_per_sample_mask():
    """Guidance with path drop calls the SiT with uncond=k: the same outputs as the per-sample mask, while the
    sparse blocks run on the conditional samples only."""
    model = tiny_text_sit(path_drop_prob=0.0).eval()
    x, t, y = inputs(model, batch=4)
    mask = torch.tensor([False, False, True, True])
    calls = []
    hook = model.blocks[2].register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    with torch.no_grad():
        split, _ = model(x, t, y, uncond=2)
        assert calls == [2]
        per_sample, _ = model(x, t, y, uncond=mask)
    hook.remove()
    torch.testing.assert_close(split, per_sample, rtol=1e-5, atol=1e-6)
