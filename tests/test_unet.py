"""The U-Net backbones (models/unet.py): DDPM in pixel space and the class-conditional LDM on a diffusers
AutoencoderKL, trained straight from an image folder (image_folder_dataset.py) through train.py, resumed, and
sampled with generate.py; and the errors for bad inputs."""
import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

import generate
import image_folder_dataset
import train
from image_folder_dataset import ImageFolderDataset, is_image_folder
from models import BACKBONES, rebuild_backbone
from omegadit import checkpoint
from omegadit.conditioners import ClassConditioner, build_conditioner
from omegadit.objectives import build_objective

COLOURS = {"blue": (30, 60, 220), "red": (220, 40, 30)}


def write_squares(folder, colour, count=4, size=16, seed=0):
    """`count` PNGs of a coloured square at random places on grey."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = np.full((size, size, 3), 128, np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        image[y:y + size // 2, x:x + size // 2] = colour
        PIL.Image.fromarray(image).save(folder / f"{i:03d}.png")


@pytest.fixture
def squares(tmp_path):
    """data/blue/*.png and data/red/*.png: two classes of 16x16 coloured squares."""
    root = tmp_path / "data"
    for seed, (name, colour) in enumerate(COLOURS.items()):
        write_squares(root / name, colour, seed=seed)
    return root


@pytest.fixture
def tiny_vae(tmp_path):
    """A tiny diffusers AutoencoderKL (downsampling 2, 4 latent channels) saved as a local folder."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")
    return str(tmp_path / "vae")


def train_argv(data, out, model, tokenizer, *extra):
    return ["--exp-name", "unet", "--output-dir", str(out), "--data-dir", str(data), "--model", model,
            "--tokenizer", tokenizer, "--enc-type", "none", "--cfm-coeff", "0", "--batch-size", "4",
            "--num-workers", "0", "--log-every", "1", "--mixed-precision", "no", "--learning-rate", "1e-4",
            "--checkpointing-steps", "1", *extra]


def sample(ckpt, out, *extra):
    generate.main(generate.parse_args(["--ckpt", str(ckpt), "--sample-dir", str(out), "--name", "s",
                                       "--num-fid-samples", "3", "--balanced-sampling", "--mixed-precision", "no",
                                       *extra]))
    with np.load(out / "s.npz") as f:
        return f["arr_0"]


# ------------------------------------------------------------------------------------------------------ networks

@pytest.mark.parametrize("name, channels, classes", [("UNet-Tiny", 3, 2), ("UNet-Tiny", 3, 0),
                                                     ("UNet-LDM-Tiny", 4, 2)])
def test_tiny_unets_run_rebuild_and_checkpoint_gradients(name, channels, classes):
    torch.manual_seed(0)
    model = BACKBONES.build(name, input_size=16, in_channels=channels, num_classes=classes)
    assert model.conditioning == ("class" if classes else "none")
    assert model.sampling_defaults["cfg_scale"] == (3.0 if classes else 1.0)
    x, t = torch.randn(2, channels, 16, 16), torch.tensor([0.0, 999.0])
    y = model.null_condition(2)
    assert y.tolist() == [classes, classes]
    out, aux = model(x, t, y)
    assert out.shape == x.shape and aux == {}
    # The config survives the JSON of a checkpoint description and rebuilds the same network.
    config = json.loads(json.dumps(model.config))
    assert config == model.config
    rebuilt = rebuild_backbone(model.architecture, config)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x, t, y)[0], out)
    # diffusers' gradient checkpointing through the Backbone hook: same gradients, per-block compile regions.
    model.train()
    grads = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        model(x, t, torch.tensor([0, 1]) if classes else y)[0].square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert model.unet.is_gradient_checkpointing and len(model.compile_regions()) == 2 + 1 + 2
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_registered_sizes_and_objective_defaults():
    from models.unet import SIZES, ddpm_unet_config, ldm_unet_config

    assert {"UNet-DDPM-32", "UNet-DDPM-64", "UNet-DDPM-256", "UNet-Tiny", "UNet-LDM", "UNet-LDM-Tiny"} <= set(SIZES)
    ddpm = ddpm_unet_config(**SIZES["UNet-DDPM-64"])
    assert ddpm["block_out_channels"] == [128, 256, 256, 256]
    assert ddpm["down_block_types"] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    ldm = ldm_unet_config(**SIZES["UNet-LDM"])
    assert ldm["attention_head_dim"] == [6, 12, 18, 30] and ldm["cross_attention_dim"] == 512
    tiny = BACKBONES.build("UNet-Tiny", input_size=16, in_channels=3, num_classes=2)
    objective = build_objective(tiny.default_objective, **tiny.objective_defaults)
    assert objective.config == {"num_timesteps": 1000, "beta_schedule": "linear", "variance": "fixed_large",
                                "clip_denoised": False}
    assert objective.term_names == ("mse",)
    with pytest.raises(ValueError, match="input size 20 is not divisible by 8"):
        BACKBONES.build("UNet-DDPM-32", input_size=20, in_channels=3)


# ------------------------------------------------------------------------------------------------- image folders

def test_image_folder_layouts(squares, tmp_path):
    assert is_image_folder(squares)
    dataset = ImageFolderDataset(squares, "pixel:1")
    assert dataset.classes == ["blue", "red"] and dataset.labels == [0] * 4 + [1] * 4
    image, latent, label = dataset[5]
    assert image.shape == (3, 16, 16) and label == 1
    torch.testing.assert_close(latent, image.float() / 127.5 - 1.0)  # pixel space, not normalised: [-1, 1]
    assert dataset.num_classes_for(1000, explicit=False) == 2 and dataset.num_classes_for(0, explicit=True) == 0
    flat = tmp_path / "flat"
    write_squares(flat, (0, 200, 0))
    assert ImageFolderDataset(flat, "pixel:1").num_classes == 0
    (squares / "vae-in").mkdir()
    assert not is_image_folder(squares)


def test_ddpm_pixel_trains_resumes_and_samples(squares, tmp_path, fresh_accelerate_state):
    train.main(train.parse_args(train_argv(squares, tmp_path, "UNet-Tiny", "pixel:1", "--max-train-steps", "2")))
    train.main(train.parse_args(train_argv(squares, tmp_path, "UNet-Tiny", "pixel:1", "--max-train-steps", "3",
                                           "--resume", "latest")))
    exp = tmp_path / "unet"
    log = (exp / "log.txt").read_text()
    assert "objective gaussian" in log and "at step 2" in log and "latents (3, 16, 16)" in log
    assert json.loads((exp / "args.json").read_text())["num_classes"] == 2  # from the two class folders
    loaded = checkpoint.load(exp / "checkpoints" / "0000003")
    description = loaded.description
    assert description["objective"]["config"]["variance"] == "fixed_large"
    assert description["conditioner"]["name"] == "class" and loaded.model.num_classes == 2
    assert description["latent_stats"] == {"mean": [0.0] * 3, "std": [1.0] * 3}
    assert description["sampling"] == {"sampler": "ddpm", "num_steps": 1000, "cfg_scale": 3.0}
    shutil.rmtree(squares)  # sampling needs only the checkpoint
    images = sample(exp / "checkpoints" / "0000003", tmp_path / "samples", "--num-steps", "4")
    assert images.shape == (3, 16, 16, 3)
    assert len(list((tmp_path / "samples" / "s").glob("*.png"))) == 3


def test_unconditional_ddpm_from_a_flat_folder(tmp_path, fresh_accelerate_state):
    flat = tmp_path / "flat"
    write_squares(flat, (0, 200, 0))
    train.main(train.parse_args(train_argv(flat, tmp_path, "UNet-Tiny", "pixel:1", "--max-train-steps", "1")))
    loaded = checkpoint.load(tmp_path / "unet" / "checkpoints" / "0000001")
    assert loaded.model.conditioning == "none" and loaded.conditioner.kind == "none"
    assert loaded.description["sampling"]["cfg_scale"] == 1.0
    images = sample(tmp_path / "unet" / "checkpoints" / "0000001", tmp_path / "samples", "--num-steps", "2")
    assert images.shape == (3, 16, 16, 3)


def test_ldm_on_a_cached_autoencoder_trains_and_samples(squares, tiny_vae, tmp_path, fresh_accelerate_state,
                                                        monkeypatch):
    train.main(train.parse_args(train_argv(squares, tmp_path, "UNet-LDM-Tiny", tiny_vae, "--max-train-steps", "1")))
    caches = list((squares / ".omegadit-cache").glob("*/latents.npy"))
    assert len(caches) == 1 and np.load(caches[0]).shape == (8, 4, 8, 8)
    # The second use reads the cache and encodes nothing.
    monkeypatch.setattr(image_folder_dataset, "encode_to_cache", lambda *a, **k: pytest.fail("encoded again"))
    dataset = ImageFolderDataset(squares, tiny_vae)
    assert dataset[0][1].shape == (4, 8, 8) and dataset.latent_std.shape == (4, 1, 1)
    loaded = checkpoint.load(tmp_path / "unet" / "checkpoints" / "0000001")
    assert loaded.description["objective"]["config"]["beta_schedule"] == "ldm_linear"
    assert loaded.description["sampling"] == {"sampler": "ddim", "num_steps": 50, "cfg_scale": 3.0}
    assert loaded.autoencoder == tiny_vae
    images = sample(tmp_path / "unet" / "checkpoints" / "0000001", tmp_path / "samples", "--num-steps", "2")
    assert images.shape == (3, 16, 16, 3)


