"""The registries as a user extends them: a backbone and an objective defined in this file alone train,
checkpoint, resume and sample through train.py and generate.py; checkpoints sample with their data deleted."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn

import generate
import train
from models import ARCHITECTURES, BACKBONES
from models.backbone import Backbone
from omegadit.objectives import OBJECTIVES
from omegadit.objectives.base import Objective, ObjectiveOutput, mean_flat
from omegadit.registry import Registry


@ARCHITECTURES.register("test-mixer")
class TokenMixer(Backbone):
    """A small text-conditioned network: per-pixel MLP on [x, time, pooled caption]."""

    architecture = "test-mixer"
    default_objective = "test-x0"

    def __init__(self, input_size, in_channels, text_dim, text_len, hidden=32):
        super().__init__()
        self.config = dict(input_size=input_size, in_channels=in_channels, text_dim=text_dim, text_len=text_len,
                           hidden=hidden)
        self.caption = nn.Linear(text_dim, hidden)
        self.inp = nn.Conv2d(in_channels + 1, hidden, 1)
        self.out = nn.Conv2d(hidden, in_channels, 1)
        self.register_buffer("null_caption", torch.zeros(text_len, text_dim))

    @property
    def conditioning(self):
        return "text"

    def null_condition(self, batch_size, device=None):
        return self.null_caption.expand(batch_size, -1, -1).to(device)

    def forward(self, x, t, y):
        time = t.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]).to(x.dtype)
        h = self.inp(torch.cat([x, time], dim=1)) + self.caption(y.mean(dim=1))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h)), {}


BACKBONES.register("Test-Mixer", TokenMixer)


@OBJECTIVES.register("test-x0")
class DataPrediction(Objective):
    """Predicts the clean data on the linear path x_t = (1 - t) x0 + t eps; velocity (x_t - x0_hat) / t."""

    name = "test-x0"
    family = "flow"
    default_sampler = "euler"
    term_names = ("x0_mse",)

    def __call__(self, model, x0, model_kwargs=None, generator=None):
        t = torch.rand(x0.shape[0], 1, 1, 1, generator=generator).to(x0) * 0.9 + 0.1
        x_t = (1 - t) * x0 + t * torch.randn(x0.shape, generator=generator).to(x0)
        prediction, aux = model(x_t, t.flatten(), **(model_kwargs or {}))
        return ObjectiveOutput({"x0_mse": mean_flat((prediction - x0) ** 2)}, prediction, x0, t, aux)

    def network_time(self, t):
        return t

    def sampling_times(self, num_steps, stochastic, shift_dim=1):
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()

    def velocity(self, output, x, t):
        return (x - output) / t


def train_args(data, out, minilm, *extra):
    return ["--exp-name", "mixer", "--output-dir", str(out), "--data-dir", str(data), "--use-json-dataset",
            "--text-encoder", minilm, "--text-len", "8", "--tokenizer", "pixel", "--model", "Test-Mixer",
            "--enc-type", "none", "--cfm-coeff", "0", "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
            "--mixed-precision", "no", "--learning-rate", "1e-3", "--checkpointing-steps", "1", *extra]


def copy_dataset(text_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(text_dataset, data)
    return data


def test_registry_rejects_unknown_and_duplicate_names():
    registry = Registry("widget")
    registry.register("a", int)
    with pytest.raises(ValueError, match="unknown widget 'b'; known: a"):
        registry.get("b")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", float)


def test_new_backbone_and_objective_train_resume_and_sample(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    data = copy_dataset(text_dataset, tmp_path)
    train.main(train.parse_args(train_args(data, tmp_path, minilm, "--max-train-steps", "2")))
    train.main(train.parse_args(train_args(data, tmp_path, minilm, "--max-train-steps", "3", "--resume", "latest")))
    exp = tmp_path / "mixer"
    assert "resumed from" in (exp / "log.txt").read_text() and "at step 2" in (exp / "log.txt").read_text()
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all("loss_x0_mse" in r for r in records)
    shutil.rmtree(data)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    generate.main(generate.parse_args(["--ckpt", str(exp / "checkpoints" / "0000003"), "--prompts-file",
                                       str(tmp_path / "prompts.txt"), "--sample-dir", str(tmp_path / "samples"),
                                       "--name", "m", "--num-steps", "4", "--cfg-scale", "2.0",
                                       "--mixed-precision", "no"]))
    with np.load(tmp_path / "samples" / "m.npz") as f:
        assert f["arr_0"].shape == (2, 32, 32, 3)


def test_sit_checkpoint_samples_after_its_data_is_deleted(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    data = copy_dataset(text_dataset, tmp_path)
    train.main(train.parse_args(["--exp-name", "sit", "--output-dir", str(tmp_path), "--data-dir", str(data),
                                 "--use-json-dataset", "--text-encoder", minilm, "--text-len", "8", "--tokenizer",
                                 "pixel", "--model", "SiT-T/4", "--enc-type", "none", "--batch-size", "4",
                                 "--num-workers", "0", "--mixed-precision", "no", "--max-train-steps", "1"]))
    shutil.copy(data / "seen_prompts.txt", tmp_path / "prompts.txt")
    shutil.rmtree(data)
    argv = ["--ckpt", str(tmp_path / "sit" / "checkpoints" / "0000001"), "--prompts-file", str(tmp_path / "prompts.txt"),
            "--sample-dir", str(tmp_path / "samples"), "--name", "s", "--mode", "ode", "--num-steps", "2",
            "--mixed-precision", "no"]
    generate.main(generate.parse_args(argv))
    with np.load(tmp_path / "samples" / "s.npz") as f:
        assert f["arr_0"].shape[1:] == (32, 32, 3)


def test_backbone_options_it_does_not_take_are_refused(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    with pytest.raises(ValueError, match="Test-Mixer does not take --qk-norm"):
        train.main(train.parse_args(train_args(text_dataset, tmp_path, minilm, "--qk-norm")))
