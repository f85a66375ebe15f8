"""LightningDiT: the class-conditional diffusion transformer of Yao, Yang & Wang, "Reconstruction vs. Generation:
Taming Optimization Dilemma in Latent Diffusion Models" (CVPR 2025, arXiv:2501.01423), trained on VA-VAE latents.

A DiT (Peebles & Xie 2023) with RMSNorm, a SwiGLU MLP (hidden width 2/3 of mlp_ratio * width), 2D RoPE (EVA-02
layout) in every attention, optional QK RMSNorm, a fixed 2D sin-cos position embedding, and adaLN-Zero modulation
from time + class embedding; `wo_shift` drops the shift terms of the blocks' modulation. The network takes
LightningDiT's own time (0 = noise, 1 = data; see omegadit/objectives/lightningdit.py) and predicts its velocity
(data - noise). With `learn_sigma` the output layer has twice the channels, of which only the first half is
returned (flow matching has no variance to learn; the option exists so that such checkpoints load).

The module names match LightningDiT's state dict, so its checkpoints load after dropping the fixed position and
RoPE tables (`convert_lightningdit_state_dict`, `load_lightningdit_checkpoint`).
"""
import math
from pathlib import Path

import torch
import torch.nn as nn
from models import ARCHITECTURES, BACKBONES
from models.backbone import ClassLabelTransformer, register_sizes, unpatchify
from omegadit.weights_io import read_weights_file, strip_wrapper_prefixes
from models.pos_embed import rope_2d_tables, sincos_2d
from models.sit import Attention, FinalLayer, LabelEmbedder, RMSNorm, SwiGLU, TimestepEmbedder

