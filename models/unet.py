"""U-Net backbones built from diffusers' UNet2DModel and UNet2DConditionModel: DDPM in pixel space and the
class-conditional latent diffusion model (LDM).

- `UNetDDPM` ('unet-ddpm'): Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239), as a
  diffusers UNet2DModel with DDPM's choices: residual blocks with GroupNorm (eps 1e-6), two per level, one
  self-attention head over all channels at the 16x16 level and in the middle, the sin-then-cos timestep
  embedding with log(10000) / (half - 1) frequencies (`freq_shift` 1, no flip), dropout. Unconditional
  (num_classes 0) or class-conditional through UNet2DModel's class embedding (added to the time embedding), with
  num_classes + 1 rows: the last one is the null class of classifier-free guidance.
- `UNetLDM` ('unet-ldm'): Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"
  (arXiv:2112.10752), as a diffusers UNet2DConditionModel. LDM's ImageNet model (its cin256 config) conditions
  on the class through cross-attention to one learned class token (its ClassEmbedder: an embedding table, the
  null class of guidance one extra row); this module does the same, `class_tokens` giving the (N, 1, D)
  context. Adding the class embedding to the time embedding (UNet2DModel) would be simpler still but is not
  LDM's architecture, and it is what UNetDDPM already offers in latent space. With num_classes 0 the context is
  the one (learned) null token: an unconditional LDM of the same architecture.

Both predict the noise epsilon with a fixed variance (objective 'gaussian' with `objective_defaults`; with
`learn_sigma` a UNetDDPM outputs 2C channels for the learned-range variance instead) and take the discrete
timestep 0..999 as a float. The config records input size, channels, classes and `unet`: the architecture
arguments of the diffusers model (JSON-serialisable), so that a checkpoint rebuilds the network even if the
registered sizes below change.

Registered sizes (BACKBONES; `attention_levels` index the resolution levels, 0 = full size, so a size works at
any input size divisible by 2^(levels - 1); the name gives the resolution it was designed for):
  UNet-DDPM-32    DDPM's CIFAR-10 network: 128 channels x (1, 2, 2, 2), attention at 16x16, dropout 0.1 (35.7M)
  UNet-DDPM-64    the same channel multipliers at 64x64, attention at 16x16 (level 2), dropout 0.1
  UNet-DDPM-256   DDPM's CelebA-HQ / LSUN network: 128 x (1, 1, 2, 2, 4, 4), attention at 16x16
  UNet-Tiny       32 x (1, 2), for CPU tests and demos
  UNet-LDM        after LDM's cin256 config: 192 x (1, 2, 3, 5), 2 blocks per level, cross-attention (32-channel
                  heads, one transformer layer) at the levels downsampled 2, 4, 8, a 512-d class token (~400M)
  UNet-LDM-S      128 x (1, 2, 2), cross-attention at the levels downsampled 2 and 4, a 256-d class token
                  (40M; not one of LDM's: the one-GPU demo preset's)
  UNet-LDM-Tiny   32 x (1, 2), a 32-d class token, for CPU tests
"""
import torch
import torch.nn as nn

from models import ARCHITECTURES, BACKBONES
from models.backbone import Backbone


def _levels(block_out_channels, attention_levels):
    levels = len(block_out_channels)
    bad = [level for level in attention_levels if not 0 <= level < levels]
    if bad:
        raise ValueError(f"attention levels {bad} do not exist in a U-Net of {levels} levels")
    return levels


def ddpm_unet_config(block_out_channels, attention_levels, layers_per_block=2, dropout=0.1, norm_num_groups=32):
    """UNet2DModel architecture arguments of a DDPM U-Net (see the module docstring)."""
    levels = _levels(block_out_channels, attention_levels)
    attention = [level in attention_levels for level in range(levels)]
    return dict(
        block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        mid_block_type="UNetMidBlock2D", add_attention=True, attention_head_dim=None, dropout=dropout,
        norm_num_groups=norm_num_groups, norm_eps=1e-6, act_fn="silu", time_embedding_type="positional",
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, resnet_time_scale_shift="default",
    )