# ---------------------------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("size", [(12, 12), (16, 12)])
def test_wrong_image_size_is_named_before_training(squares, tmp_path, size, fresh_accelerate_state):
    PIL.Image.new("RGB", size).save(squares / "red" / "odd.png")
    with pytest.raises(ValueError, match=r"red/odd\.png is \d+x\d+ but .* must have one size"):
        train.main(train.parse_args(train_argv(squares, tmp_path, "UNet-Tiny", "pixel:1")))
    assert not (tmp_path / "unet" / "checkpoints").exists()


def test_class_out_of_range(squares, tmp_path, fresh_accelerate_state):
    with pytest.raises(ValueError, match="2 class folders .* --num-classes is 1"):
        train.main(train.parse_args(train_argv(squares, tmp_path, "UNet-Tiny", "pixel:1", "--num-classes", "1")))
    with pytest.raises(ValueError, match=r"class labels \[2\] are outside \[0, 2\)"):
        ClassConditioner(2)([0, 2, 1], "cpu")


def saved_tiny_unet(path):
    model = BACKBONES.build("UNet-Tiny", input_size=16, in_channels=3, num_classes=2)
    objective = build_objective(model.default_objective, **model.objective_defaults)
    description = checkpoint.describe("UNet-Tiny", model, objective, build_conditioner("class", num_classes=2),
                                      "pixel:1", (torch.zeros(3, 1, 1), torch.ones(3, 1, 1)))
    checkpoint.save_weights(path, model.state_dict(), description)
    return description


