"""U-ViT: a ViT backbone for diffusion that treats every input as a token, with long skip connections.

Bao et al. 2023, "All are Worth Words: A ViT Backbone for Diffusion Models" (CVPR 2023, arXiv:2209.12152).
The time, the condition (a class label, or the projected CLIP tokens of a caption) and the image patches form
one token sequence with a learned position embedding. depth // 2 "in" blocks, one middle block and depth // 2
"out" blocks; out block i first fuses its input with the output of in block (depth // 2 - 1 - i) by a linear map
of their concatenation (the long skip). A LayerNorm and a linear layer map tokens back to patches; an optional
3x3 convolution follows (`conv`, U-ViT's pixel-space models). The network predicts the noise epsilon and is given
the discrete timestep n in 1..N (objective 'uvit-eps', omegadit/objectives/uvit.py).

Conditioning (exactly U-ViT's): class-conditional models carry one extra label row, index `num_classes`, for
the null label; text-to-image models take (N, text_len, text_dim) caption tokens. U-ViT's MS-COCO models use
the text encoder's embedding of the empty caption as the null context; it lives here in the buffer
`null_context`, saved with the weights, set with `set_null_context` (zeros until then), so that guidance and
caption dropout need no text encoder.

The state dict keeps U-ViT's own module names (patch_embed, in_blocks, mid_block, out_blocks, skip_linear,
decoder_pred, ...); `convert_uvit_state_dict` and `load_uvit_checkpoint` read its released checkpoints.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ARCHITECTURES, BACKBONES
from models.backbone import Backbone, register_sizes, unpatchify
from models.dit import Attention, Mlp
from omegadit.conditioners import DEFAULT_TEXT_LEN
from omegadit.weights_io import read_weights_file

HEAD_DIM = 64  # every released U-ViT (and every size of the paper's table 1) uses 64-wide heads
CLIP_TOKENS = DEFAULT_TEXT_LEN  # its MS-COCO models: 77 CLIP-L tokens


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps: cosines then sines of t * max_period^(-i / half) (ADM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class Block(nn.Module):
    """Pre-norm transformer block; with `skip`, it first maps [x, long skip] to the width by a linear layer."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, skip=False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _check_conditioning(num_classes, text_dim):
    if num_classes is not None and text_dim is not None:
        raise ValueError("U-ViT takes at most one of num_classes (class labels) and text_dim (caption tokens)")