def ldm_unet_config(block_out_channels, attention_levels, layers_per_block=2, head_channels=32, context_dim=512,
                    transformer_layers=1, norm_num_groups=32):
    """UNet2DConditionModel architecture arguments of an LDM U-Net (see the module docstring). diffusers'
    `attention_head_dim` of this model is the number of heads per level: channels / head_channels."""
    levels = _levels(block_out_channels, attention_levels)
    attention = [level in attention_levels for level in range(levels)]
    bad = [c for c in block_out_channels if c % head_channels]
    if bad:
        raise ValueError(f"channels {bad} are not divisible by {head_channels}-channel attention heads")
    return dict(
        block_out_channels=list(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=context_dim,
        attention_head_dim=[c // head_channels for c in block_out_channels],
        transformer_layers_per_block=transformer_layers, norm_num_groups=norm_num_groups, norm_eps=1e-5,
        act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, use_linear_projection=False,
        dropout=0.0,
    )


class DiffusersUNet(Backbone):
    """What the two U-Nets share: `self.unet` (a diffusers model), class labels with a null row at index
    `num_classes` (conditioning 'none' when num_classes is 0), the input-size check, gradient checkpointing and
    compile regions."""

    default_objective = "gaussian"
    default_sampling: dict = {}

    def _setup(self, input_size, in_channels, num_classes, unet, levels):
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        factor = 2 ** (levels - 1)
        if input_size % factor:
            raise ValueError(f"a U-Net of {levels} levels halves its input {levels - 1} times: the input size "
                             f"{input_size} is not divisible by {factor}")
        self.num_classes = num_classes
        self.config = dict(input_size=input_size, in_channels=in_channels, num_classes=num_classes, unet=dict(unet))

    @property
    def conditioning(self):
        return "class" if self.num_classes else "none"

    @property
    def sampling_defaults(self):
        return {**self.default_sampling, "cfg_scale": self.default_sampling["cfg_scale"] if self.num_classes else 1.0}

    def null_condition(self, batch_size, device=None):
        """The null class label (N,): index num_classes (0 for an unconditional model: the dummy label)."""
        return torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)

    def set_gradient_checkpointing(self, enabled: bool = True):
        """diffusers' own activation checkpointing of the U-Net's resnet and attention blocks."""
        super().set_gradient_checkpointing(enabled)
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def compile_regions(self, regional: bool = True) -> list:
        """The down, middle and up blocks one by one under gradient checkpointing, else the whole network, also when
        `regional`: the U-Net's blocks all differ, so compiling them one by one would share no graph."""
        if self.gradient_checkpointing:
            return self.shard_units()
        return [self]

    def shard_units(self) -> list:
        """The U-Net's down, middle and up blocks."""
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]


@ARCHITECTURES.register("unet-ddpm")
class UNetDDPM(DiffusersUNet):
    """`model(x, t, y) -> (eps, {})`: x (N, C, H, W), t (N,) timesteps 0..999 (float), y (N,) class labels
    (index num_classes is the null class; ignored when num_classes is 0). The output has C channels, or 2C with
    `learn_sigma` (noise, then the learned-range variance values)."""

    architecture = "unet-ddpm"
    # DDPM samples with all 1000 ancestral steps; guidance (class-conditional models) at scale 3.
    default_sampling = {"sampler": "ddpm", "num_steps": 1000, "cfg_scale": 3.0}

    def __init__(self, input_size=32, in_channels=3, num_classes=0, unet=None, learn_sigma=False):
        super().__init__()
        unet = dict(unet or ddpm_unet_config(**SIZES["UNet-DDPM-32"]))
        num_classes = num_classes or 0
        self._setup(input_size, in_channels, num_classes, unet, len(unet["block_out_channels"]))
        self.config["learn_sigma"] = learn_sigma
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(sample_size=input_size, in_channels=in_channels,
                                out_channels=2 * in_channels if learn_sigma else in_channels,
                                num_class_embeds=num_classes + 1 if num_classes else None, **unet)

    @property
    def objective_defaults(self):
        """The 'gaussian' objective of DDPM: linear betas 1e-4..0.02 over 1000 steps, and the reverse variance
        beta_t of DDPM's released samples ('fixed_large'), or the learned range with learn_sigma."""
        return {"num_timesteps": 1000, "beta_schedule": "linear",
                "variance": "learned_range" if self.config["learn_sigma"] else "fixed_large"}

    def forward(self, x, t, y=None):
        labels = y if self.num_classes else None
        if self.num_classes and y is None:
            labels = self.null_condition(x.shape[0], x.device)
        return self.unet(x, t, class_labels=labels).sample, {}


