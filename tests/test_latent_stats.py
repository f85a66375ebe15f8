"""The latent statistics cache never holds NaN or infinite values, and a poisoned one is refused by name."""
import pytest
import torch

from data_faults import latent, put_nan
from json_label_dataset import JsonLabelDataset, load_latent_stats, save_latent_stats
from preprocessing.dataset_tools import main


def test_nan_latent_is_named_and_never_cached(data):
    put_nan(data / latent(1))
    with pytest.raises(ValueError, match="NaN or infinite") as info:
        JsonLabelDataset(data)
    assert str(data / latent(1)) in str(info.value) and "img_00000002.npy" not in str(info.value)
    assert not (data / "vae-in/latents_stats.pt").exists()
    with pytest.raises(ValueError, match="refusing to write"):
        save_latent_stats({"mean": torch.full((48, 1, 1), float("nan")), "std": torch.ones(48, 1, 1)},
                          data / "vae-in/latents_stats.pt")
    assert not (data / "vae-in/latents_stats.pt").exists()


def test_cached_non_finite_statistics_are_refused_when_loaded(data):
    stats_file = data / "vae-in/latents_stats.pt"
    mean = torch.zeros(48, 1, 1)
    mean[5] = float("nan")
    torch.save({"mean": mean, "std": torch.ones(48, 1, 1)}, stats_file)
    for load in (lambda: load_latent_stats(stats_file), lambda: JsonLabelDataset(data)):
        with pytest.raises(ValueError) as info:
            load()
        assert str(stats_file) in str(info.value) and "Delete the file" in str(info.value)
    torch.save({"mean": torch.zeros(48, 1, 1), "std": torch.zeros(48, 1, 1)}, stats_file)
    with pytest.raises(ValueError, match="std <= 0"):
        load_latent_stats(stats_file)


def test_check_reports_a_poisoned_statistics_file(data, capsys):
    torch.save({"mean": torch.full((48, 1, 1), float("inf")), "std": torch.ones(48, 1, 1)},
               data / "vae-in/latents_stats.pt")
    assert main(["check", "--data-dir", str(data)]) == 1
    assert f"{data / 'vae-in/latents_stats.pt'}: holds unusable latent statistics" in capsys.readouterr().out
