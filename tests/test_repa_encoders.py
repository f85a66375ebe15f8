"""REPA targets: random-weight DINOv2 ViT-S through timm, preprocessing, weight files and error paths."""
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.repa_encoders import (
    DINOV2_MODELS, IMAGENET_MEAN, IMAGENET_STD, build_repa_encoder, canonical_name, load_repa_encoders)

TIMM_S = "vit_small_patch14_dinov2.lvd142m"


def _images(n, resolution, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, resolution, resolution), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def source_vit():
    """A random ViT-S/14 at timm's native 518 px grid (37x37 position embedding), like the released weights."""
    torch.manual_seed(0)
    return timm.create_model(TIMM_S, pretrained=False, num_classes=0, dynamic_img_size=True).eval()


def _reference_features(vit, images):
    """The reference recipe: /255, ImageNet normalisation, bicubic resize to 224*R/256, patch tokens."""
    size = 224 * images.shape[-1] // 256
    x = images.float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(size, size), mode="bicubic")
    with torch.no_grad():
        return vit.forward_features(x)[:, vit.num_prefix_tokens:]


def test_names():
    assert DINOV2_MODELS["dinov2-vit-b"] == "vit_base_patch14_dinov2.lvd142m"
    assert DINOV2_MODELS["dinov2-vit-g-reg"] == "vit_giant_patch14_reg4_dinov2.lvd142m"
    assert canonical_name(" DINOv2-ViT-L ") == "dinov2-vit-l"
    assert canonical_name("dinov2reg-vit-s") == "dinov2-vit-s-reg"
    assert all(name in timm.list_models(pretrained=True) for name in DINOV2_MODELS.values())
    with pytest.raises(ValueError, match="unknown REPA encoder"):
        canonical_name("mae-vit-b")
    assert load_repa_encoders("none", 256) == [] and load_repa_encoders(None, 256) == []


@pytest.mark.parametrize("resolution,tokens", [(256, 256), (512, 1024), (64, 16)])
def test_token_grid(resolution, tokens):
    encoder = build_repa_encoder("dinov2-vit-s", resolution)
    assert encoder.input_size == 224 * resolution // 256 and encoder.num_tokens == tokens
    z = encoder(_images(1, resolution))
    assert z.shape == (1, tokens, 384) and z.dtype == torch.float32 and torch.isfinite(z).all()


def test_registers_are_dropped():
    encoder = build_repa_encoder("dinov2-vit-s-reg", 256, depth=1)
    assert encoder.model.num_prefix_tokens == 5
    assert encoder(_images(2, 256)).shape == (2, 256, 384)


def test_preprocessing_normalises_and_resizes():
    encoder = build_repa_encoder("dinov2-vit-s", 256, depth=1)
    images = torch.zeros(2, 3, 256, 256, dtype=torch.uint8)
    images[1] = 255
    x = encoder.preprocess(images)
    assert x.shape == (2, 3, 224, 224)
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((224, 224), -IMAGENET_MEAN[c] / IMAGENET_STD[c]), atol=1e-5)
        assert torch.allclose(x[1, c], torch.full((224, 224), (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]), atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        encoder(images.float())
    with pytest.raises(ValueError, match="256, 256"):
        encoder(_images(1, 512))


def test_frozen():
    encoder = build_repa_encoder("dinov2-vit-s", 256, depth=1)
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder(_images(1, 256)).requires_grad


@pytest.mark.parametrize("layout", ["directory", "safetensors-file", "pth-file"])
def test_weights_round_trip_matches_reference_recipe(tmp_path, source_vit, layout):
    state = {k: v.contiguous() for k, v in source_vit.state_dict().items()}
    if layout == "pth-file":
        weights = tmp_path / "dinov2_s.pth"
        torch.save(state, weights)
    else:
        weights = tmp_path / f"{TIMM_S}.safetensors"
        save_file(state, str(weights))
    [encoder] = load_repa_encoders("dinov2-vit-s", 256, weights=tmp_path if layout == "directory" else weights)
    assert encoder.name == "dinov2-vit-s" and encoder.z_dim == 384
    assert torch.equal(encoder.model.blocks[3].attn.qkv.weight, source_vit.blocks[3].attn.qkv.weight)
    assert encoder.model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    images = _images(2, 256, seed=1)
    assert torch.allclose(encoder(images), _reference_features(source_vit, images), atol=1e-4)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_weights_for_another_architecture_are_refused(tmp_path, source_vit):
    weights = tmp_path / "vit_s.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(weights))
    with pytest.raises(ValueError, match="does not match dinov2-vit-s-reg"):
        load_repa_encoders("dinov2-vit-s-reg", 256, weights=weights)
    with pytest.raises(ValueError, match="several encoders"):
        load_repa_encoders("dinov2-vit-s,dinov2-vit-s-reg", 256, weights=weights)


def test_missing_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--enc-weights"):
        load_repa_encoders("dinov2-vit-b", 256, weights=tmp_path)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_repa_encoders("dinov2-vit-b", 256, weights=tmp_path / "absent.safetensors")

    import huggingface_hub.constants as hub_constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(FileNotFoundError) as info:
        load_repa_encoders("dinov2-vit-s", 256)
    message = str(info.value)
    assert "timm/vit_small_patch14_dinov2.lvd142m" in message and "--enc-weights" in message


def test_original_dinov2_checkpoint_with_registers(tmp_path):
    """A facebookresearch/dinov2 style file (register_tokens, mask_token, class position in pos_embed) loads."""
    torch.manual_seed(1)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2.lvd142m", num_classes=0, dynamic_img_size=True).eval()
    state = {k: v for k, v in vit.state_dict().items() if k not in ("reg_token", "pos_embed", "cls_token")}
    class_position = 0.1 * torch.randn(1, 1, 384)
    state["register_tokens"] = vit.reg_token.detach()
    state["cls_token"] = vit.cls_token.detach() - class_position
    state["pos_embed"] = torch.cat([class_position, vit.pos_embed.detach()], dim=1)
    state["mask_token"] = torch.zeros(1, 384)
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    [encoder] = load_repa_encoders("dinov2reg-vit-s", 256, weights=tmp_path)
    images = _images(1, 256, seed=2)
    assert torch.allclose(encoder(images), _reference_features(vit, images), atol=1e-4)


def test_encoder_loaded_from_a_file_draws_no_random_weights(tmp_path, source_vit):
    """The ViT is built on the meta device and takes the file's tensors: no random initialisation to pay for (or
    to disturb the seeded generator), and nothing left unset."""
    weights = tmp_path / f"{TIMM_S}.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(weights))
    torch.manual_seed(3)
    first_draw = torch.rand(4)
    torch.manual_seed(3)
    [encoder] = load_repa_encoders("dinov2-vit-s", 256, weights=weights)
    assert torch.equal(torch.rand(4), first_draw)
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
