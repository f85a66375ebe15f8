"""Tokenizers: pixel space-to-depth, VA-VAE from an LDM checkpoint (fixture parity), diffusers AutoencoderKL."""
import argparse
import json

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import REPO_ROOT, fixture_path
from models.tokenizers import PixelTokenizer, load_tokenizer, to_float
from models.vavae import (KLAutoencoder, autoencoder_kwargs, convert_ldm_state_dict, load_ldm_checkpoint,
                          load_vavae, read_vavae_config)


def random_images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def test_pixel_tokenizer_round_trip_is_exact():
    tok = load_tokenizer("pixel")
    images = random_images()
    latents = tok.encode(images)
    assert (tok.spec, tok.latent_channels, tok.downsample) == ("pixel:4", 48, 4)
    assert latents.shape == (2, 48, 16, 16) and latents.dtype == torch.float32
    assert latents.min() >= -1 and latents.max() <= 1
    assert torch.equal(tok.decode(latents), images)
    # space-to-depth: channel c*16 + i*4 + j of patch (y, x) is pixel (c, 4y+i, 4x+j)
    assert torch.equal(latents[:, 2 * 16 + 1 * 4 + 3, 5, 7], to_float(images)[:, 2, 4 * 5 + 1, 4 * 7 + 3])


def test_pixel_tokenizer_other_patch_and_bad_specs():
    tok = load_tokenizer("pixel:2")
    images = random_images(1, 32, seed=1)
    assert tok.encode(images).shape == (1, 12, 16, 16)
    assert torch.equal(tok.decode(tok.encode(images)), images)
    with pytest.raises(ValueError):
        load_tokenizer("pixel:two")
    with pytest.raises(ValueError):
        load_tokenizer("pixel", ckpt_path="x.pt")
    with pytest.raises(TypeError):
        PixelTokenizer().encode(images.float())


def _fixture_config(tmp_path, ckpt_path):
    meta = json.loads(safe_open(str(fixture_path("vavae.safetensors")), "pt").metadata()["json"])
    config = {"ckpt_path": str(ckpt_path),
              "model": {"params": {"embed_dim": meta["embed_dim"], "ddconfig": meta["ddconfig"]}}}
    path = tmp_path / "vavae_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_vavae_matches_reference_fixture(tmp_path):
    ckpt = fixture_path("vavae_checkpoint.pt")
    ref = safe_open(str(fixture_path("vavae.safetensors")), "pt")
    vae = load_vavae(_fixture_config(tmp_path, ckpt))
    mean, logvar = vae.encode_posterior(ref.get_tensor("image"))
    decoded = vae.decode(mean)
    torch.testing.assert_close(mean, ref.get_tensor("posterior_mean"), atol=1e-5, rtol=0)
    torch.testing.assert_close(logvar, ref.get_tensor("posterior_logvar"), atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, ref.get_tensor("decoded"), atol=1e-5, rtol=0)


def test_vavae_tokenizer_spec_and_ckpt_override(tmp_path):
    ckpt = fixture_path("vavae_checkpoint.pt")
    config = _fixture_config(tmp_path, tmp_path / "not_there.pt")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(f"vavae:{config}")
    tok = load_tokenizer(f"vavae:{config}", ckpt_path=str(ckpt))
    assert (tok.spec, tok.latent_channels, tok.downsample) == (f"vavae:{config}", 4, 2)
    images = random_images(2, 32)
    latents = tok.encode(images)
    mean, _ = tok.vae.encode_posterior(to_float(images))
    assert latents.shape == (2, 4, 16, 16)
    torch.testing.assert_close(latents, mean, atol=0, rtol=0)
    decoded = tok.decode(latents)
    assert decoded.dtype == torch.uint8 and decoded.shape == images.shape


def test_vavae_missing_checkpoint_says_where_to_get_it(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"ckpt_path": "checkpoints/nothing-here.pt", "model": {"params": {
        "embed_dim": 4, "ddconfig": {"z_channels": 4, "ch": 32, "ch_mult": [1], "num_res_blocks": 1,
                                     "resolution": 32}}}}))
    with pytest.raises(FileNotFoundError) as info:
        load_vavae(config)
    message = str(info.value)
    assert "huggingface.co/hustvl/vavae-imagenet256-f16d32-dinov2" in message
    assert "checkpoints/vavae-imagenet256-f16d32-dinov2.pt" in message and "nothing-here.pt" in message


def test_repository_vavae_config():
    path = REPO_ROOT / "tokenizer" / "configs" / "vavae_f16d32_vfdinov2.yaml"
    config = read_vavae_config(path)
    assert config["ckpt_path"] == "checkpoints/vavae-imagenet256-f16d32-dinov2.pt"
    params = config["model"]["params"]
    kwargs = autoencoder_kwargs(params["embed_dim"], params["ddconfig"])
    assert kwargs["latent_channels"] == 32 and kwargs["block_out_channels"] == (128, 128, 256, 256, 512)
    assert kwargs["down_block_types"] == ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",)
    assert kwargs["up_block_types"] == ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4


def test_pickled_checkpoint_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "hparams": argparse.Namespace(a=1)}, path)
    with pytest.raises(RuntimeError, match="cannot be loaded safely"):
        load_ldm_checkpoint(path)


def test_unknown_ldm_keys_raise_and_training_keys_are_dropped():
    state = {"encoder.conv_in.weight": torch.zeros(1), "loss.logvar": torch.zeros(()),
             "linear_proj.weight": torch.zeros(1), "foundation_model.model.x": torch.zeros(1)}
    assert list(convert_ldm_state_dict(state, num_levels=2)) == ["encoder.conv_in.weight"]
    with pytest.raises(ValueError, match="encoder.down.0.weird"):
        convert_ldm_state_dict({"encoder.down.0.weird.weight": torch.zeros(1)}, num_levels=2)


@pytest.mark.parametrize("subfolder", ["", "vae"])
def test_diffusers_autoencoder_from_local_directory(tmp_path, subfolder):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    ae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                       scaling_factor=0.5).eval()
    ae.save_pretrained(tmp_path / subfolder if subfolder else tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert (tok.latent_channels, tok.downsample, tok.spec) == (4, 2, str(tmp_path))
    images = random_images(2, 16)
    latents = tok.encode(images)
    with torch.no_grad():
        expected = ae.encode(to_float(images)).latent_dist.mean  # raw: no scaling_factor
    torch.testing.assert_close(latents, expected)
    decoded = tok.decode(latents)
    assert decoded.shape == images.shape and decoded.dtype == torch.uint8
    assert isinstance(tok.vae, KLAutoencoder)
