"""python -m omegadit.export diffusers: the folder loads with diffusers.DiffusionPipeline.from_pretrained as our
pipeline, round-trips through save_pretrained, and samples what generate.py samples (tiny SiT, pixel tokenizer,
MiniLM; a tiny random diffusers AutoencoderKL for the VAE path)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from models.sit import SiT
from omegadit import checkpoint
from omegadit.conditioners import ClassConditioner, TextConditioner
from omegadit.export.__main__ import main as export_main
from omegadit.objectives.flow import FlowMatching
from json_label_dataset import load_latent_stats
from test_generate import small_random

PROMPTS = ["a red circle on the left", "a small blue square at the top", "a large green triangle"]


def write_checkpoint(ckpt, model, conditioner, autoencoder, stats, sampling=None):
    """A train.py-style checkpoint directory whose weights describe themselves."""
    ckpt.mkdir(parents=True)
    description = checkpoint.describe("SiT-test", model, FlowMatching(time_shifting=True), conditioner, autoencoder,
                                      stats, sampling or {"sampler": "sde", "num_steps": 3, "cfg_scale": 2.0})
    for name in ("ema.safetensors", "model.safetensors"):
        checkpoint.save_weights(ckpt / name, model.state_dict(), description)
    return ckpt


@pytest.fixture(scope="module")
def text_ckpt(text_dataset, minilm, tmp_path_factory):
    model = small_random(SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=64, depth=4, num_heads=2,
                             text_dim=384, text_len=16, z_dims=[]))
    stats = load_latent_stats(text_dataset / "vae-in" / "latents_stats.pt")
    return write_checkpoint(tmp_path_factory.mktemp("text") / "exp" / "checkpoints" / "0000010", model,
                            TextConditioner(minilm, 16), "pixel", stats)


@pytest.fixture(scope="module")
def exported(text_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "pipe"
    export_main(["diffusers", str(text_ckpt), str(out)])
    return out


def load_pipeline(folder):
    import diffusers

    import omegadit.export.diffusers_pipeline  # noqa: F401  (registers OmegaDiTPipeline with diffusers)
    return diffusers.DiffusionPipeline.from_pretrained(str(folder))


def run_generate(ckpt, tmp_path, name, *extra):
    prompts = tmp_path / f"{name}_prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    generate.main(generate.parse_args(["--ckpt", str(ckpt), "--prompts-file", str(prompts), "--sample-dir",
                                       str(tmp_path), "--name", name, "--num-steps", "3", "--cfg-scale", "2.0",
                                       "--mixed-precision", "no", "--global-seed", "5", *extra]))
    return [np.asarray(Image.open(tmp_path / name / f"{i:06d}.png")) for i in range(len(PROMPTS))]


def test_folder_layout_loads_as_our_pipeline_without_remote_code(exported):
    from omegadit.export.diffusers_pipeline import OmegaDiTPipeline, OmegaDiTTransformer

    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "OmegaDiTPipeline"
    assert index["transformer"] == ["omegadit.export.diffusers_pipeline", "OmegaDiTTransformer"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["vae"] == [None, None]  # the pixel tokenizer has no VAE
    assert index["text_encoder"][0] == "transformers" and index["tokenizer"][0] == "transformers"
    assert not list(exported.rglob("*.py"))  # no code ships with the folder
    config = json.loads((exported / "transformer" / "config.json").read_text())
    assert config["description"]["backbone"]["architecture"] == "sit"
    pipe = load_pipeline(exported)
    assert isinstance(pipe, OmegaDiTPipeline) and isinstance(pipe.transformer, OmegaDiTTransformer)
    assert OmegaDiTPipeline.from_pretrained(str(exported)).transformer.config == pipe.transformer.config
    # the scheduler's shift is the objective's resolution shift, sqrt(C H W / shift_base)
    assert pipe.scheduler.config.shift == pytest.approx((48 * 8 * 8 / 4096) ** 0.5, rel=1e-9)


def test_euler_ode_and_sde_give_generate_py_images(exported, text_ckpt, tmp_path):
    pipe = load_pipeline(exported)
    for mode, sampler in (("ode", None), ("sde", "sde")):
        reference = run_generate(text_ckpt, tmp_path, mode, "--mode", mode)
        images = pipe(PROMPTS, num_inference_steps=3, guidance_scale=2.0, seed=5, sampler=sampler).images
        for ours, theirs in zip(images, reference):
            difference = np.abs(np.asarray(ours).astype(int) - theirs.astype(int))
            assert difference.max() <= 1 and difference.mean() < 0.01, (mode, difference.max())
    assert len({np.asarray(i).tobytes() for i in images}) == len(PROMPTS)
    assert all(np.asarray(i).std() > 5 for i in images)  # not saturated: a difference would show


def test_scheduler_reproduces_our_euler_grid_in_float32(exported, text_ckpt):
    from omegadit.sampling import sample
    from omegadit.sampling.guidance import GuidedNetwork

    pipe = load_pipeline(exported)
    generators = [torch.Generator().manual_seed(7 * 1_000_003 + i) for i in range(len(PROMPTS))]
    noise = torch.stack([torch.randn(pipe.transformer.latent_shape, generator=g) for g in generators])
    via_scheduler = pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, latents=noise, output_type="latent")
    loaded = checkpoint.load(text_ckpt)
    conditioner = loaded.conditioner.load("cpu")
    network = GuidedNetwork(loaded.model, loaded.objective, conditioner(PROMPTS, "cpu"), scale=3.0)
    ours = sample("euler", loaded.objective, network, noise, 5)
    torch.testing.assert_close(via_scheduler.images, ours, rtol=0, atol=1e-5)
    # the same seed through the seed argument and through per-image generators
    by_seed = pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, seed=7, output_type="latent").images
    torch.testing.assert_close(by_seed, ours, rtol=0, atol=1e-5)


def test_save_pretrained_round_trip(exported, tmp_path):
    pipe = load_pipeline(exported)
    pipe.save_pretrained(str(tmp_path / "again"))
    again = load_pipeline(tmp_path / "again")
    assert again.transformer.config.description == pipe.transformer.config.description
    for (name, a), b in zip(pipe.transformer.state_dict().items(), again.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    kwargs = dict(num_inference_steps=2, guidance_scale=2.0, seed=1, output_type="pt")
    torch.testing.assert_close(pipe(PROMPTS[:2], **kwargs).images, again(PROMPTS[:2], **kwargs).images,
                               rtol=0, atol=0)


def test_class_model_and_diffusers_autoencoder(tmp_path):
    """A class-conditional SiT on the latents of a (tiny, random) diffusers AutoencoderKL: the export carries the
    VAE as a diffusers component and decodes as generate.py does."""
    from diffusers import AutoencoderKL

    vae_dir = tmp_path / "vae"
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32)
    small_random(vae, seed=3, std=0.1).save_pretrained(str(vae_dir))
    model = small_random(SiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=2,
                             num_classes=3, z_dims=[]), seed=4)
    stats = (torch.tensor([0.1, -0.2, 0.0, 0.3]).view(-1, 1, 1), torch.tensor([1.5, 0.5, 1.0, 2.0]).view(-1, 1, 1))
    ckpt = write_checkpoint(tmp_path / "ckpt", model, ClassConditioner(3), str(vae_dir), stats)
    export_main(["diffusers", str(ckpt), str(tmp_path / "pipe")])
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == [None, None]
    pipe = load_pipeline(tmp_path / "pipe")
    images = pipe(class_labels=[0, 1, 2, 0], num_inference_steps=3, guidance_scale=2.0, seed=5, sampler="sde").images
    generate.main(generate.parse_args(["--ckpt", str(ckpt), "--balanced-sampling", "--num-fid-samples", "4",
                                       "--sample-dir", str(tmp_path), "--name", "c", "--mode", "sde",
                                       "--num-steps", "3", "--cfg-scale", "2.0", "--mixed-precision", "no",
                                       "--global-seed", "5"]))
    for i, image in enumerate(images):
        reference = np.asarray(Image.open(tmp_path / "c" / f"{i:06d}.png")).astype(int)
        assert image.size == (32, 32)
        assert np.abs(np.asarray(image).astype(int) - reference).max() <= 1


def test_bfloat16_weights_sample_under_autocast(exported):
    full = load_pipeline(exported)
    half = load_pipeline(exported).to(torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16
    kwargs = dict(num_inference_steps=2, guidance_scale=2.0, seed=2, output_type="pt")
    a, b = full(PROMPTS[:1], **kwargs).images, half(PROMPTS[:1], **kwargs).images
    assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.05
