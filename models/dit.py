"""DiT: the class-conditional diffusion transformer of Peebles & Xie, "Scalable Diffusion Models with
Transformers" (ICCV 2023, arXiv:2212.09748), and the import of its released and train.py checkpoints.

Architecture (paper sec. 3.2): patchify + fixed 2D sin-cos position embedding; blocks of LayerNorm (no affine,
eps 1e-6) with adaLN-Zero modulation from c = timestep embedding + class embedding; multi-head self-attention and a
GELU(tanh) MLP; a final adaLN layer and linear map to patches. With `learn_sigma` the output has twice the input
channels: the noise prediction, then the interpolation values of the learned-range variance (Nichol & Dhariwal
2021). Class labels have one extra embedding row, index `num_classes`, for the null class of guidance. The network
takes the discrete diffusion timestep (0..999) as a float tensor; see omegadit/objectives/gaussian.py.

The module keeps DiT's parameter names, so converting a DiT state dict only strips wrapper prefixes and checks it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ARCHITECTURES, BACKBONES
from models.backbone import ClassLabelTransformer, register_sizes, unpatchify
from omegadit.weights_io import read_weights_file, strip_wrapper_prefixes
from models.pos_embed import sincos_2d
from models.sit import LabelEmbedder, TimestepEmbedder, modulate

SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
SD_VAE_SCALE = 0.18215


def dit_latent_stats(channels: int = 4):
    """(mean, std), each (channels, 1, 1), that turn raw SD-VAE latents into what DiT was trained on.

    DiT trains on `vae.encode(x).latent_dist.sample() * 0.18215`; our datasets feed (raw - mean) / std, so an
    imported DiT checkpoint needs mean 0 and std 1 / 0.18215 (and decoding multiplies back by that std).
    """
    return torch.zeros(channels, 1, 1), torch.full((channels, 1, 1), 1.0 / SD_VAE_SCALE)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, through torch SDPA (U-ViT leaves the qkv bias out)."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1, GELU (DiT: tanh approximation; U-ViT: exact), fc2."""

    def __init__(self, dim, hidden, approximate="tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = approximate

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def layer_norm(dim):
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: shift, scale and gate of both sublayers regressed from c."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = layer_norm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = layer_norm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm, adaLN shift and scale, linear map from tokens to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@ARCHITECTURES.register("dit")
class DiT(ClassLabelTransformer):
    """`model(x, t, y) -> (output, {})`: x (N, C, H, W) noisy latents, t (N,) diffusion timesteps 0..999 (float),
    y (N,) class labels (index `num_classes` is the null class). The output has 2C channels with `learn_sigma`
    (noise prediction, then variance values in [-1, 1] nominally), else C."""

    architecture = "dit"
    default_objective = "gaussian"
    # DiT's sample.py: 250 DDPM steps; guidance on the first three channels (the FID-best scale of the paper is 1.5).
    sampling_defaults = {"sampler": "ddpm", "num_steps": 250, "cfg_scale": 1.5, "guidance_channels": 3}

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, learn_sigma=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, learn_sigma=learn_sigma)
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, self.grid_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def forward(self, x, t, y):
        """Returns (output (N, out_channels, H, W), {})."""
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = self.run_block(block, x, c)
        return unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels), {}


DiT_models = register_sizes(BACKBONES, "DiT", DiT, SIZES, PATCH_SIZES)


# ------------------------------------------------------------------------------------------------------------------
# DiT checkpoints: released weights (a bare state dict) and DiT train.py checkpoints ({'model', 'ema', 'opt', 'args'})
# ------------------------------------------------------------------------------------------------------------------

def dit_model_name(config):
    """'DiT-XL/2' etc. for a config of one of the DiT sizes, else None."""
    for size, dims in SIZES.items():
        if all(config[key] == value for key, value in dims.items()):
            return f"DiT-{size}/{config['patch_size']}"
    return None


def _require(state_dict, key):
    if key not in state_dict:
        raise ValueError(f"not a DiT state dict: expected key {key!r}, found keys {sorted(state_dict)[:8]}...")
    return state_dict[key]


