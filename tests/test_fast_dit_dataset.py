"""fast-DiT's pre-extracted latents (fast_dit_dataset.py): train.py --data-dir FEATURES_PATH trains DiT on them
directly, records the SD-VAE and the latent statistics that decode them, and refuses bad files and REPA."""
import json

import numpy as np
import pytest
import torch

import train
from fast_dit_dataset import FastDiTFeatures, feature_folders
from models.dit import SD_VAE_SCALE
from omegadit import checkpoint
from omegadit.data_checks import DataFileError


def write_features(root, labels, name="imagenet256", side=4):
    """fast-DiT's extract_features.py output: <name>_features/<i>.npy (1, 4, side, side) float32 latents (already
    x 0.18215) and <name>_labels/<i>.npy (1,) int64 labels."""
    rng = np.random.default_rng(0)
    (root / f"{name}_features").mkdir(parents=True)
    (root / f"{name}_labels").mkdir()
    for i, label in enumerate(labels):
        np.save(root / f"{name}_features" / f"{i}.npy", rng.standard_normal((1, 4, side, side)).astype(np.float32))
        np.save(root / f"{name}_labels" / f"{i}.npy", np.array([label], dtype=np.int64))
    return root


def train_args(data, out, *extra):
    return train.parse_args(["--exp-name", "fastdit", "--output-dir", str(out), "--data-dir", str(data),
                             "--model", "DiT-S/4", "--num-classes", "3", "--enc-type", "none", "--cfm-coeff", "0",
                             "--batch-size", "2", "--num-workers", "0", "--mixed-precision", "no",
                             "--max-train-steps", "1", *extra])


def test_train_py_trains_dit_on_fast_dit_features(tmp_path):
    data = write_features(tmp_path / "features", [0, 2, 1, 2])
    dataset = FastDiTFeatures(data)
    image, latent, label = dataset[1]
    assert image.numel() == 0 and dataset.resolution == 32 and label == 2
    stored = np.load(data / "imagenet256_features" / "1.npy")[0]
    assert torch.equal(latent, torch.from_numpy(stored))  # used as stored: already scaled by 0.18215
    train.main(train_args(data, tmp_path / "exps"))
    loaded = checkpoint.load(tmp_path / "exps" / "fastdit" / "checkpoints" / "0000001")
    assert loaded.autoencoder == "stabilityai/sd-vae-ft-ema"
    mean, std = loaded.latent_stats
    assert torch.all(mean == 0) and torch.allclose(std, torch.full_like(std, 1 / SD_VAE_SCALE))
    assert loaded.objective.name == "gaussian" and loaded.objective.clip_denoised is False
    args = json.loads((tmp_path / "exps" / "fastdit" / "args.json").read_text())
    assert args["tokenizer"] == "stabilityai/sd-vae-ft-ema"


def test_fast_dit_features_are_found_and_bad_input_is_named(tmp_path):
    data = write_features(tmp_path / "features", [0, 1, 2])
    assert feature_folders(data) == (data / "imagenet256_features", data / "imagenet256_labels")
    write_features(data, [0], name="imagenet512", side=8)
    with pytest.raises(ValueError, match="2 fast-DiT feature folders"):
        feature_folders(data)
    assert FastDiTFeatures(data / "imagenet512_features").resolution == 64  # a features folder picks its pair
    with pytest.raises(ValueError, match="REPA"):
        train.build_dataset(train_args(data / "imagenet256_features", tmp_path, "--enc-type", "dinov2-vit-b"))
    with pytest.raises(ValueError, match=r"outside \[0, 3\).*1.npy \(7\)"):
        np.save(data / "imagenet256_labels" / "1.npy", np.array([7]))
        train.build_dataset(train_args(data / "imagenet256_features", tmp_path))
    np.save(data / "imagenet256_labels" / "1.npy", np.array([0.5]))
    np.save(data / "imagenet256_features" / "0.npy", np.zeros((1, 4, 2, 2), np.float32))
    with pytest.raises(DataFileError) as error:
        FastDiTFeatures(data / "imagenet256_features")
    assert "imagenet256_labels/1.npy: dtype float64" in str(error.value)
    assert "imagenet256_features/0.npy: shape (4, 2, 2)" in str(error.value)
    (data / "imagenet256_labels" / "1.npy").unlink()
    with pytest.raises(ValueError, match="1 of 3 ids have no label"):
        FastDiTFeatures(data / "imagenet256_features")