@ARCHITECTURES.register("unet-ldm")
class UNetLDM(DiffusersUNet):
    """`model(x, t, y) -> (eps, {})`: x (N, C, h, w) latents, t (N,) timesteps 0..999 (float), y (N,) class
    labels; the U-Net cross-attends to the learned token of y (index num_classes: the null class)."""

    architecture = "unet-ldm"
    # LDM samples with 50 DDIM steps (eta 0); guidance at scale 3.
    default_sampling = {"sampler": "ddim", "num_steps": 50, "cfg_scale": 3.0}

    def __init__(self, input_size=32, in_channels=4, num_classes=1000, unet=None):
        super().__init__()
        unet = dict(unet or ldm_unet_config(**SIZES["UNet-LDM"]))
        num_classes = num_classes or 0
        self._setup(input_size, in_channels, num_classes, unet, len(unet["block_out_channels"]))
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(sample_size=input_size, in_channels=in_channels, out_channels=in_channels,
                                         **unet)
        self.class_tokens = nn.Embedding(num_classes + 1, unet["cross_attention_dim"])

    @property
    def objective_defaults(self):
        """LDM's chain: 1000 steps of its 'linear' schedule for ImageNet (sqrt-spaced betas 0.0015..0.0195);
        DDIM sampling makes the reverse variance irrelevant, the posterior one ('fixed_small') is LDM's DDPM
        sampler's."""
        return {"num_timesteps": 1000, "beta_schedule": "ldm_linear", "variance": "fixed_small"}

    def forward(self, x, t, y=None):
        if y is None:
            y = self.null_condition(x.shape[0], x.device)
        context = self.class_tokens(y)[:, None]
        return self.unet(x, t, encoder_hidden_states=context.to(x.dtype)).sample, {}


SIZES = {
    "UNet-DDPM-32": dict(block_out_channels=(128, 256, 256, 256), attention_levels=(1,), dropout=0.1),
    "UNet-DDPM-64": dict(block_out_channels=(128, 256, 256, 256), attention_levels=(2,), dropout=0.1),
    "UNet-DDPM-256": dict(block_out_channels=(128, 128, 256, 256, 512, 512), attention_levels=(4,), dropout=0.0),
    "UNet-Tiny": dict(block_out_channels=(32, 64), attention_levels=(1,), layers_per_block=1, dropout=0.0,
                      norm_num_groups=8),
    "UNet-LDM": dict(block_out_channels=(192, 384, 576, 960), attention_levels=(1, 2, 3), context_dim=512),
    "UNet-LDM-S": dict(block_out_channels=(128, 256, 256), attention_levels=(1, 2), context_dim=256),
    "UNet-LDM-Tiny": dict(block_out_channels=(32, 64), attention_levels=(1,), layers_per_block=1, head_channels=16,
                          context_dim=32, norm_num_groups=8),
}


def _constructor(name):
    ldm = name.startswith("UNet-LDM")
    arguments = (ldm_unet_config if ldm else ddpm_unet_config)(**SIZES[name])

    if ldm:
        def build(input_size=32, in_channels=4, num_classes=1000):
            return UNetLDM(input_size, in_channels, num_classes, unet=arguments)
    else:
        def build(input_size=64, in_channels=3, num_classes=0):
            return UNetDDPM(input_size, in_channels, num_classes, unet=arguments)
    build.__name__ = name.replace("-", "_")
    build.__doc__ = f"{name}: {SIZES[name]}"
    return build


UNet_models = {name: BACKBONES.register(name, _constructor(name)) for name in SIZES}
