"""The exports beyond SiT: a DiT (Gaussian diffusion, DDIM), a LightningDiT (its flow, Euler) and a U-ViT (discrete
epsilon, DPM-Solver), each a tiny class-conditional model on the pixel tokenizer, leave as a diffusers pipeline that
samples what generate.py samples and as an ONNX denoiser that computes what torch computes."""
import numpy as np
import pytest
import torch
from PIL import Image

import generate
from models.dit import DiT
from models.lightningdit import LightningDiT
from models.uvit import UViT
from omegadit import checkpoint
from omegadit.conditioners import ClassConditioner
from omegadit.export.__main__ import main as export_main
from omegadit.objectives import build_objective
from test_export_diffusers import load_pipeline, small_random

PEERS = {
    "DiT": lambda: DiT(input_size=8, patch_size=2, in_channels=48, hidden_size=32, depth=2, num_heads=2, num_classes=3),
    "LightningDiT": lambda: LightningDiT(input_size=8, patch_size=2, in_channels=48, hidden_size=32, depth=2,
                                         num_heads=2, num_classes=3),
    "U-ViT": lambda: UViT(input_size=8, patch_size=2, in_channels=48, hidden_size=32, depth=2, num_heads=2,
                          num_classes=3),
}


def peer_checkpoint(root, name):
    """A train.py-style checkpoint of a tiny random peer model with its own objective and sampling defaults."""
    model = small_random(PEERS[name](), seed=1, std=0.05)
    objective = build_objective(model.default_objective, **model.objective_defaults)
    stats = (torch.zeros(48, 1, 1), torch.full((48, 1, 1), 0.5))
    sampling = {**model.sampling_defaults, "num_steps": 4, "cfg_scale": 2.0}
    description = checkpoint.describe(f"{name}-test", model, objective, ClassConditioner(3), "pixel", stats, sampling)
    ckpt = root / "checkpoints" / "0000010"
    ckpt.mkdir(parents=True)
    for file in ("ema.safetensors", "model.safetensors"):
        checkpoint.save_weights(ckpt / file, model.state_dict(), description)
    return ckpt, model


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_exports_sample_like_generate_py(name, tmp_path):
    ckpt, model = peer_checkpoint(tmp_path / name, name)
    export_main(["diffusers", str(ckpt), str(tmp_path / "pipe")])
    pipe = load_pipeline(tmp_path / "pipe")
    images = pipe(class_labels=[0, 1, 2], seed=5).images  # the checkpoint's sampler, steps and guidance
    generate.main(generate.parse_args(["--ckpt", str(ckpt), "--balanced-sampling", "--num-fid-samples", "3",
                                       "--sample-dir", str(tmp_path), "--name", "g", "--mixed-precision", "no",
                                       "--global-seed", "5"]))
    for i, image in enumerate(images):
        reference = np.asarray(Image.open(tmp_path / "g" / f"{i:06d}.png")).astype(int)
        assert np.abs(np.asarray(image).astype(int) - reference).max() <= 1, (name, i)
    assert np.asarray(images[0]).std() > 5  # not a flat image: a difference would show

    pytest.importorskip("onnxruntime")
    export_main(["onnx", str(ckpt), str(tmp_path / "m.onnx")])
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x, t = torch.randn(batch, 48, 8, 8, generator=g), torch.rand(batch, generator=g)
        labels = torch.arange(batch) % 3
        network_time = pipe.transformer.objective().network_time(t)
        with torch.no_grad():
            expected = model(x, network_time, labels)[0].numpy()
        (got,) = session.run(None, {"latents": x.numpy(), "timestep": network_time.numpy(),
                                    "class_labels": labels.numpy()})
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4, name
