"""Building a dataset reads every image and latent header and names each file that cannot work; reading an
item that fails names the item's files."""
import json
import shutil
import time

import numpy as np
import PIL.Image
import pytest
from torch.utils.data import DataLoader

from data_faults import (FAULTS, image, inject, latent, non_utf8_caption,
                         put_nan, truncate_png)
from json_label_dataset import JsonLabelDataset, collate

HEADER_CHECK_FILES = 2000


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_bad_file_stops_construction_naming_it(data, fault):
    path = inject(data, fault)
    with pytest.raises(ValueError) as info:
        JsonLabelDataset(data)
    message = str(info.value)
    assert str(path) in message
    assert message.count(".npy") + message.count(".png") == 1  # no other file is blamed


def test_non_utf8_caption_names_the_file_and_entry(data):
    non_utf8_caption(data)
    with pytest.raises(ValueError) as info:
        JsonLabelDataset(data)
    message = str(info.value)
    assert str(data / "labels.json") in message and "not valid UTF-8" in message
    assert "entry [3][\"en\"]" in message and "line 1" in message


def test_unpaired_surrogate_caption_is_refused(data):
    entries = json.loads((data / "labels.json").read_text())
    entries[2]["en"] = "broken \ud800 caption"
    (data / "labels.json").write_text(json.dumps(entries))  # ASCII file with a "\ud800" escape
    with pytest.raises(ValueError, match=r"entry 2 \(id 'data_000000/img_00000002'\).*not valid UTF-8"):
        JsonLabelDataset(data)


def test_text_embedding_of_another_shape_is_named(data):
    (data / "text-emb/data_000000").mkdir(parents=True)
    for i in range(8):
        np.save(data / f"text-emb/data_000000/img_{i:08d}.npy", np.zeros((77, 16 if i == 6 else 8), np.float16))
    with pytest.raises(ValueError, match=r"img_00000006.npy: shape \(77, 16\), but 7 of 8 text embeddings"):
        JsonLabelDataset(data, text_emb_dir=data / "text-emb")


def test_header_checks_of_2000_files_are_fast(tmp_path):
    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    (root / "vae-in").mkdir()
    PIL.Image.new("RGB", (32, 32), (10, 20, 30)).save(root / "images/0.png")
    for i in range(HEADER_CHECK_FILES):
        if i:
            shutil.copyfile(root / "images/0.png", root / f"images/{i}.png")
        np.save(root / f"vae-in/{i}.npy", np.full((4, 8, 8), i % 7, np.float32))
    (root / "labels.json").write_text(json.dumps([{"id": str(i), "en": "x"} for i in range(HEADER_CHECK_FILES)]))
    JsonLabelDataset(root)  # writes the statistics (loads every latent once)
    start = time.perf_counter()
    ds = JsonLabelDataset(root)
    assert len(ds) == HEADER_CHECK_FILES and time.perf_counter() - start < 5.0


def test_item_errors_name_the_files(data):
    ds = JsonLabelDataset(data)
    truncate_png(data / image(2))
    with pytest.raises(RuntimeError) as info:
        ds[2]
    assert str(data / image(2)) in str(info.value) and "data_000000/img_00000002" in str(info.value)
    put_nan(data / latent(1))
    with pytest.raises(RuntimeError, match="NaN or infinite") as info:
        next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert str(data / latent(1)) in str(info.value)


def test_iterating_a_dataset_still_ends(data):
    ds = JsonLabelDataset(data)
    assert len(list(ds)) == len(ds) == 8
