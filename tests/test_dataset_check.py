"""`python preprocessing/dataset_tools.py check`: loads every file and lists each problem with its file."""
import json
import os

import PIL.Image
import torch

from data_faults import (FAULTS, image, inject, latent, non_utf8_caption,
                         put_nan, truncate_png)
from json_label_dataset import JsonLabelDataset
from preprocessing.dataset_tools import main


def test_check_passes_a_clean_dataset(clean_dataset, capsys):
    assert main(["check", "--data-dir", str(clean_dataset)]) == 0
    out = capsys.readouterr().out
    assert "8 ids (8 images, 8 latents, 8 captions)" in out and "no problems found" in out


def test_check_lists_every_broken_file(data, capsys):
    JsonLabelDataset(data)  # writes the statistics, which the check reads too
    for fault in FAULTS:
        inject(data, fault)
    put_nan(data / latent(4))
    truncate_png(data / image(1))
    PIL.Image.new("RGB", (32, 32)).save(data / "images/data_000000/extra.png")
    non_utf8_caption(data)
    assert main(["check", "--data-dir", str(data)]) == 1
    out = capsys.readouterr().out
    expected = {
        latent(0): "shape (47, 8, 8), but 4 of 6 latents have shape (48, 8, 8)",
        latent(1): "shape (48, 4, 4), but 4 of 6 latents have shape (48, 8, 8)",
        latent(3): "dtype int8, expected float16, float32 or float64",
        latent(4): "1 of 3072 values are NaN or infinite",
        latent(6): "truncated",
        image(1): "does not decode: image file is truncated",
        image(2): "not a readable image (unknown format or corrupt header)",
        image(5): "PNG image of mode I;16, which does not convert to 8-bit RGB",
        image(7): "size 40x40, but 6 of 7 images have size 32x32",
        "images/data_000000/extra.png": "id 'data_000000/extra' has no latent",
        "labels.json": "not valid UTF-8: byte 0xe9 at line 1",
    }
    for rel, message in expected.items():
        assert f"{data / rel}: {message}" in out, rel
    assert f"check: {len(expected)} problems found" in out


def test_check_reads_class_label_datasets(data, capsys):
    labels = [[f"data_000000/img_{i:08d}.npy", i % 3] for i in range(8)]
    (data / "vae-in/dataset.json").write_text(json.dumps({"labels": labels}))
    (data / "labels.json").unlink()
    assert main(["check", "--data-dir", str(data)]) == 0
    assert "8 ids (8 images, 8 latents, 8 labels)" in capsys.readouterr().out


def test_check_reports_statistics_for_another_channel_count(data, capsys):
    torch.save({"mean": torch.zeros(4, 1, 1), "std": torch.ones(4, 1, 1)}, data / "vae-in/latents_stats.pt")
    assert main(["check", "--data-dir", str(data)]) == 1
    assert "statistics for 4 channels but the latents have 48" in capsys.readouterr().out


class RunsCode:
    """Pickles as a call to os.system."""

    def __reduce__(self):
        return os.system, ("echo this must never run",)


def test_check_reports_a_statistics_file_that_would_run_code(data, capsys):
    torch.save({"mean": RunsCode(), "std": torch.ones(48, 1, 1)}, data / "vae-in/latents_stats.pt")
    assert main(["check", "--data-dir", str(data)]) == 1
    assert f"{data / 'vae-in/latents_stats.pt'}: refusing to load code from" in capsys.readouterr().out
