"""SiT with text (or class) conditioning and SPRINT dense-sparse fusion: the OmegaDiT denoiser.

Sequence layout: [caption tokens (text_len) | image tokens (grid**2)] share one attention in every block. Time
conditions every block through adaLN-Zero; a class label (class-conditional models) is added to the time embedding.
Blocks: RMSNorm, SwiGLU MLP, 2D RoPE on image tokens only, optional QK-norm.

SPRINT (Park et al. 2025, arXiv:2510.21986): the first DENSE_IN blocks see every token (dense encoder); the middle
blocks see the caption tokens and a random subset of the image tokens in training (`sprint_drop_ratio`); their output
is padded back with a mask token and fused with the dense encoder output by a linear projection; the last DENSE_OUT
blocks are dense again. Path drop replaces the whole sparse-path output by the mask token: with probability
`path_drop_prob` per training step, and on request (`uncond=True`) for the unconditional branch of guidance.

REPA (Yu et al. 2024): one projector MLP per target encoder maps the image tokens after the dense encoder to the
encoder's feature width.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from models import ARCHITECTURES, BACKBONES
from models.backbone import Backbone, init_adaln_zero, register_sizes, unpatchify
from models.pos_embed import apply_rope_paired, rope_2d_tables, sincos_2d
from omegadit.conditioners import DEFAULT_TEXT_LEN

DENSE_IN = 2
DENSE_OUT = 2


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in the input's dtype: under bf16 autocast it takes torch's fused kernel (a float32
    weight with bf16 activations falls back to the slower composite and warns)."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t (cosines then sines, GLIDE/DiT convention) followed by a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects caption tokens (N, text_len, text_dim) to the model width; a fixed null caption for CFG."""

    def __init__(self, text_dim, hidden_size, text_len):
        super().__init__()
        self.y_proj = nn.Module()
        self.y_proj.fc1 = nn.Linear(text_dim, hidden_size)
        self.y_proj.fc2 = nn.Linear(hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(text_len, text_dim) / text_dim**0.5)

    def null(self, batch_size):
        return self.y_embedding.expand(batch_size, -1, -1)

    def forward(self, caption):
        hidden = F.gelu(self.y_proj.fc1(caption), approximate="tanh")
        return self.y_proj.fc2(hidden)