@ARCHITECTURES.register("uvit")
class UViT(Backbone):
    """U-ViT: `model(x, t, y) -> (epsilon, {})`, t the discrete timestep (float, 1..N), y labels (N,), caption
    tokens (N, text_len, text_dim) or None (unconditional: neither num_classes nor text_dim set)."""

    architecture = "uvit"
    default_objective = "uvit-eps"
    # U-ViT's samplers: 50 DPM-Solver steps; its scale s = 0.4 (ImageNet 256) is our w = 1 + s.
    sampling_defaults = {"sampler": "dpm-solver", "num_steps": 50, "cfg_scale": 1.4}

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        qkv_bias=False,
        mlp_time_embed=False,
        conv=False,
        num_classes=None,
        text_dim=None,
        text_len=CLIP_TOKENS,
    ):
        super().__init__()
        _check_conditioning(num_classes, text_dim)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if depth % 2:
            raise ValueError(f"depth {depth} must be even: depth // 2 in blocks, a middle block, depth // 2 out blocks")
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, mlp_time_embed=mlp_time_embed,
            conv=conv, num_classes=num_classes, text_dim=text_dim, text_len=text_len,
        )
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.grid_size = input_size // patch_size
        self.num_classes = num_classes
        self.text_dim = text_dim
        self.num_extra = 1 + (1 if num_classes is not None else 0) + (text_len if text_dim is not None else 0)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.time_embed = self._time_embed(hidden_size, mlp_time_embed)
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + 1, hidden_size)
        if text_dim is not None:
            self.context_embed = nn.Linear(text_dim, hidden_size)
            self.register_buffer("null_context", torch.zeros(text_len, text_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_extra + self.grid_size**2, hidden_size))
        block = dict(dim=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias)
        self.in_blocks = nn.ModuleList(Block(**block) for _ in range(depth // 2))
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList(Block(**block, skip=True) for _ in range(depth // 2))
        self.norm = nn.LayerNorm(hidden_size)
        self.decoder_pred = nn.Linear(hidden_size, patch_size**2 * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if conv else None
        self.initialize_weights()

    @staticmethod
    def _time_embed(hidden_size, mlp):
        if not mlp:
            return nn.Identity()
        hidden = 4 * hidden_size
        return nn.Sequential(nn.Linear(hidden_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden_size))

    def initialize_weights(self):
        """U-ViT's initialisation: truncated normal (std 0.02) linears and position embedding, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    @property
    def conditioning(self):
        if self.text_dim is not None:
            return "text"
        return "class" if self.num_classes is not None else "none"

    def null_condition(self, batch_size, device=None):
        """The null label (N,) (index num_classes) or the null context (N, text_len, text_dim)."""
        if self.conditioning == "class":
            return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        if self.conditioning == "text":
            return self.null_context.to(device).expand(batch_size, -1, -1)
        return super().null_condition(batch_size, device)

    @torch.no_grad()
    def set_null_context(self, embedding: torch.Tensor):
        """Store the text encoder's embedding of the empty caption, (text_len, text_dim) or (1, ...), as the null
        context (U-ViT's MS-COCO models)."""
        if self.conditioning != "text":
            raise ValueError(f"a {self.conditioning}-conditioned U-ViT has no null context")
        embedding = embedding.reshape(-1, embedding.shape[-1]) if embedding.dim() == 3 else embedding
        if embedding.shape != self.null_context.shape:
            raise ValueError(f"null context must be {tuple(self.null_context.shape)}, got {tuple(embedding.shape)}")
        self.null_context.copy_(embedding)

    def compile_regions(self, regional=True):
        """Each block on its own (regional, or under gradient checkpointing), else the whole network."""
        if regional or self.gradient_checkpointing:
            return self.shard_units()
        return [self]

    def shard_units(self):
        """Each in, middle and out block."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def _extra_tokens(self, t, y, dtype):
        """The tokens before the patches: [label, time] for class models, [time, context] for text models."""
        time = self.time_embed(timestep_embedding(t, self.pos_embed.shape[-1]).to(dtype)).unsqueeze(1)
        if self.conditioning == "class":
            return [self.label_emb(y).unsqueeze(1).to(dtype), time]
        if self.conditioning == "text":
            return [time, self.context_embed(y.to(dtype))]
        return [time]

    def forward(self, x, t, y=None):
        """x (N, C, H, W) noisy input, t (N,) discrete timesteps, y the condition. Returns (epsilon, {})."""
        patches = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([*self._extra_tokens(t, y, patches.dtype), patches], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = self.run_block(block, x)
            skips.append(x)
        x = self.run_block(self.mid_block, x)
        for block in self.out_blocks:
            x = self.run_block(block, x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.num_extra:]
        x = unpatchify(x, self.patch_size, self.in_channels)
        if self.final_layer is not None:
            x = self.final_layer(x)
        return x, {}


# The paper's table 1: depth counts the in and out blocks (the middle block makes depth + 1 layers).
SIZES = {
    "S": dict(depth=12, hidden_size=512, num_heads=8),
    "M": dict(depth=16, hidden_size=768, num_heads=12),
    "L": dict(depth=20, hidden_size=1024, num_heads=16),
    "H": dict(depth=28, hidden_size=1152, num_heads=16),
}


UViT_models = register_sizes(BACKBONES, "U-ViT", UViT, SIZES, (2, 4))


# ------------------------------------------------------------------------------------------------------------------
# U-ViT's released checkpoints (nnet.pth / nnet_ema.pth: bare state dicts)
# ------------------------------------------------------------------------------------------------------------------

_PREFIXES = ("module.", "_orig_mod.", "model.", "nnet.")


def convert_uvit_state_dict(state_dict: dict) -> dict:
    """U-ViT's key layout -> ours: the module names are shared, so only wrapper prefixes ('module.', 'model.',
    ...) are stripped; the null context (text models) is not part of U-ViT's checkpoints."""
    converted = {}
    for key, value in state_dict.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        converted[key] = value
    return converted


def _require(state_dict, key):
    if key not in state_dict:
        raise ValueError(f"not a U-ViT state dict: expected key {key!r}, found keys {sorted(state_dict)[:8]} ...")
    return state_dict[key]


def uvit_config_from_state_dict(state_dict: dict, num_heads=None, text_len=CLIP_TOKENS) -> dict:
    """The UViT constructor config of a state dict in our layout, read from its shapes.

    Shapes do not fix the head count (default hidden_size / 64, as in every released model) nor, for text models,
    how the position embedding splits into caption tokens and patches (default: 77 CLIP tokens)."""
    hidden, in_channels, patch, _ = _require(state_dict, "patch_embed.proj.weight").shape
    depth_in = len({k.split(".")[1] for k in state_dict if k.startswith("in_blocks.")})
    depth_out = len({k.split(".")[1] for k in state_dict if k.startswith("out_blocks.")})
    if depth_in != depth_out:
        raise ValueError(f"U-ViT needs as many out blocks as in blocks: found {depth_in} in, {depth_out} out")
    num_classes = state_dict["label_emb.weight"].shape[0] - 1 if "label_emb.weight" in state_dict else None
    text_dim = state_dict["context_embed.weight"].shape[1] if "context_embed.weight" in state_dict else None
    extras = 1 + (num_classes is not None) + (text_len if text_dim is not None else 0)
    num_patches = _require(state_dict, "pos_embed").shape[1] - extras
    grid = math.isqrt(max(num_patches, 0))
    if num_patches < 1 or grid * grid != num_patches:
        raise ValueError(f"pos_embed has {num_patches + extras} tokens: expected {extras} extra tokens plus a square "
                         f"number of patches, found {num_patches} patches")
    return dict(
        input_size=grid * patch, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=2 * depth_in,
        num_heads=num_heads or hidden // HEAD_DIM,
        mlp_ratio=_require(state_dict, "in_blocks.0.mlp.fc1.weight").shape[0] / hidden,
        qkv_bias="in_blocks.0.attn.qkv.bias" in state_dict, mlp_time_embed="time_embed.0.weight" in state_dict,
        conv="final_layer.weight" in state_dict, num_classes=num_classes, text_dim=text_dim,
        text_len=text_len if text_dim is not None else CLIP_TOKENS,
    )


def check_size(config: dict, name: str):
    """Raise unless `config` has the depth, width and patch size of the registered model `name` ('U-ViT-H/2')."""
    expected = _size_fields(name)
    found = {key: config[key] for key in expected}
    if found != expected:
        raise ValueError(f"checkpoint is not a {name}: expected {expected}, found {found}")


def _size_fields(name: str) -> dict:
    if name not in UViT_models:
        raise ValueError(f"unknown U-ViT size {name!r}; known: {', '.join(UViT_models)}")
    size, patch = name[len("U-ViT-"):].split("/")
    return dict(patch_size=int(patch), depth=SIZES[size]["depth"], hidden_size=SIZES[size]["hidden_size"])


def load_uvit_checkpoint(path, num_heads=None, text_len=CLIP_TOKENS, name=None, null_context=None, use_ema=True):
    """A U-ViT checkpoint (its released ImageNet or MS-COCO nnet .pth, or ours) -> ('uvit', config, state dict in
    our layout). `name` ('U-ViT-H/2') makes a checkpoint of another size an error; `null_context` (text models:
    the empty caption's embedding) fills the null context, which stays zero otherwise."""
    state = convert_uvit_state_dict(read_weights_file(path, use_ema)[0])
    config = uvit_config_from_state_dict(state, num_heads=num_heads, text_len=text_len)
    if name is not None:
        check_size(config, name)
    if config["text_dim"] is not None:
        if null_context is not None:
            state["null_context"] = null_context.reshape(config["text_len"], config["text_dim"]).float()
        state.setdefault("null_context", torch.zeros(config["text_len"], config["text_dim"]))
    return UViT.architecture, config, state
