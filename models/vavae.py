"""VA-VAE (vision-foundation-aligned VAE) inference on top of diffusers' AutoencoderKL.

VA-VAE has the LDM AutoencoderKL architecture. The released checkpoint is an LDM-format
`torch.save({'state_dict': ...})`; this module maps its keys to diffusers names so that the
encoder/decoder run as a plain `diffusers.AutoencoderKL`.
"""
import re
from pathlib import Path

import torch
import yaml

from omegadit.files import load_safetensors, load_torch

VAVAE_HUB_REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
VAVAE_CKPT_NAME = "vavae-imagenet256-f16d32-dinov2.pt"
VAVAE_DOWNLOAD_URL = f"https://huggingface.co/{VAVAE_HUB_REPO}/resolve/main/{VAVAE_CKPT_NAME}"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Checkpoint entries that only training uses (VF-loss projection, discriminator/LPIPS, DINOv2).
IGNORED_PREFIXES = ("linear_proj.", "loss.", "foundation_model.")
MODEL_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class KLAutoencoder(torch.nn.Module):
    """A diffusers AutoencoderKL with a float interface: images in [-1, 1] <-> raw latents."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_posterior(self, images):
        """Posterior (mean, logvar) of images in [-1, 1], shape (N, 3, H, W); logvar clamped to [-30, 20]."""
        dist = self.autoencoder.encode(images).latent_dist
        return dist.mean, dist.logvar

    @torch.no_grad()
    def decode(self, latents):
        """Decode raw latents (N, C, h, w) to images in (about) [-1, 1]."""
        return self.autoencoder.decode(latents).sample


def autoencoder_kwargs(embed_dim: int, ddconfig: dict) -> dict:
    """diffusers AutoencoderKL constructor kwargs for an LDM `embed_dim` + `ddconfig`."""
    if not ddconfig.get("double_z", True):
        raise ValueError("ddconfig.double_z must be true: VA-VAE is a KL autoencoder with mean and logvar")
    if int(ddconfig["z_channels"]) != int(embed_dim):
        raise ValueError(f"diffusers AutoencoderKL needs z_channels == embed_dim, got "
                         f"z_channels={ddconfig['z_channels']} embed_dim={embed_dim}")
    if not ddconfig.get("resamp_with_conv", True):
        raise ValueError("ddconfig.resamp_with_conv=false (average-pool resampling) is not supported")
    ch, ch_mult = int(ddconfig["ch"]), [int(m) for m in ddconfig["ch_mult"]]
    resolution = int(ddconfig["resolution"])
    attn_resolutions = {int(r) for r in ddconfig.get("attn_resolutions", [])}
    attn_levels = [resolution // 2 ** level in attn_resolutions for level in range(len(ch_mult))]
    return dict(
        in_channels=int(ddconfig.get("in_channels", 3)),
        out_channels=int(ddconfig.get("out_ch", 3)),
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn_levels),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn_levels)),
        block_out_channels=tuple(ch * m for m in ch_mult),
        layers_per_block=int(ddconfig["num_res_blocks"]),
        latent_channels=int(embed_dim),
        norm_num_groups=32,
        sample_size=resolution,
        mid_block_add_attention=True,
    )


_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _map_key(key: str, num_levels: int):
    """diffusers name of one LDM autoencoder key, or None if the key is not part of the architecture."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if m is None:
        return None
    part, rest = m.groups()
    for ldm, new in (("conv_in.", "conv_in."), ("conv_out.", "conv_out."), ("norm_out.", "conv_norm_out.")):
        if rest.startswith(ldm):
            return f"{part}.{new}{rest[len(ldm):]}"
    m = re.fullmatch(r"mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)", rest)
    if m:
        name, layer, param = m.groups()
        if name == "attn_1":
            return f"{part}.mid_block.attentions.0.{_ATTN.get(layer, layer)}.{param}"
        return f"{part}.mid_block.resnets.{int(name[-1]) - 1}.{_RESNET.get(layer, layer)}.{param}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", rest)
    if m:
        direction, level, kind, index, layer, param = m.groups()
        block = f"down_blocks.{level}" if direction == "down" else f"up_blocks.{num_levels - 1 - int(level)}"
        if kind == "block":
            return f"{part}.{block}.resnets.{index}.{_RESNET.get(layer, layer)}.{param}"
        return f"{part}.{block}.attentions.{index}.{_ATTN.get(layer, layer)}.{param}"
    m = re.fullmatch(r"(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", rest)
    if m:
        direction, level, _, param = m.groups()
        if direction == "down":
            return f"{part}.down_blocks.{level}.downsamplers.0.conv.{param}"
        return f"{part}.up_blocks.{num_levels - 1 - int(level)}.upsamplers.0.conv.{param}"
    return None