class LabelEmbedder(nn.Module):
    """Class-label embedding table with one extra row, index `num_classes`, for the null class."""

    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def null(self, batch_size, device):
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)

    def forward(self, labels):
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention through torch SDPA, with RoPE tables given per call and optional QK RMSNorm."""

    def __init__(self, dim, num_heads, qk_norm=False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_norm = qk_norm
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope_cos, rope_sin):
        """x (N, tokens, dim); RoPE tables (tokens, head_dim) or (N, tokens, 1, head_dim), pairs of equal channels
        (`rope_2d_tables`). Everything stays in the projection's (N, tokens, heads, head_dim) order: queries and
        keys are rotated together in one pass, values are read in place, and SDPA gets transposed views, so its
        output reshapes to (N, tokens, dim) without a copy."""
        batch, tokens, dim = x.shape
        if rope_cos.dim() == 2:
            rope_cos, rope_sin = rope_cos.unsqueeze(1), rope_sin.unsqueeze(1)
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 1, 3, 4)
        qk = torch.stack([self.q_norm(qkv[0]), self.k_norm(qkv[1])]) if self.qk_norm else qkv[:2]
        q, k = apply_rope_paired(qk, rope_cos, rope_sin).to(qkv.dtype).unbind(0)
        x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), qkv[2].transpose(1, 2))
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020): w3(silu(a) * b) with [a, b] = w12(x)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero modulation from the conditioning vector c."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qk_norm=False):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        self.mlp = SwiGLU(hidden_size, int(2 / 3 * int(hidden_size * mlp_ratio)))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope_cos, rope_sin):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_cos, rope_sin)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """RMSNorm, adaLN modulation and a linear map from tokens to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_projector(hidden_size, projector_dim, z_dim):
    """REPA projector: 3-layer MLP with SiLU."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, projector_dim), nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


@ARCHITECTURES.register("sit")
class SiT(Backbone):
    """The OmegaDiT denoiser: `model(x, t, y, uncond=False) -> (velocity, {"repa": projector outputs})`.

    Exactly one of `text_dim` (caption tokens of that width, `text_len` of them) and `num_classes` must be set.
    Caption/label dropout for guidance is the conditioner's job (omegadit/conditioners.py); the null condition
    lives here, with the weights.
    """

    architecture = "sit"

    def __init__(
        self,
        input_size=16,
        patch_size=1,
        in_channels=32,
        hidden_size=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        text_dim=None,
        text_len=DEFAULT_TEXT_LEN,
        num_classes=None,
        z_dims=(768,),
        projector_dim=2048,
        qk_norm=False,
        sprint_drop_ratio=0.0,
        path_drop_prob=0.05,
    ):
        super().__init__()
        if (text_dim is None) == (num_classes is None):
            raise ValueError("SiT needs exactly one of text_dim (text conditioning) or num_classes (class labels)")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if depth < DENSE_IN + DENSE_OUT:
            raise ValueError(f"depth {depth} is below the {DENSE_IN + DENSE_OUT} dense blocks SPRINT needs")
        if not 0.0 <= sprint_drop_ratio < 1.0:
            raise ValueError(f"sprint_drop_ratio must lie in [0, 1), got {sprint_drop_ratio}")
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, text_dim=text_dim, text_len=text_len,
            num_classes=num_classes, z_dims=list(z_dims), projector_dim=projector_dim,
            qk_norm=qk_norm, sprint_drop_ratio=sprint_drop_ratio, path_drop_prob=path_drop_prob,
        )
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.text_len = text_len if text_dim is not None else 0
        self.sprint_drop_ratio = sprint_drop_ratio
        self.path_drop_prob = path_drop_prob
        self.z_dims = list(z_dims)
        self.path_drop_generator = torch.Generator().manual_seed(0)
        self._mask_token_used = False

        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if text_dim is not None:
            self.y_embedder = CaptionEmbedder(text_dim, hidden_size, text_len)
        else:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, self.grid_size)[None], requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.fusion_proj = nn.Linear(2 * hidden_size, hidden_size)
        self.projectors = nn.ModuleList(build_projector(hidden_size, projector_dim, z) for z in self.z_dims)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)

        cos, sin = rope_2d_tables(hidden_size // num_heads, self.grid_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    @classmethod
    def from_config(cls, config):
        """Rebuild from a recorded config; checkpoints written before the conditioners existed carry a cfg_prob
        (caption dropout), which is now the conditioner's and ignored here."""
        return cls(**{k: v for k, v in config.items() if k != "cfg_prob"})

    @property
    def is_text_conditioned(self):
        return isinstance(self.y_embedder, CaptionEmbedder)

    @property
    def conditioning(self):
        return "text" if self.is_text_conditioned else "class"

    def seed_training_rng(self, seed):
        self.path_drop_generator.manual_seed(seed)

    def training_rng_state(self):
        return {"path_drop_generator": self.path_drop_generator.get_state()}

    def load_training_rng_state(self, state):
        self.path_drop_generator.set_state(state["path_drop_generator"])

    def initialize_weights(self):
        """DiT's adaLN-Zero initialisation, with q, k and v initialised as three (dim, dim) Xavier layers as the
        original OmegaDiT has them."""
        init_adaln_zero(self)
        for block in self.blocks:
            for projection in block.attn.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(projection)

    def null_condition(self, batch_size, device=None):
        """The null caption embedding (N, text_len, text_dim) or the null class (N,) used for guidance."""
        if self.is_text_conditioned:
            return self.y_embedder.null(batch_size).to(device)
        return self.y_embedder.null(batch_size, device)

    def _rope_tables(self, image_ids=None):
        """Cos/sin tables over [caption | image] tokens: identity on captions, 2D RoPE on the (selected) image
        tokens."""
        cos, sin = self.rope_cos, self.rope_sin
        if image_ids is not None:
            cos, sin = cos[image_ids], sin[image_ids]
        if self.text_len:
            ones = cos.new_ones(*cos.shape[:-2], self.text_len, cos.shape[-1])
            cos = torch.cat([ones, cos], dim=-2)
            sin = torch.cat([torch.zeros_like(ones), sin], dim=-2)
        if image_ids is not None:  # per-sample tables, in the attention's (N, tokens, heads, head_dim) order
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        return cos, sin

    def _run_block(self, block, x, c, rope):
        return self.run_block(block, x, c, *rope)

    def _embed_condition(self, y, t_emb):
        """Returns (caption tokens or None, conditioning vector c)."""
        if self.is_text_conditioned:
            return self.y_embedder(y.to(t_emb.dtype)), t_emb
        return None, t_emb + self.y_embedder(y)

    def _path_drop_mask(self, uncond, batch, device):
        """Which samples get the mask token instead of the sparse path: a bool, an int k (samples k: onwards), or a
        (N,) bool tensor."""
        if isinstance(uncond, int) and not isinstance(uncond, bool):
            if not 0 <= uncond <= batch:
                raise ValueError(f"uncond={uncond} is no split point of a batch of {batch}")
            return uncond
        if isinstance(uncond, torch.Tensor):
            return uncond.to(device=device, dtype=torch.bool)
        if self.training and self.path_drop_prob > 0:
            return self._draw_path_drop()
        return bool(uncond)

    @torch.compiler.disable
    def _draw_path_drop(self):
        """One draw from the model's own CPU generator: the same on every rank (same seed), no device sync.
        Kept out of torch.compile graphs, which would otherwise break on the Python bool with a warning."""
        dropped = bool(torch.rand((), generator=self.path_drop_generator) < self.path_drop_prob)
        self._mask_token_used = self._mask_token_used or dropped
        return dropped

    def take_unused_parameters(self):
        """[mask_token] when no training forward since the last call used it (no path drop, no SPRINT token
        drop): its gradient is then an exact zero that must not move it through Adam's momentum, as it did not
        in the original (where it was outside the graph on such steps). Resets the record."""
        used = self._mask_token_used or self.sprint_drop_ratio > 0
        self._mask_token_used = False
        return [] if used else [self.mask_token]

    def forward(self, x, t, y, uncond=False):
        """x (N, C, H, W) noisy latents, t (N,) times in [0, 1], y captions (N, text_len, text_dim) or labels (N,).

        uncond: True, a per-sample (N,) bool tensor, or an int k (samples k: onwards; the sparse blocks then run on
        the first k samples only) replaces the sparse path by the mask token (path drop).
        Returns (velocity (N, C, H, W), {"repa": [projector output (N, image tokens, z_dim) for each z_dim]}).
        """
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        batch, num_image, dim = x.shape
        c = self.t_embedder(t)
        captions, c = self._embed_condition(y, c)
        if captions is not None:
            x = torch.cat([captions, x], dim=1)
        rope_full = self._rope_tables()

        for block in self.blocks[:DENSE_IN]:
            x = self._run_block(block, x, c, rope_full)
        dense = x
        image_tokens = dense[:, self.text_len:]
        zs = [projector(image_tokens) for projector in self.projectors]

        path_drop = self._path_drop_mask(uncond, batch, x.device)
        mask = self.mask_token.to(dense.dtype)
        if isinstance(path_drop, torch.Tensor):
            sparse = torch.where(path_drop.view(-1, 1, 1), mask, self._sparse_path(dense, c))
        elif isinstance(path_drop, int) and not isinstance(path_drop, bool):
            # [conditional | unconditional] batch of guidance: the sparse path only runs for the first part.
            tail = mask.expand(batch - path_drop, dense.shape[1], dim)
            sparse = torch.cat([self._sparse_path(dense[:path_drop], c[:path_drop]), tail.to(dense.dtype)])
        elif not self.training:
            sparse = mask.expand(batch, dense.shape[1], dim) if path_drop else self._sparse_path(dense, c)
        else:
            # Blend with a Python 0/1 rather than branching, so that every parameter (the mask token too) is in the
            # graph on every step, as DDP requires, and the decision needs no device sync.
            keep = 0.0 if path_drop else 1.0
            sparse = self._sparse_path(dense, c) * keep + mask * (1.0 - keep)
        x = self.fusion_proj(torch.cat([dense, sparse.to(dense.dtype)], dim=-1))

        for block in self.blocks[len(self.blocks) - DENSE_OUT:]:
            x = self._run_block(block, x, c, rope_full)
        out = self.final_layer(x[:, self.text_len:], c)
        return unpatchify(out, self.patch_size, self.in_channels), {"repa": zs}

    def _sparse_path(self, dense, c):
        """Middle blocks on the caption tokens and (in training) a random subset of image tokens, padded back."""
        middle = self.blocks[DENSE_IN:len(self.blocks) - DENSE_OUT]
        batch, _, dim = dense.shape
        num_keep = max(1, int(self.num_patches * (1.0 - self.sprint_drop_ratio)))
        if not (self.training and num_keep < self.num_patches):
            x, rope = dense, self._rope_tables()
            for block in middle:
                x = self._run_block(block, x, c, rope)
            return x
        keep = torch.rand(batch, self.num_patches, device=dense.device).argsort(dim=1)[:, :num_keep]
        image = dense[:, self.text_len:].gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([dense[:, :self.text_len], image], dim=1)
        rope = self._rope_tables(keep)
        for block in middle:
            x = self._run_block(block, x, c, rope)
        padded = self.mask_token.to(x.dtype).expand(batch, self.num_patches, dim).clone()
        padded = padded.scatter(1, keep.unsqueeze(-1).expand(-1, -1, dim), x[:, self.text_len:])
        return torch.cat([x[:, :self.text_len], padded], dim=1)


