"""Image tokenizers: uint8 images <-> raw latents, one interface for every autoencoder.

Specs (the `spec` attribute is what a checkpoint records to rebuild the same tokenizer):
  'pixel' / 'pixel:<patch>'   weight-free space-to-depth patches, exactly invertible
  'vavae:<config.yaml>'       VA-VAE from an LDM-format checkpoint (models/vavae.py)
  '<hub id or local dir>'     any diffusers AutoencoderKL (SD-VAE, INVAE, ...)
Latents are raw (no scaling_factor); datasets normalise them with their stats. A VAE's latent is its posterior mean
(`encode`) or a sample of the posterior (`encode_sample`, with noise seeded by each image's id).
"""
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from models.vavae import KLAutoencoder, load_vavae


def to_float(images):
    """uint8 (N, 3, H, W) -> float32 in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.float() / 127.5 - 1.0


def to_uint8(images):
    """float (N, 3, H, W) in [-1, 1] -> uint8, rounded and clamped."""
    return ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def posterior_noise(ids, shape, seed: int = 0):
    """Standard normal noise of `shape` for each image id, the same on every machine and in every batch: a CPU
    generator seeded by a hash of `seed` and the id."""
    noise = []
    for key in ids:
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        noise.append(torch.randn(tuple(shape), generator=generator))
    return torch.stack(noise)


class PixelTokenizer:
    """Space-to-depth tokenizer: (N, 3, H, W) uint8 -> (N, 3*p*p, H/p, W/p) float in [-1, 1]."""

    has_posterior = False

    def __init__(self, patch_size: int = 4, device="cpu"):
        if patch_size < 1:
            raise ValueError(f"pixel tokenizer patch size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        self.latent_channels = 3 * patch_size ** 2
        self.downsample = patch_size
        self.spec = f"pixel:{patch_size}"
        self.device = torch.device(device)

    def to(self, device):
        self.device = torch.device(device)
        return self

    def encode(self, images):
        """Raw latents of uint8 images."""
        return F.pixel_unshuffle(to_float(images.to(self.device)), self.patch_size)

    def decode(self, latents):
        """uint8 images of latents; exact inverse of encode."""
        return to_uint8(F.pixel_shuffle(latents.to(self.device, torch.float32), self.patch_size))


class VAETokenizer:
    """uint8 interface over a KLAutoencoder (encode_posterior / decode on images in [-1, 1])."""

    has_posterior = True

    def __init__(self, vae, spec: str, device="cpu", ckpt_path=None):
        self.vae = vae.to(device)
        self.spec = spec
        self.ckpt_path = ckpt_path
        self.device = torch.device(device)
        self.latent_channels = vae.latent_channels
        self.downsample = vae.downsample

    def to(self, device):
        self.device = torch.device(device)
        self.vae.to(self.device)
        return self

    @torch.no_grad()
    def encode(self, images):
        """Posterior mean (N, C, H/f, W/f) float32 of uint8 images."""
        mean, _ = self.vae.encode_posterior(to_float(images.to(self.device)))
        return mean.float()

    @torch.no_grad()
    def encode_sample(self, images, ids, seed: int = 0):
        """A sample mean + exp(logvar / 2) * noise of the posterior (N, C, H/f, W/f) float32 of uint8 images; the
        noise of each image comes from its id (`posterior_noise`), so a sample is reproducible."""
        mean, logvar = self.vae.encode_posterior(to_float(images.to(self.device)))
        noise = posterior_noise(ids, mean.shape[1:], seed).to(mean.device)
        return mean.float() + torch.exp(0.5 * logvar.float()) * noise

    @torch.no_grad()
    def decode(self, latents):
        """uint8 images (N, 3, H, W) of raw latents."""
        return to_uint8(self.vae.decode(latents.to(self.device, torch.float32)))


def _load_diffusers_autoencoder(name: str):
    """diffusers AutoencoderKL from a local directory or hub id (its root or its 'vae' subfolder)."""
    from diffusers import AutoencoderKL
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return AutoencoderKL.from_pretrained(str(path))
        if (path / "vae" / "config.json").is_file():
            return AutoencoderKL.from_pretrained(str(path), subfolder="vae")
        raise FileNotFoundError(f"{path} has neither config.json nor vae/config.json of a diffusers AutoencoderKL")
    errors = []
    for subfolder in (None, "vae"):
        try:
            return AutoencoderKL.from_pretrained(name, subfolder=subfolder)
        except (OSError, ValueError) as e:
            errors.append(str(e).splitlines()[0])
    raise FileNotFoundError(
        f"could not load a diffusers AutoencoderKL from '{name}': not a local directory, and the hub id failed "
        f"({'; '.join(errors)}). Download it (e.g. `huggingface-cli download {name} --local-dir checkpoints/vae`) "
        f"and pass the directory, or use 'pixel' / 'vavae:<config.yaml>'.")


def is_pixel_spec(spec: str) -> bool:
    """Whether a tokenizer spec names the weight-free pixel tokenizer ('pixel' or 'pixel:<patch>')."""
    return spec == "pixel" or spec.startswith("pixel:")


def load_tokenizer(spec: str, device="cpu", ckpt_path=None):
    """Tokenizer for `spec` ('pixel', 'pixel:<patch>', 'vavae:<config.yaml>', diffusers hub id or dir).

    `ckpt_path` overrides the VA-VAE config's checkpoint; other specs take no checkpoint.
    The returned object has encode(uint8 images) -> raw latents, decode(latents) -> uint8 images,
    and the attributes latent_channels, downsample, spec.
    """
    if is_pixel_spec(spec):
        if ckpt_path:
            raise ValueError("the pixel tokenizer has no checkpoint")
        patch = spec.partition(":")[2] or "4"
        if not patch.isdigit():
            raise ValueError(f"bad pixel tokenizer spec '{spec}': expected 'pixel' or 'pixel:<patch size>'")
        return PixelTokenizer(int(patch), device)
    if spec.startswith("vavae:"):
        config = spec[len("vavae:"):]
        return VAETokenizer(load_vavae(config, ckpt_path, device), spec, device, ckpt_path)
    if ckpt_path:
        raise ValueError(f"ckpt_path only applies to 'vavae:<config>' tokenizers, not '{spec}'")
    return VAETokenizer(KLAutoencoder(_load_diffusers_autoencoder(spec)), spec, device)


class LatentDecoder:
    """Normalised latents (as datasets give them: (raw - mean) / std) -> uint8 images (N, 3, H, W)."""

    def __init__(self, tokenizer, mean: torch.Tensor, std: torch.Tensor):
        self.tokenizer = tokenizer
        self.mean = mean.to(tokenizer.device)
        self.std = std.to(tokenizer.device)

    def __call__(self, latents):
        return self.tokenizer.decode(latents.to(self.tokenizer.device, torch.float32) * self.std + self.mean)
