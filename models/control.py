"""ControlNet: mask-guided generation on top of a trained, frozen backbone.

A control model wraps the base network and adds a trainable branch fed the control image (a mask, float in
[0, 1], at the image resolution). Every layer that joins the branch to the base starts at zero, so that at
initialisation the control model gives exactly the base model's output; the base stays frozen (eval mode, no
gradients) and only the branch is trained and saved (`state_dict` holds the branch alone).

- `TransformerControl` ('transformer-control'; SiT, DiT, LightningDiT), in the style of PixArt-delta (Chen et al.
  2024, arXiv:2401.05252): the mask goes through a small convolutional encoder straight to the base's token grid
  (a 3x3 conv stack, then one conv whose kernel and stride are the pixels per token: the autoencoder's
  downsampling times the patch size; no autoencoder is run on the mask), then a zero-initialised linear layer,
  and is added to the tokens entering the first base block. A trainable copy of the first `num_blocks` base
  blocks runs on that sum; the output of copy i, through a zero-initialised linear layer, is added to the output
  of base block i. The branch is attached by forward hooks on the base's `blocks`, so any backbone that runs its
  blocks in sequence as `block(tokens, *extras)` works unchanged (SiT: only its first dense blocks, which see every
  token; caption tokens get no mask tokens). U-ViT (its blocks carry long skips) is not supported.
- `UNetControl` ('unet-control'; UNet-LDM) is diffusers' ControlNetModel made from the base UNet2DConditionModel
  by `ControlNetModel.from_unet` (a copy of its encoder, zero convolutions; its conditioning embedding downsamples
  the mask to the latent grid with log2(downsampling) stride-2 convolutions). The pixel-space UNet-DDPM is a
  UNet2DModel, for which diffusers has no ControlNet and which takes no extra residuals: it is refused (UNet-LDM
  with the `pixel:1` tokenizer is a pixel-space U-Net that supports control).

`forward(x, t, y, control=mask, control_scale=s)`: s scales what the branch adds (0 or no mask: exactly the base
model; 1: as trained; above 1: follows the mask more strictly).
"""
import copy
import functools
import hashlib
import math

import torch
import torch.nn as nn

from models.backbone import Backbone
from models.sit import DENSE_IN

# Blocks that a control branch may join, per transformer architecture (None: all of them). SiT's middle blocks
# see a subset of the tokens (SPRINT) or of the batch (path drop in guidance).
CONTROLLABLE_BLOCKS = {"sit": DENSE_IN, "dit": None, "lightningdit": None}
MASK_ENCODER_WIDTH = 32


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of a network's state dict (names, dtypes, shapes and bytes, in name order): which base a control
    checkpoint belongs to."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def mask_input(masks: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 masks (N, C, H, W) -> the control input: float in [0, 1]."""
    return masks.to(dtype) / 255.0