def _num_heads(hidden_size, depth, num_heads):
    """The head count of a DiT size (shapes do not show it), or `num_heads` when given."""
    if num_heads is not None:
        return num_heads
    for dims in SIZES.values():
        if (dims["hidden_size"], dims["depth"]) == (hidden_size, depth):
            return dims["num_heads"]
    known = ", ".join(f"{n} (depth {d['depth']}, width {d['hidden_size']})" for n, d in SIZES.items())
    raise ValueError(f"a DiT of depth {depth} and width {hidden_size} is none of the DiT sizes ({known}); "
                     f"pass num_heads")


def infer_dit_config(state_dict, num_heads=None):
    """DiT constructor kwargs read off the tensor shapes of a DiT state dict. The head count is that of the
    matching DiT size (S, B, L, XL); other widths and depths need `num_heads`."""
    state_dict = strip_wrapper_prefixes(state_dict)
    hidden, in_channels, patch, _ = _require(state_dict, "x_embedder.proj.weight").shape
    depth = len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})
    tokens = _require(state_dict, "pos_embed").shape[1]
    out_channels = _require(state_dict, "final_layer.linear.weight").shape[0] // patch ** 2
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer gives {out_channels} channels per pixel for {in_channels} input channels; "
                         f"expected {in_channels} or {2 * in_channels} (learned sigma)")
    mlp_hidden = _require(state_dict, "blocks.0.mlp.fc1.weight").shape[0]
    return dict(input_size=math.isqrt(tokens) * patch, patch_size=patch, in_channels=in_channels,
                hidden_size=hidden, depth=depth, num_heads=_num_heads(hidden, depth, num_heads),
                mlp_ratio=mlp_hidden / hidden,
                num_classes=_require(state_dict, "y_embedder.embedding_table.weight").shape[0] - 1,
                learn_sigma=out_channels == 2 * in_channels)


def convert_dit_state_dict(state_dict, config):
    """A DiT state dict in our layout for a DiT built from `config`: wrapper prefixes stripped, then every key and
    shape checked against the model; a mismatch raises a ValueError naming the expected and found entries."""
    state_dict = strip_wrapper_prefixes(state_dict)
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in DiT(**config).state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state_dict.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k}: expected {expected[k]}, found {found[k]}" for k in sorted(set(expected) & set(found))
             if expected[k] != found[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"DiT state dict does not match {config}: missing keys {missing}, unexpected keys "
                         f"{unexpected}, wrong shapes {wrong}")
    return state_dict


def read_dit_checkpoint(path, use_ema=True, expected=None, num_heads=None):
    """(architecture 'dit', config, state dict in our layout) of a DiT checkpoint file.

    Reads the released DiT-XL-2-256x256.pt / DiT-XL-2-512x512.pt (bare state dicts), DiT train.py checkpoints
    (the EMA weights unless `use_ema` is False) and .safetensors; the config comes from the tensor shapes
    (`num_heads` for widths and depths that are no DiT size). `expected`: the model name ('DiT-XL/2') the
    checkpoint must hold, else a ValueError naming both.
    """
    state_dict, _ = read_weights_file(path, use_ema)
    config = infer_dit_config(state_dict, num_heads)
    name = dit_model_name(config)
    if expected is not None and expected != name:
        raise ValueError(f"{path} holds a {name or 'DiT of no standard size'} ({config}), expected a {expected}")
    return DiT.architecture, config, convert_dit_state_dict(state_dict, config)


def dit_from_state_dict(state_dict, config):
    """A DiT built from `config` with a DiT-layout state dict loaded (its tensors taken as they are), in eval
    mode."""
    return _loaded(config, convert_dit_state_dict(state_dict, config))


def _loaded(config, state_dict):
    with torch.device("meta"):
        model = DiT(**config)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def load_dit_checkpoint(path, use_ema=True, expected=None, num_heads=None):
    """The DiT of a checkpoint file (see `read_dit_checkpoint`), weights loaded, in eval mode."""
    _, config, state_dict = read_dit_checkpoint(path, use_ema, expected, num_heads)
    return _loaded(config, state_dict)
