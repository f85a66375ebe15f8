"""Frozen DINOv2 encoders (timm) giving the REPA alignment targets.

Images of R px are normalised with the ImageNet statistics and bicubic-resized to 224*R/256 px, so a 14 px patch
ViT sees a grid of R/16 x R/16 patches (16 per 256 px): 256 tokens at 256 px, 1024 at 512 px. The position
embedding is resampled once to that grid (bicubic, antialiased), as the reference does. The features are the
normalised patch tokens (DINOv2's `x_norm_patchtokens`: timm `forward_features` minus the class/register tokens).
They match a SiT whose latent grid is R/16 with patch size 1; any other token count is for the caller to handle.
"""
import contextlib
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from omegadit.files import load_safetensors, load_torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_SIZES = {"s": "small", "b": "base", "l": "large", "g": "giant"}
PATCHES_PER_256PX = 16


def _dinov2_timm_name(size: str, registers: bool) -> str:
    return f"vit_{DINOV2_SIZES[size]}_patch14{'_reg4' if registers else ''}_dinov2.lvd142m"


DINOV2_MODELS = {
    f"dinov2-vit-{size}{suffix}": _dinov2_timm_name(size, bool(suffix))
    for size in DINOV2_SIZES for suffix in ("", "-reg")
}


def canonical_name(name: str) -> str:
    """'dinov2-vit-b', 'dinov2-vit-b-reg'; the reference spelling 'dinov2reg-vit-b' is accepted too."""
    key = name.strip().lower()
    if key.startswith("dinov2reg-"):
        key = "dinov2-" + key[len("dinov2reg-"):] + "-reg"
    if key not in DINOV2_MODELS:
        raise ValueError(f"unknown REPA encoder {name!r}; choose from {', '.join(DINOV2_MODELS)} or 'none'")
    return key


def input_size(resolution: int) -> int:
    """Side of the encoder input for images of `resolution` px: 224 * resolution / 256."""
    if resolution <= 0 or resolution % PATCHES_PER_256PX:
        raise ValueError(f"REPA needs an image resolution divisible by {PATCHES_PER_256PX}, got {resolution}")
    return 224 * resolution // 256


class RepaEncoder(nn.Module):
    """Frozen timm ViT mapping uint8 images (N, 3, R, R) to patch features (N, (R/16)**2, z_dim)."""

    def __init__(self, name: str, model: nn.Module, resolution: int):
        super().__init__()
        self.name = name
        self.model = model
        self.resolution = int(resolution)
        self.input_size = input_size(resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def z_dim(self) -> int:
        return self.model.embed_dim

    @property
    def num_tokens(self) -> int:
        return (self.resolution // PATCHES_PER_256PX) ** 2

    def train(self, mode: bool = True):
        """Stay in eval mode: the encoder is frozen."""
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, R, R) -> ImageNet-normalised float (N, 3, 224R/256, 224R/256), bicubic resize."""
        if images.dtype != torch.uint8:
            raise TypeError(f"{self.name} expects uint8 images in [0, 255], got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.resolution,) * 2:
            raise ValueError(
                f"{self.name} was built for (N, 3, {self.resolution}, {self.resolution}) images, "
                f"got {tuple(images.shape)}")
        x = images.to(self.mean.device, torch.float32) / 255.0
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised patch tokens as float32 (N, (R/16)**2, z_dim)."""
        tokens = self.model.forward_features(self.preprocess(images))
        return tokens[:, self.model.num_prefix_tokens:].float()

    def load_weights(self, path) -> "RepaEncoder":
        """Load a timm or original DINOv2 state dict (.safetensors, or .pth refused if it would run code). The file's
        tensors become the model's (in the model's dtypes), so a model built on the meta device works too."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        path = Path(path)
        state = load_safetensors(path) if path.suffix == ".safetensors" else load_torch(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict")
        own = self.model.state_dict()
        try:
            state = checkpoint_filter_fn(dict(state), self.model)
            state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items() if not k.startswith("head.")}
            missing, unexpected = self.model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not match {self.name}: {err}") from err
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match {self.name} ({len(missing)} missing tensors, e.g. {missing[:3]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")
        unfilled = [name for name, buffer in self.model.named_buffers() if buffer.is_meta]
        if unfilled:
            raise ValueError(f"{path} leaves {self.name}'s buffers {unfilled[:3]} unset")
        return self


def build_repa_encoder(name: str, resolution: int = 256, pretrained: bool = False, device=None,
                       **timm_kwargs) -> RepaEncoder:
    """DINOv2 encoder for `resolution` px images; random weights unless `pretrained` (timm hub download).

    device="meta": the ViT's tensors are left unallocated and uninitialised, for `load_weights` to fill (no seconds
    spent drawing random weights that the file replaces). `timm_kwargs` go to `timm.create_model` (e.g. depth=2 for
    a small test model).
    """
    import timm

    name = canonical_name(name)
    with torch.device(device) if device else contextlib.nullcontext():
        model = timm.create_model(DINOV2_MODELS[name], pretrained=pretrained, img_size=input_size(resolution),
                                  num_classes=0, **timm_kwargs)
    return RepaEncoder(name, model, resolution)


def weight_candidates(name: str, directory) -> list:
    """Files searched for `name` in a weights directory, in order."""
    import timm

    timm_name = DINOV2_MODELS[canonical_name(name)]
    original = timm.models.get_pretrained_cfg(timm_name).url.rsplit("/", 1)[-1]
    directory = Path(directory)
    return [directory / f"{timm_name}.safetensors", directory / timm_name / "model.safetensors",
            directory / original]


def _download_help(name: str) -> str:
    import timm

    timm_name = DINOV2_MODELS[name]
    url = timm.models.get_pretrained_cfg(timm_name).url
    return (f"download `hf download timm/{timm_name} --local-dir WEIGHTS/{timm_name}` or the original "
            f"{url} into WEIGHTS, then pass --enc-weights WEIGHTS (a directory, or the file itself)")


def _resolve_weights(name: str, weights, several: bool) -> Path:
    path = Path(weights).expanduser()
    if path.is_dir():
        for candidate in weight_candidates(name, path):
            if candidate.is_file():
                return candidate
        tried = ", ".join(str(c) for c in weight_candidates(name, path))
        raise FileNotFoundError(f"no weights for {name} in {path} (looked for {tried}); {_download_help(name)}")
    if not path.is_file():
        raise FileNotFoundError(f"REPA encoder weights {path} do not exist; {_download_help(name)}")
    if several:
        raise ValueError(f"one weights file ({path}) cannot serve several encoders: pass a directory instead")
    return path


def load_repa_encoders(enc_type: str, resolution: int, device="cpu", weights=None) -> list:
    """Frozen encoders for a comma-separated `enc_type` ('none' -> []).

    `weights`: None (timm hub download), a weights file (one encoder only) or a directory searched with
    `weight_candidates`.
    """
    if enc_type is None or enc_type.strip().lower() in ("", "none"):
        return []
    names = [canonical_name(n) for n in enc_type.split(",")]
    encoders = []
    for name in names:
        if weights is None:
            try:
                encoder = build_repa_encoder(name, resolution, pretrained=True)
            except OSError as err:
                raise FileNotFoundError(f"could not download the {name} weights ({err}); "
                                        f"{_download_help(name)}") from err
        else:
            path = _resolve_weights(name, weights, several=len(names) > 1)
            encoder = build_repa_encoder(name, resolution, device="meta").load_weights(path)
        encoders.append(encoder.to(device))
    return encoders