def zero_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ControlledBackbone(Backbone):
    """What both control models share: the frozen `base`, the trainable `branch`, and the backbone interface
    (condition, latent shape, objective and sampling defaults) taken from the base."""

    def _setup(self, base: Backbone, config: dict):
        self.base = base.requires_grad_(False).eval()
        self.config = config

    @property
    def conditioning(self):
        return self.base.conditioning

    @property
    def latent_shape(self):
        return self.base.latent_shape

    @property
    def default_objective(self):
        return self.base.default_objective

    @property
    def objective_defaults(self):
        return self.base.objective_defaults

    @property
    def sampling_defaults(self):
        return self.base.sampling_defaults

    def null_condition(self, batch_size, device=None):
        return self.base.null_condition(batch_size, device)

    def train(self, mode: bool = True):
        """Train the branch; the frozen base stays in eval mode (no dropout, path drop or token drop)."""
        super().train(mode)
        self.base.eval()
        return self

    def state_dict(self, *, destination=None, prefix="", keep_vars=False):
        """The branch's weights only (keys 'branch.*'): the base belongs to its own checkpoint."""
        return self.branch.state_dict(destination=destination, prefix=prefix + "branch.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load what `state_dict` returned (keys 'branch.*') into the branch."""
        stray = [k for k in state_dict if not k.startswith("branch.")]
        if stray and strict:
            raise KeyError(f"not weights of a control branch: {', '.join(stray[:5])}")
        branch = {k[len("branch."):]: v for k, v in state_dict.items() if k.startswith("branch.")}
        return self.branch.load_state_dict(branch, strict=strict, assign=assign)

    def forward(self, x, t, y=None, control=None, control_scale=1.0, **kwargs):
        if control is None or control_scale == 0:
            return self.base(x, t, y, **kwargs)
        if control.shape[0] != x.shape[0]:
            raise ValueError(f"{control.shape[0]} control images for a batch of {x.shape[0]}")
        return self.controlled_forward(x, t, y, control.to(x.dtype), control_scale, **kwargs)

    def controlled_forward(self, x, t, y, control, scale, **kwargs):
        raise NotImplementedError


class MaskEncoder(nn.Module):
    """(N, mask_channels, H, W) -> (N, tokens, hidden_size): two 3x3 convolutions, then a patchifying convolution
    with kernel and stride `pixels_per_token`."""

    def __init__(self, mask_channels, pixels_per_token, hidden_size, width=MASK_ENCODER_WIDTH):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(mask_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, hidden_size, pixels_per_token, stride=pixels_per_token),
        )

    def forward(self, mask):
        return self.net(mask).flatten(2).transpose(1, 2)


