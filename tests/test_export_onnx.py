"""python -m omegadit.export onnx: the denoiser and the latent decoder in onnxruntime (CPU) give what torch gives,
within 1e-4, for batch sizes 1 and 3; the JSON sidecar is enough to sample without torch."""
import json

import numpy as np
import pytest
import torch

from omegadit import checkpoint
from omegadit.conditioners import ClassConditioner
from omegadit.export.__main__ import main as export_main
from test_export_diffusers import PROMPTS, small_random, text_ckpt, write_checkpoint  # noqa: F401  (fixture)

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def exported(text_ckpt, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_main(["onnx", str(text_ckpt), str(out)])
    return out


def test_denoiser_and_decoder_match_torch_for_batch_1_and_3(exported, text_ckpt):  # noqa: F811
    loaded = checkpoint.load(text_ckpt)
    denoiser = session(exported)
    assert [(i.name, i.shape) for i in denoiser.get_inputs()] == [
        ("latents", ["batch", 48, 8, 8]), ("timestep", ["batch"]), ("encoder_hidden_states", ["batch", 16, 384])]
    assert [(o.name, o.shape) for o in denoiser.get_outputs()] == [("model_output", ["batch", 48, 8, 8])]
    decoder = session(exported.with_suffix(".decoder.onnx"))
    mean, std = loaded.latent_stats
    g = torch.Generator().manual_seed(11)
    for batch in (1, 3):
        x, t, y = torch.randn(batch, 48, 8, 8, generator=g), torch.rand(batch, generator=g), torch.randn(
            batch, 16, 384, generator=g)
        with torch.no_grad():
            expected = loaded.model(x, t, y)[0].numpy()
        (got,) = denoiser.run(None, {"latents": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": y.numpy()})
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4
        (images,) = decoder.run(None, {"latents": x.numpy()})
        expected_images = torch.nn.functional.pixel_shuffle(x * std + mean, 4).numpy()
        assert images.shape == (batch, 3, 32, 32) and np.abs(images - expected_images).max() <= 1e-5
    report = json.loads(exported.with_suffix(".json").read_text())["check"]
    assert set(report["denoiser_max_abs_error"]) == {"1", "3"}


def test_sidecar_is_enough_to_sample_with_onnxruntime_alone(exported, text_ckpt):  # noqa: F811
    """Euler on the ODE with guidance, written against OUT.json and onnxruntime only (as another language would),
    gives our sampler's latents."""
    from omegadit.sampling import sample
    from omegadit.sampling.guidance import GuidedNetwork

    info = json.loads(exported.with_suffix(".json").read_text())
    times = info["sampling"]["ode_times"]
    assert len(times) == info["sampling"]["ode_num_steps"] + 1 == 4
    null = np.asarray(info["null_condition"], dtype=np.float32)
    loaded = checkpoint.load(text_ckpt)
    y = loaded.conditioner.load("cpu")(PROMPTS, "cpu")
    noise = torch.randn(len(PROMPTS), 48, 8, 8, generator=torch.Generator().manual_seed(3))
    denoiser, scale = session(exported), 2.0
    x = noise.numpy()
    for t_cur, t_next in zip(times[:-1], times[1:]):
        both = np.concatenate([x, x])
        condition = np.concatenate([y.numpy(), np.broadcast_to(null, y.shape)]).astype(np.float32)
        (out,) = denoiser.run(None, {"latents": both, "timestep": np.full(len(both), t_cur, np.float32),
                                     "encoder_hidden_states": condition})
        cond, uncond = np.split(out, 2)
        x = x + np.float32(t_next - t_cur) * (uncond + scale * (cond - uncond))
    network = GuidedNetwork(loaded.model, loaded.objective, y, scale=scale)
    expected = sample("euler", loaded.objective, network, noise, 3).numpy()
    assert np.abs(x - expected).max() <= 1e-4


def test_class_model_with_diffusers_autoencoder_decoder(tmp_path):
    from diffusers import AutoencoderKL

    from models.tokenizers import load_tokenizer

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=32)
    small_random(vae, seed=3, std=0.1).save_pretrained(str(tmp_path / "vae"))
    model = small_random(SiT_class(), seed=4)
    stats = (torch.tensor([0.1, -0.2, 0.0, 0.3]).view(-1, 1, 1), torch.tensor([1.5, 0.5, 1.0, 2.0]).view(-1, 1, 1))
    ckpt = write_checkpoint(tmp_path / "ckpt", model, ClassConditioner(3), str(tmp_path / "vae"), stats)
    out = tmp_path / "out" / "class.onnx"
    export_main(["onnx", str(ckpt), str(out)])
    denoiser = session(out)
    assert [i.name for i in denoiser.get_inputs()] == ["latents", "timestep", "class_labels"]
    decoder = session(out.with_suffix(".decoder.onnx"))
    tokenizer = load_tokenizer(str(tmp_path / "vae"))
    for batch in (1, 3):
        x = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(batch))
        labels = torch.arange(batch) % 3
        t = torch.full((batch,), 0.5)
        with torch.no_grad():
            expected = model(x, t, labels)[0].numpy()
            expected_images = tokenizer.vae.decode(x * stats[1] + stats[0]).numpy()
        (got,) = denoiser.run(None, {"latents": x.numpy(), "timestep": t.numpy(), "class_labels": labels.numpy()})
        assert np.abs(got - expected).max() <= 1e-4
        (images,) = decoder.run(None, {"latents": x.numpy()})
        assert images.shape == (batch, 3, 32, 32) and np.abs(images - expected_images).max() <= 1e-4
    assert json.loads(out.with_suffix(".json").read_text())["null_condition"] == 3  # the null class index


def SiT_class():
    from models.sit import SiT
    return SiT(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=2, num_classes=3,
               z_dims=[])


def test_missing_optional_packages_are_named(monkeypatch, text_ckpt, tmp_path):  # noqa: F811
    import importlib.util

    from omegadit.export import onnx as onnx_export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install onnxscript"):
        onnx_export.export_onnx(text_ckpt, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