SIZES = {
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (1, 2)
FIXED_TABLES = ("pos_embed", "feat_rope.freqs_cos", "feat_rope.freqs_sin")


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU hidden width: 2/3 of the plain MLP's int(hidden_size * mlp_ratio), rounded down."""
    return int(2 * int(hidden_size * mlp_ratio) / 3)


def modulate(x, shift, scale):
    """x (1 + scale) + shift with per-sample (N, D) scale and shift; no shift when `shift` is None."""
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class LightningDiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero: 6 modulation vectors, or 4 (scales and gates) with wo_shift."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False, wo_shift=False):
        super().__init__()
        self.wo_shift = wo_shift
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        self.mlp = SwiGLU(hidden_size, swiglu_hidden(hidden_size, mlp_ratio))
        chunks = 4 if wo_shift else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size))

    def modulation(self, c):
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) from c; shifts are None with wo_shift."""
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            return None, scale_msa, gate_msa, None, scale_mlp, gate_mlp
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x, c, rope_cos, rope_sin):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_cos, rope_sin)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@ARCHITECTURES.register("lightningdit")
class LightningDiT(ClassLabelTransformer):
    """LightningDiT: `model(x, t, y) -> (velocity data - noise, {})` with t LightningDiT's time (1 = data) and
    y class labels in [0, num_classes]; index num_classes is the null class of classifier-free guidance."""

    architecture = "lightningdit"
    default_objective = "lightningdit-flow"
    # Its inference.py (ImageNet 256, XL/1): 250 grid points, guidance 6.7 on 3 channels where its s >= 0.125.
    sampling_defaults = {"sampler": "euler", "num_steps": 249, "cfg_scale": 6.7, "guidance_low": 0.0,
                         "guidance_high": 0.875, "guidance_channels": 3}

    def __init__(self, input_size=16, patch_size=1, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, qk_norm=False, wo_shift=False, learn_sigma=False):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, qk_norm=qk_norm, wo_shift=wo_shift, learn_sigma=learn_sigma)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size

        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, self.grid_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(LightningDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, wo_shift)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        cos, sin = rope_2d_tables(hidden_size // num_heads, self.grid_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def forward(self, x, t, y):
        """x (N, C, H, W) noisy latents, t (N,) LightningDiT times in [0, 1] (1 = data), y (N,) class labels.
        Returns (velocity (N, C, H, W), {})."""
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = self.run_block(block, x, c, self.rope_cos, self.rope_sin)
        out = unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)
        return out[:, :self.in_channels], {}


LightningDiT_models = register_sizes(BACKBONES, "LightningDiT", LightningDiT, SIZES, PATCH_SIZES)


# ------------------------------------------------------------------------------------------------------------------
# LightningDiT's checkpoints
# ------------------------------------------------------------------------------------------------------------------

def infer_config(state_dict: dict) -> dict:
    """Constructor kwargs of the LightningDiT that wrote `state_dict` (its key layout), read from tensor shapes.

    The head count is read from the RoPE tables, whose width is the head dimension.
    """
    _require_supported_layout(state_dict)
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    num_tokens = state_dict["pos_embed"].shape[1]
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    if out_features not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
        raise ValueError(f"final_layer.linear has {out_features} outputs; expected {patch * patch * in_channels} "
                         f"(or twice that with learn_sigma) for patch size {patch} and {in_channels} channels")
    swiglu = state_dict["blocks.0.mlp.w3.weight"].shape[1]
    mlp_ratio = _mlp_ratio(hidden, swiglu)
    head_dim = state_dict["feat_rope.freqs_cos"].shape[1]
    if math.isqrt(num_tokens) ** 2 != num_tokens:
        raise ValueError(f"pos_embed must hold a square grid of tokens, found {num_tokens}")
    return dict(
        input_size=math.isqrt(num_tokens) * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden,
        depth=depth, num_heads=hidden // head_dim, mlp_ratio=mlp_ratio,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        qk_norm="blocks.0.attn.q_norm.weight" in state_dict,
        wo_shift=state_dict["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * hidden,
        learn_sigma=out_features == 2 * patch * patch * in_channels,
    )


def _require_supported_layout(state_dict):
    """Raise unless the weights come from a LightningDiT with RMSNorm, SwiGLU, RoPE and class labels."""
    needed = {"x_embedder.proj.weight": "the patch embedding", "pos_embed": "the position embedding",
              "final_layer.linear.weight": "the output layer", "y_embedder.embedding_table.weight": "class labels",
              "blocks.0.mlp.w3.weight": "use_swiglu=True", "blocks.0.norm1.weight": "use_rmsnorm=True",
              "feat_rope.freqs_cos": "use_rope=True"}
    missing = [f"{key} ({why})" for key, why in needed.items() if key not in state_dict]
    if missing:
        found = ", ".join(sorted(state_dict)[:8])
        raise ValueError(f"not a supported LightningDiT state dict: missing {', '.join(missing)}; found {found}, ...")


def _mlp_ratio(hidden, swiglu):
    """The mlp_ratio among the usual ones whose SwiGLU width is `swiglu`."""
    for ratio in (4.0, 2.0, 8.0, 3.0, 6.0):
        if swiglu_hidden(hidden, ratio) == swiglu:
            return ratio
    raise ValueError(f"SwiGLU width {swiglu} for hidden size {hidden} matches no mlp_ratio in (2, 3, 4, 6, 8)")


def convert_lightningdit_state_dict(state_dict: dict, config: dict) -> dict:
    """LightningDiT's state dict in our layout: wrapper prefixes stripped, its RoPE tables dropped after checking
    that they equal ours (the position embedding is kept: it is part of our state dict too)."""
    state = strip_wrapper_prefixes(state_dict)
    grid = config["input_size"] // config["patch_size"]
    ours = dict(zip(FIXED_TABLES, (sincos_2d(config["hidden_size"], grid)[None],
                                   *rope_2d_tables(config["hidden_size"] // config["num_heads"], grid))))
    for key, table in ours.items():
        if key in state and not torch.allclose(state[key].float(), table, atol=1e-4):
            raise ValueError(f"{key} differs from the fixed table this implementation computes: "
                             f"not a LightningDiT checkpoint of the inferred config {config}")
    return {k: v for k, v in state.items() if not k.startswith("feat_rope.")}


def from_lightningdit(state_dict: dict, expected: dict = None):
    """(architecture, config, state dict in our layout) of LightningDiT weights in its key layout.

    `expected`: constructor kwargs the weights must match (e.g. those of 'LightningDiT-XL/1'); a mismatch is a
    ValueError naming the expected and the found values.
    """
    state = strip_wrapper_prefixes(state_dict)
    config = infer_config(state)
    if expected:
        wrong = {k: (v, config.get(k)) for k, v in expected.items() if config.get(k) != v}
        if wrong:
            details = "; ".join(f"{k}: expected {v}, found {f}" for k, (v, f) in wrong.items())
            raise ValueError(f"LightningDiT checkpoint does not match the requested model: {details}")
    converted = convert_lightningdit_state_dict(state, config)
    check_state_dict(converted, config)
    return LightningDiT.architecture, config, converted


def check_state_dict(state_dict: dict, config: dict):
    """Raise a ValueError naming every missing, unexpected or misshapen key of `state_dict` for a LightningDiT built
    with `config` (built on the meta device: no memory, no initialisation)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LightningDiT(**config).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: expected shape {expected[k]}, found {found[k]}"
                 for k in expected if k in found and expected[k] != found[k]]
    if problems:
        raise ValueError(f"LightningDiT state dict does not fit the config {config}: {'; '.join(problems[:10])}")