SIZES = {
    "T": dict(depth=6, hidden_size=256, num_heads=4),  # tiny: the CPU demo and tests
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


SiT_models = register_sizes(BACKBONES, "SiT", SiT, SIZES, (1, 2, 4))


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints of the original OmegaDiT train.py
# ------------------------------------------------------------------------------------------------------------------

REFERENCE_TEXT_LEN = DEFAULT_TEXT_LEN  # the original's CLIP-L caption length
_REFERENCE_IGNORED = ("path_type", "encoder_depth", "class_dropout_prob", "cls_token_dim", "fused_attn", "use_cfg",
                      "num_classes", "decoder_hidden_size")


def convert_reference_state_dict(state_dict):
    """Map an original OmegaDiT SiT state dict to ours: fuse q/k/v, drop `v1_lambda` and the RoPE tables."""
    prefixes = ("module.", "model.", "_orig_mod.")
    converted = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith("attn.v1_lambda") or key.startswith("feat_rope."):
            continue
        converted[key] = value
    for key in [k for k in converted if k.endswith(".attn.q.weight") or k.endswith(".attn.q.bias")]:
        base, kind = key.rsplit(".q.", 1)
        converted[f"{base}.qkv.{kind}"] = torch.cat([converted.pop(f"{base}.{n}.{kind}") for n in "qkv"], dim=0)
    return converted


def from_reference(state_dict, **reference_kwargs):
    """Build our SiT, in eval mode, from a state dict saved by the original OmegaDiT train.py.

    `reference_kwargs` are the keyword arguments the original `SiT(...)` constructor took (input_size, patch_size,
    in_channels, hidden_size, depth, num_heads, mlp_ratio, z_dims, projector_dim, ...). The original model is always
    text-conditioned with 77 caption tokens; their width is read from the state dict.
    """
    kwargs = dict(reference_kwargs)
    hidden = kwargs.get("hidden_size", 1152)
    decoder_hidden = kwargs.get("decoder_hidden_size", hidden)
    if decoder_hidden != hidden:
        raise ValueError(f"decoder_hidden_size {decoder_hidden} != hidden_size {hidden}: the original model cannot run")
    for key in _REFERENCE_IGNORED:
        kwargs.pop(key, None)
    converted = convert_reference_state_dict(state_dict)
    text_dim = converted["y_embedder.y_embedding"].shape[1]
    model = SiT(text_dim=text_dim, text_len=REFERENCE_TEXT_LEN, **kwargs)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"reference state dict does not match the config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_reference_checkpoint(path, use_ema=False, **reference_kwargs):
    """(our SiT, the saved training args as a dict) from a checkpoint of the original train.py
    (`{'model': ..., 'ema': ..., 'args': Namespace}`), read once and without running code.

    The architecture comes from `reference_kwargs` or, when absent, from the checkpoint's saved `args.model`.
    """
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    key = "ema" if use_ema and "ema" in ckpt else "model"
    if key not in ckpt:
        raise ValueError(f"{path} has no '{key}' entry; keys are {sorted(ckpt)}")
    if not reference_kwargs:
        reference_kwargs = reference_kwargs_from_args(ckpt.get("args"), ckpt[key])
    args = vars(ckpt["args"]) if ckpt.get("args") is not None else {}
    return from_reference(ckpt[key], **reference_kwargs), args


def reference_kwargs_from_args(args, state_dict):
    """Constructor kwargs for a reference checkpoint from its saved training args (model name, resolution)."""
    if args is None or not hasattr(args, "model"):
        raise ValueError("the checkpoint carries no training args; pass the SiT constructor kwargs explicitly")
    size, patch = args.model.split("-")[1].split("/")
    converted = convert_reference_state_dict(state_dict)
    in_channels = converted["x_embedder.proj.weight"].shape[1]
    num_patches = converted["pos_embed"].shape[1]
    z_dims = [converted[f"projectors.{i}.4.weight"].shape[0]
              for i in range(len([k for k in converted if k.endswith(".4.weight") and k.startswith("projectors.")]))]
    return dict(input_size=int(math.isqrt(num_patches)) * int(patch), patch_size=int(patch), in_channels=in_channels,
                z_dims=z_dims, projector_dim=getattr(args, "projector_dim", 2048), **SIZES[size])