def test_checkpoint_of_another_backbone_or_config_is_refused(tmp_path, fresh_accelerate_state):
    description = saved_tiny_unet(tmp_path / "unet.safetensors")
    assert checkpoint.load(tmp_path / "unet.safetensors").model.architecture == "unet-ddpm"
    with pytest.raises(ValueError, match="not a DiT state dict"):
        checkpoint.load(tmp_path / "unet.safetensors", source_format="dit")
    torch.save(checkpoint.load_weights(tmp_path / "unet.safetensors"), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        checkpoint.load(tmp_path / "bare.pt")
    description["backbone"]["config"]["unet"]["block_out_channels"] = [32, 48]
    state = checkpoint.load_weights(tmp_path / "unet.safetensors")
    checkpoint.save_weights(tmp_path / "mismatch.safetensors", state, description)
    with pytest.raises(ValueError, match="does not hold the weights of UNet-Tiny"):
        checkpoint.load(tmp_path / "mismatch.safetensors")
    with pytest.raises(ValueError, match="not a DiT state dict"):
        generate.main(generate.parse_args(["--ckpt", str(tmp_path / "unet.safetensors"), "--ckpt-format", "dit",
                                           "--sample-dir", str(tmp_path / "s")]))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_pixel_sampling_clips_the_predicted_data(sampler):
    """With clip_denoised (ADM's and DDPM's clip_denoised for pixels) every predicted x0 is clipped to [-1, 1], so
    the sample (the last step's x0) is bounded; without it (latents) a network predicting no noise gives the
    unbounded x / sqrt(abar) of pure noise."""
    from omegadit.sampling import sample

    network = lambda x, t: torch.zeros_like(x)  # noqa: E731  (eps = 0: the predicted x0 is x / sqrt(abar))
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    outputs = {clip: sample(sampler, build_objective("gaussian", variance="fixed_large", clip_denoised=clip),
                            network, noise, 5, generator=torch.Generator().manual_seed(1))
               for clip in (False, True)}
    assert outputs[False].abs().max() > 5 and outputs[True].abs().max() <= 1.0


def test_train_clips_pixel_data_only():
    """train.py turns clip_denoised on for unnormalised pixel data and leaves it off for autoencoder latents and
    for normalised pixel latents; --no-clip-denoised / --clip-denoised decide where given; the flow objective
    refuses the flag."""
    from types import SimpleNamespace

    unet = SimpleNamespace(default_objective="gaussian", objective_defaults={"variance": "fixed_large"})
    unit = SimpleNamespace(latent_mean=torch.zeros(3, 1, 1), latent_std=torch.ones(3, 1, 1))
    scaled = SimpleNamespace(latent_mean=torch.zeros(3, 1, 1), latent_std=torch.full((3, 1, 1), 0.5))

    def clips(tokenizer, data, *argv):
        args = train.parse_args(["--exp-name", "x", "--data-dir", "d", "--tokenizer", tokenizer, *argv])
        return train.build_objective(args, unet, data).clip_denoised

    assert clips("pixel:1", unit) and not clips("pixel:1", unit, "--no-clip-denoised")
    assert not clips("stabilityai/sd-vae-ft-ema", unit) and not clips("pixel:2", scaled)
    assert clips("stabilityai/sd-vae-ft-ema", unit, "--clip-denoised")
    with pytest.raises(ValueError, match="does not take --clip-denoised"):
        train.build_objective(train.parse_args(["--exp-name", "x", "--data-dir", "d", "--clip-denoised"]),
                              SimpleNamespace(default_objective="flow", objective_defaults={}), unit)