class TransformerControl(ControlledBackbone):
    """ControlNet-Transformer (PixArt-delta style) over a backbone with `blocks`; see the module docstring.
    config: num_blocks (copied base blocks), mask_channels (1 or 3), downsample (image pixels per latent pixel)."""

    architecture = "transformer-control"

    def __init__(self, base, num_blocks=None, mask_channels=1, downsample=1):
        super().__init__()
        limit = CONTROLLABLE_BLOCKS.get(base.architecture, 0)
        if not hasattr(base, "blocks") or limit == 0:
            raise ValueError(f"no ControlNet-Transformer for the {base.architecture!r} backbone (supported: "
                             f"{', '.join(CONTROLLABLE_BLOCKS)}; U-Nets: UNet-LDM)")
        limit = len(base.blocks) if limit is None else limit
        num_blocks = min(len(base.blocks) // 2, limit) if num_blocks is None else num_blocks
        if not 1 <= num_blocks <= limit:
            raise ValueError(f"a control branch of {base.architecture!r} copies 1 to {limit} blocks, got {num_blocks}")
        if mask_channels not in (1, 3):
            raise ValueError(f"masks have 1 or 3 channels, got {mask_channels}")
        self._setup(base, dict(num_blocks=num_blocks, mask_channels=mask_channels, downsample=downsample))
        hidden = base.config["hidden_size"]
        self.num_tokens = (base.config["input_size"] // base.config["patch_size"]) ** 2
        self.branch = nn.Module()
        self.branch.mask_encoder = MaskEncoder(mask_channels, downsample * base.config["patch_size"], hidden)
        self.branch.before = zero_linear(hidden)
        self.branch.blocks = copy.deepcopy(base.blocks[:num_blocks]).requires_grad_(True)
        self.branch.after = nn.ModuleList(zero_linear(hidden) for _ in range(num_blocks))
        self._run = None
        base.blocks[0].register_forward_pre_hook(self._start_branch)
        for index in range(num_blocks):
            base.blocks[index].register_forward_hook(functools.partial(self._join, index))

    def compile_regions(self, regional: bool = True) -> list:
        """The copied blocks and the base blocks the branch does not join (those carry its hooks and stay eager), in
        both compile modes: a whole-forward graph would have to trace the hooks."""
        return [*self.branch.blocks, *self.base.blocks[self.config["num_blocks"]:]]

    def controlled_forward(self, x, t, y, control, scale, **kwargs):
        self._run = {"tokens": self.branch.mask_encoder(control), "scale": scale, "residuals": None}
        try:
            return self.base(x, t, y, **kwargs)
        finally:
            self._run = None

    def _start_branch(self, block, args):
        """Before base block 0: run the copied blocks on its input plus the mask tokens (the image tokens are the
        last ones: SiT's caption tokens lead)."""
        if self._run is None:
            return None
        tokens, *extras = args
        mask_tokens = self.branch.before(self._run["tokens"]).to(tokens.dtype)
        if mask_tokens.shape[1] != self.num_tokens or tokens.shape[1] < self.num_tokens:
            raise ValueError(f"the mask gives {mask_tokens.shape[1]} tokens, the backbone has {self.num_tokens} image "
                             f"tokens: a mask must have the size of the training images")
        lead = tokens.shape[1] - self.num_tokens
        hidden = tokens + nn.functional.pad(mask_tokens, (0, 0, lead, 0))
        residuals = []
        for copy_block, after in zip(self.branch.blocks, self.branch.after):
            hidden = copy_block(hidden, *extras)
            residuals.append(after(hidden))
        self._run["residuals"] = residuals
        return None

    def _join(self, index, block, args, output):
        """After base block `index`: add the scaled output of copy `index`. (Hooks are bound methods and partials,
        not closures, so that a deepcopy of the model, e.g. its EMA, hooks its own copies.)"""
        if self._run is None:
            return None
        return output + self._run["scale"] * self._run["residuals"][index].to(output.dtype)


class UNetControl(ControlledBackbone):
    """diffusers' ControlNetModel over a UNet-LDM; see the module docstring. config: mask_channels (1 or 3),
    downsample (image pixels per latent pixel, a power of 2)."""

    architecture = "unet-control"

    def __init__(self, base, mask_channels=1, downsample=1):
        super().__init__()
        if base.architecture != "unet-ldm":
            raise ValueError(f"the U-Net ControlNet needs a UNet-LDM base (diffusers' ControlNetModel extends a "
                             f"UNet2DConditionModel), got {base.architecture!r}; for pixel-space control train "
                             f"UNet-LDM with --tokenizer pixel:1")
        levels = math.log2(downsample)
        if downsample < 1 or levels != int(levels):
            raise ValueError(f"the ControlNet's conditioning embedding downsamples by powers of 2; the images are "
                             f"{downsample}x the latents")
        from diffusers import ControlNetModel

        self._setup(base, dict(mask_channels=mask_channels, downsample=downsample))
        channels = tuple(16 * 2 ** level for level in range(int(levels) + 1))
        self.branch = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=channels,
                                                conditioning_channels=mask_channels)

    def controlled_forward(self, x, t, y, control, scale, **kwargs):
        if y is None:
            y = self.null_condition(x.shape[0], x.device)
        context = self.base.class_tokens(y)[:, None].to(x.dtype)
        down, middle = self.branch(x, t, encoder_hidden_states=context, controlnet_cond=control,
                                   conditioning_scale=scale, return_dict=False)
        eps = self.base.unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                             mid_block_additional_residual=middle).sample
        return eps, {}


CONTROLS = {cls.architecture: cls for cls in (TransformerControl, UNetControl)}


def build_control(base: Backbone, **config) -> ControlledBackbone:
    """The control model for `base`: diffusers' ControlNet for UNet-LDM, the ControlNet-Transformer otherwise."""
    if base.architecture.startswith("unet"):
        config.pop("num_blocks", None)
        return UNetControl(base, **config)
    return TransformerControl(base, **config)


def rebuild_control(architecture: str, base: Backbone, config: dict) -> ControlledBackbone:
    """A control model from the (architecture, config) its checkpoint recorded, around `base`."""
    if architecture not in CONTROLS:
        raise ValueError(f"unknown control architecture {architecture!r} (known: {', '.join(CONTROLS)})")
    return CONTROLS[architecture](base, **config)
