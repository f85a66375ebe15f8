"""DiT, LightningDiT and U-ViT through train.py and generate.py: training with resume, sampling to PNGs + ADM npz, and
checkpoints in the layouts their projects released, recognised and sampled."""
import shutil

import numpy as np
import pytest
import torch

import generate
import train
from conftest import add_shape_class_labels
from models.dit import DiT
from models.lightningdit import LightningDiT
from models.pos_embed import rope_2d_tables
from models.uvit import UViT
from omegadit import checkpoint


@pytest.fixture
def class_data(text_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(text_dataset, data)
    return add_shape_class_labels(data)


def train_argv(data, out, model, *extra):
    return ["--exp-name", "peer", "--output-dir", str(out), "--data-dir", str(data), "--num-classes", "3",
            "--tokenizer", "pixel", "--model", model, "--enc-type", "none", "--cfm-coeff", "0", "--batch-size", "4",
            "--num-workers", "0", "--log-every", "1", "--mixed-precision", "no", "--learning-rate", "1e-4", *extra]


def sample(ckpt, out, *extra):
    generate.main(generate.parse_args(["--ckpt", str(ckpt), "--sample-dir", str(out), "--name", "s",
                                       "--num-fid-samples", "3", "--balanced-sampling", "--mixed-precision", "no",
                                       *extra]))
    with np.load(out / "s.npz") as f:
        return f["arr_0"]


def test_dit_trains_resumes_and_samples(class_data, tmp_path, fresh_accelerate_state):
    train.main(train.parse_args(train_argv(class_data, tmp_path, "DiT-S/4", "--max-train-steps", "2",
                                           "--checkpointing-steps", "1")))
    train.main(train.parse_args(train_argv(class_data, tmp_path, "DiT-S/4", "--max-train-steps", "3",
                                           "--checkpointing-steps", "1", "--resume", "latest")))
    exp = tmp_path / "peer"
    log = (exp / "log.txt").read_text()
    assert "objective gaussian" in log and "at step 2" in log
    assert '"loss_vb"' in (exp / "metrics.jsonl").read_text()
    loaded = checkpoint.load(exp / "checkpoints" / "0000003")
    assert loaded.description["sampling"]["guidance_channels"] == 3
    images = sample(exp / "checkpoints" / "0000003", tmp_path / "samples", "--sampler", "ddim", "--num-steps", "4")
    assert images.shape == (3, 32, 32, 3)


def test_lightningdit_trains_and_samples(class_data, tmp_path, fresh_accelerate_state):
    train.main(train.parse_args(train_argv(class_data, tmp_path, "LightningDiT-B/2", "--max-train-steps", "1",
                                           "--checkpointing-steps", "1")))
    assert "objective lightningdit-flow" in (tmp_path / "peer" / "log.txt").read_text()
    images = sample(tmp_path / "peer" / "checkpoints" / "0000001", tmp_path / "samples", "--num-steps", "2")
    assert images.shape == (3, 32, 32, 3)


def released_dit(path):
    """A small DiT saved as DiT releases its weights: a bare state dict in a .pt."""
    model = DiT(input_size=8, patch_size=4, in_channels=12, hidden_size=384, depth=12, num_heads=6, num_classes=3)
    torch.save(model.state_dict(), path)
    return model


def released_lightningdit(path):
    """A small LightningDiT saved as its train.py does: {'ema': ...} in its key layout (with RoPE tables)."""
    model = LightningDiT(input_size=8, patch_size=2, in_channels=12, hidden_size=64, depth=2, num_heads=4,
                         num_classes=3)
    state = dict(model.state_dict())
    cos, sin = rope_2d_tables(16, 4)
    state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = cos, sin
    torch.save({"ema": {f"module.{k}": v for k, v in state.items()}, "opt": {}}, path)
    return model


def released_uvit(path):
    """A small class-conditional U-ViT saved as U-ViT releases nnet_ema.pth: a bare state dict."""
    model = UViT(input_size=8, patch_size=2, in_channels=12, hidden_size=64, depth=4, num_heads=1, num_classes=3,
                 conv=True)
    torch.save(model.state_dict(), path)
    return model


@pytest.mark.parametrize("release", [released_dit, released_lightningdit, released_uvit])
def test_released_checkpoints_are_recognised_and_sampled(release, tmp_path):
    model = release(tmp_path / "released.pt")
    loaded = checkpoint.load(tmp_path / "released.pt")
    assert type(loaded.model) is type(model) and loaded.model.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.model.state_dict().items())
    # DiT's latent statistics are fixed (x 0.18215); LightningDiT's come from its latents_stats.pt.
    torch.save({"mean": torch.zeros(12), "std": torch.ones(12)}, tmp_path / "latents_stats.pt")
    stats_flag = ["--latent-stats", str(tmp_path / "latents_stats.pt")] if release is released_lightningdit else []
    assert (loaded.latent_stats is None) == (release is released_lightningdit)
    images = sample(tmp_path / "released.pt", tmp_path / "samples", "--tokenizer", "pixel:2", "--num-steps", "3",
                    *stats_flag)
    assert images.shape == (3, 16, 16, 3)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    released_dit(tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="LightningDiT"):
        checkpoint.load(tmp_path / "dit.pt", source_format="lightningdit")
