"""omegadit.files and the loaders built on it: errors name the file, and no pickle runs code."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dataset import read_class_labels
from json_label_dataset import load_latent_stats, read_labels
from models.repa_encoders import build_repa_encoder
from models.vavae import load_ldm_checkpoint


class RunsCode:
    """Pickles as a call to os.system: loading it with plain pickle would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious(tmp_path):
    """A .pt file whose 'mean' would run `touch <marker>` when unpickled; the marker must never appear."""
    path = tmp_path / "latents_stats.pt"
    marker = tmp_path / "code-ran"
    torch.save({"mean": RunsCode(marker), "std": torch.ones(3)}, path)
    yield path
    assert not marker.exists()


def files_function(name: str):
    """omegadit.files.<name>, imported when a test calls it."""
    from omegadit import files
    return getattr(files, name)


def tiny_repa_encoder():
    return build_repa_encoder("dinov2-vit-s", resolution=32, depth=1)


def loaders(path):
    """Every loader of a .pt / .safetensors file, each called on `path`."""
    return {"load_latent_stats": lambda: load_latent_stats(path),
            "load_ldm_checkpoint": lambda: load_ldm_checkpoint(path),
            "RepaEncoder.load_weights": lambda: tiny_repa_encoder().load_weights(path)}


@pytest.mark.parametrize("loader", ["load_torch", *loaders(None)])
def test_pickle_that_runs_code_is_refused(malicious, loader):
    load = loaders(malicious).get(loader) or (lambda: files_function(loader)(malicious))
    with pytest.raises(RuntimeError) as info:
        load()
    message = str(info.value)
    assert f"refusing to load code from {malicious}" in message and "system" in message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message


@pytest.mark.parametrize("loader", ["load_safetensors", "load_ldm_checkpoint", "RepaEncoder.load_weights"])
def test_truncated_safetensors_names_the_file(tmp_path, loader):
    path = tmp_path / "weights.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(64, 3, 3, 3)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    load = loaders(path).get(loader) or (lambda: files_function(loader)(path))
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        load()
    assert str(path) in str(info.value)


def test_missing_safetensors_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.safetensors")):
        files_function("load_safetensors")(tmp_path / "absent.safetensors")


def test_pickled_npy_is_refused(tmp_path):
    path = tmp_path / "latent.npy"
    np.save(path, np.array([RunsCode(tmp_path / "code-ran")], dtype=object), allow_pickle=True)
    with pytest.raises(RuntimeError, match=f"refusing to load code from {path}"):
        files_function("load_npy")(path)
    assert not (tmp_path / "code-ran").exists()


def test_truncated_torch_file_names_the_file(tmp_path):
    path = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.zeros(4, 1, 1), "std": torch.ones(4, 1, 1)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable torch file") as info:
        load_latent_stats(path)
    assert str(path) in str(info.value)


BROKEN_JSON = {"read_json": ('[{"id": "a", "en": "x"},\n {"id": "b", "en": }]', 20),
               "read_labels": ('[{"id": "a", "en": "x"},\n {"id": "b", "en": }]', 20),
               "read_class_labels": ('{"labels":\n [["a.png", 0],]}', 16)}


@pytest.mark.parametrize("reader", sorted(BROKEN_JSON))
def test_broken_json_names_file_line_and_column(tmp_path, reader):
    path = tmp_path / "labels.json"
    text, column = BROKEN_JSON[reader]
    path.write_text(text)
    read = {"read_labels": read_labels, "read_class_labels": read_class_labels}.get(reader) or files_function(reader)
    with pytest.raises(ValueError, match=f"invalid JSON at line 2 column {column}") as info:
        read(path)
    assert str(path) in str(info.value)


def test_non_utf8_json_names_position_and_entry(tmp_path):
    path = tmp_path / "labels.json"
    path.write_bytes(json.dumps([{"id": "a", "en": "x"}, {"id": "b", "en": "Z"}], indent=1).encode()
                     .replace(b"Z", b"caf\xe9"))
    with pytest.raises(ValueError) as info:
        files_function("read_json")(path)
    message = str(info.value)
    assert str(path) in message and "byte 0xe9 at line 8 column 13" in message and 'entry [1]["en"]' in message