def convert_ldm_state_dict(state_dict: dict, num_levels: int) -> dict:
    """Map an LDM AutoencoderKL state dict to diffusers AutoencoderKL names.

    Training-only entries (linear_proj.*, loss.*, foundation_model.* and anything outside the
    encoder/decoder/quant convs) are dropped; an unknown encoder/decoder key raises ValueError.
    """
    converted, unknown = {}, []
    for key, value in state_dict.items():
        if not key.startswith(MODEL_PREFIXES):
            continue
        new_key = _map_key(key, num_levels)
        if new_key is None:
            unknown.append(key)
            continue
        if ".attentions." in new_key and new_key.endswith(".weight") and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        converted[new_key] = value
    if unknown:
        raise ValueError(f"unrecognised LDM autoencoder keys: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return converted


def load_ldm_checkpoint(path) -> dict:
    """State dict of an LDM checkpoint ({'state_dict': ...} or a bare state dict, .pt or .safetensors).

    A .pt file is read with omegadit.files.load_torch, which refuses pickles that would run code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    ckpt = load_torch(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not any(k.startswith("encoder.") for k in ckpt):
        raise ValueError(f"{path} is not an LDM autoencoder checkpoint (no 'encoder.*' weights found)")
    return ckpt


def read_vavae_config(config_path) -> dict:
    """The VA-VAE YAML as a dict; checks the keys this module uses."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"VA-VAE config not found: {config_path}")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    try:
        params = config["model"]["params"]
        params["embed_dim"], params["ddconfig"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{config_path} lacks model.params.embed_dim / model.params.ddconfig") from e
    return config


def resolve_checkpoint(ckpt_path, config_path=None) -> Path:
    """Existing checkpoint file for `ckpt_path`; a relative path is tried from the working directory,
    then from the repository root. A missing file raises FileNotFoundError saying where to get it."""
    if not ckpt_path:
        raise FileNotFoundError(f"no VA-VAE ckpt_path in {config_path} and none given")
    path = Path(ckpt_path).expanduser()
    candidates = [path] if path.is_absolute() else [path, REPO_ROOT / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"VA-VAE checkpoint not found (tried {tried}). Download it from {VAVAE_DOWNLOAD_URL} "
        f"(hub repo {VAVAE_HUB_REPO}) and put it at checkpoints/{VAVAE_CKPT_NAME}, or point `ckpt_path` in "
        f"{config_path or 'the config'} at the file (or pass the checkpoint path explicitly).")


def build_autoencoder(config: dict):
    """An untrained diffusers AutoencoderKL with the architecture of a VA-VAE/LDM config dict."""
    from diffusers import AutoencoderKL
    params = config["model"]["params"]
    return AutoencoderKL(**autoencoder_kwargs(params["embed_dim"], params["ddconfig"]))


def load_vavae(config_path, ckpt_path=None, device="cpu") -> KLAutoencoder:
    """VA-VAE from a reference-style YAML (`ckpt_path`, `model.params.{embed_dim,ddconfig}`).

    `ckpt_path` overrides the YAML's. Returns a KLAutoencoder in eval mode on `device`.
    """
    config = read_vavae_config(config_path)
    path = resolve_checkpoint(ckpt_path or config.get("ckpt_path"), config_path)
    autoencoder = build_autoencoder(config)
    num_levels = len(config["model"]["params"]["ddconfig"]["ch_mult"])
    state_dict = convert_ldm_state_dict(load_ldm_checkpoint(path), num_levels)
    missing, unexpected = autoencoder.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the architecture in {config_path}: "
                         f"missing {missing[:10]}, unexpected {unexpected[:10]}")
    return KLAutoencoder(autoencoder).to(device)
