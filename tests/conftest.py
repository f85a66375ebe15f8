"""Shared test helpers: repository on sys.path, reference fixtures, small threads."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURES_DIR = Path(os.environ.get("OMEGADIT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))

# Under pytest-xdist (`make test` runs one worker per core) each worker keeps to one thread.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int) -> list:
    """The argv prefix of `accelerate launch` for CPU processes on a port of their own (tests run in parallel)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no"]


def fixture_path(name: str) -> Path:
    """Path of a reference fixture; fails under CI=true and skips elsewhere when it is missing."""
    path = FIXTURES_DIR / name
    if not path.exists():
        message = f"reference fixture {path} is missing (set OMEGADIT_FIXTURES or check out ../shared/fixtures)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def load_fixture_file(name: str, prefix: str = "model."):
    """(metadata dict, the tensors under `prefix` with the prefix stripped (a model's state dict), every tensor)
    of a safetensors fixture."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = fixture_path(name)
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["json"])
    tensors = load_file(str(path))
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return meta, state, tensors


def randomize(model, seed=0, std=0.2):
    """Give every trainable weight a random value, so that zero-initialised layers cannot hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def count_checkpointed_blocks(monkeypatch) -> list:
    """Patch the backbones' activation checkpointing to record each checkpointed call; returns the record."""
    import models.backbone
    from torch.utils.checkpoint import checkpoint

    calls = []

    def counting(function, *args, **kwargs):
        calls.append(function)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(models.backbone, "checkpoint", counting)
    return calls


def make_text_dataset(root, num=32, resolution=32, seed=0, holdout=()):
    """The demo shapes dataset at a tiny size, encoded with the weight-free pixel tokenizer, with latent statistics."""
    from demo.shapes import make_dataset
    from json_label_dataset import JsonLabelDataset
    from preprocessing.dataset_tools import encode

    make_dataset(root, num, resolution=resolution, seed=seed, holdout=holdout, num_prompts=8)
    encode(Path(root) / "images", Path(root) / "vae-in", "pixel", gpus=0, batch_size=64, workers=0)
    JsonLabelDataset(root)
    return Path(root)


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory):
    return make_text_dataset(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def minilm():
    from models.text_encoder import minilm_path
    return str(minilm_path())


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide state; reset it so that each in-process run starts clean."""
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def add_shape_class_labels(root):
    """vae-in/dataset.json for a shapes dataset: each image's class is the index of its shape (3 classes)."""
    import json

    from demo.shapes import SHAPES, parse_caption

    entries = json.loads((Path(root) / "labels.json").read_text())
    labels = [[f"{e['id']}.npy", SHAPES.index(parse_caption(e["en"])["shape"])] for e in entries]
    (Path(root) / "vae-in" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return Path(root)


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory):
    """A small valid dataset (tests/data_faults.py) to inject faults into copies of."""
    from data_faults import make_clean_dataset
    return make_clean_dataset(tmp_path_factory.mktemp("clean"))


@pytest.fixture
def data(tmp_path, clean_dataset):
    """A fresh copy of clean_dataset for one test to damage."""
    from data_faults import copy_dataset
    return copy_dataset(clean_dataset, tmp_path / "data")