def load_lightningdit_checkpoint(path, model_name: str = None, use_ema: bool = True):
    """(architecture, config, state dict in our layout) of a LightningDiT checkpoint file (see `omegadit.weights_io.read_weights_file`).

    `model_name` (e.g. 'LightningDiT-XL/1') checks the weights against that size and patch size; the rest of the
    config (input size, channels, classes, qk_norm, wo_shift, learn_sigma) is read from the weights.
    """
    expected = None
    if model_name is not None:
        if model_name not in LightningDiT_models:
            raise ValueError(f"unknown LightningDiT model {model_name!r}; known: {', '.join(LightningDiT_models)}")
        size, patch = model_name.split("-", 1)[1].split("/")
        expected = dict(patch_size=int(patch), **SIZES[size])
    return from_lightningdit(read_weights_file(path, use_ema)[0], expected)


def build_from_checkpoint(path, model_name: str = None, use_ema: bool = True) -> LightningDiT:
    """A LightningDiT in eval mode with the weights of a LightningDiT checkpoint file."""
    _, config, state = load_lightningdit_checkpoint(path, model_name, use_ema)
    model = LightningDiT(**config)
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------------
# LightningDiT's latent statistics
# ------------------------------------------------------------------------------------------------------------------

def latent_normalisation(stats_path=None, latent_multiplier: float = 1.0):
    """Our (mean, std), each (C, 1, 1) float32, equivalent to LightningDiT's latent normalisation.

    LightningDiT feeds the network (z - mean) / std * latent_multiplier with per-channel mean and std from its
    latents_stats.pt ({'mean', 'std'} of shape (1, C, 1, 1); .pt read with weights_only=True, or .safetensors),
    and z * latent_multiplier when latent_norm is off (stats_path None). Ours is (z - mean) / std, so mean is
    its mean (or 0) and std is its std / latent_multiplier (or 1 / latent_multiplier).
    """
    if latent_multiplier <= 0:
        raise ValueError(f"latent_multiplier must be positive, got {latent_multiplier}")
    if stats_path is None:
        return torch.zeros(1, 1, 1), torch.full((1, 1, 1), 1.0 / latent_multiplier)
    stats = _read_stats(Path(stats_path))
    missing = [k for k in ("mean", "std") if k not in stats]
    if missing:
        raise ValueError(f"{stats_path}: expected 'mean' and 'std' entries, missing {missing}; found {sorted(stats)}")
    mean, std = (stats[k].detach().float().reshape(-1, 1, 1) for k in ("mean", "std"))
    if mean.shape != std.shape:
        raise ValueError(f"{stats_path}: mean has {mean.shape[0]} channels but std has {std.shape[0]}")
    return mean, std / latent_multiplier


def _read_stats(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    stats = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected a dict with 'mean' and 'std', got {type(stats).__name__}")
    return stats
