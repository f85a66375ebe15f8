"""JsonLabelDataset / CustomDataset on tiny generated datasets."""
import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from dataset import CustomDataset
from json_label_dataset import (DataFileError, DataItemError, DatasetMismatchError, JsonLabelDataset, collate,
                                compute_latent_stats, file_id, load_latent_stats, normalize_id)

CHANNEL_MEAN = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
CHANNEL_STD = np.array([2.0, 0.5, 1.0, 4.0], np.float32)


def write_image(path, value, mode="RGB", size=32):
    """An image whose every pixel holds `value` (id marker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full((size, size, 3), value, np.uint8)
    img = PIL.Image.fromarray(array)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.quantize(colors=4)
    img.save(path)


def write_latent(path, marker, seed, batch_dim=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    z = np.random.default_rng(seed).normal(size=(4, 2, 2)).astype(np.float32)
    z = z * CHANNEL_STD[:, None, None] + CHANNEL_MEAN[:, None, None]
    z[0, 0, 0] = marker
    np.save(path, z[None] if batch_dim else z)
    return z


def make_text_dataset(root, entries, labels_name="labels.json"):
    """entries: list of (id, image rel path, latent rel path); captions are 'caption of <id>'."""
    latents = {}
    for index, (key, image_rel, latent_rel) in enumerate(entries):
        if image_rel:
            write_image(root / "images" / image_rel, 10 * (index + 1))
        if latent_rel:
            latents[key] = write_latent(root / "vae-in" / latent_rel, 100.0 + index, seed=index)
    labels = [{"id": key, "en": f"caption of {key}"} for key, _, _ in reversed(entries)]
    (root / labels_name).write_text(json.dumps(labels))
    return latents


def test_id_rules():
    assert file_id("data_000000/img-latents-flux_512_100k_00000014.npy") == "data_000000/flux_512_100k_00000014"
    assert file_id("data_000000/flux_512_100k_00000014.npy") == "data_000000/flux_512_100k_00000014"
    assert file_id("data_000000/flux_512_100k_00000014.png") == "data_000000/flux_512_100k_00000014"
    assert file_id("00000/img00000014.png") == "00000/00000014"
    assert file_id("a\\b\\image_1.jpg") == "a/b/image_1"
    assert normalize_id("x/imgur") == "x/imgur"
    assert normalize_id("top") == "top"


def test_items_pair_by_id_not_by_sorted_position(tmp_path):
    # sorted latent names put k before j ('img-latents-k' < 'j'); sorted images put j first
    entries = [("d/j", "d/j.png", "d/j.npy"), ("d/k", "d/k.jpg", "d/img-latents-k.npy"),
               ("e/flux_1", "e/flux_1.png", "e/img-latents-flux_1.npy")]
    latents = make_text_dataset(tmp_path, entries)
    ds = JsonLabelDataset(str(tmp_path))
    assert ds.ids == ["d/j", "d/k", "e/flux_1"]
    assert len(ds) == 3
    for index, key in enumerate(ds.ids):
        image, latent, caption = ds[index]
        entry_index = [e[0] for e in entries].index(key)
        assert caption == f"caption of {key}"
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        assert abs(int(image[0, 0, 0]) - 10 * (entry_index + 1)) <= 3  # jpeg is lossy
        raw = latent * ds.latent_std + ds.latent_mean
        torch.testing.assert_close(raw, torch.from_numpy(latents[key]), atol=1e-4, rtol=1e-5)
        assert raw[0, 0, 0].item() == pytest.approx(100.0 + entry_index, abs=1e-4)


def test_mismatch_reports_counts_and_names(tmp_path):
    entries = [(f"s/{i:03d}", f"s/{i:03d}.png", f"s/{i:03d}.npy") for i in range(8)]
    entries[1] = ("s/001", None, "s/001.npy")            # no image
    entries[2] = ("s/002", "s/002.png", None)            # no latent
    entries[3] = ("s/003", None, None)                   # caption only
    make_text_dataset(tmp_path, entries)
    write_image(tmp_path / "images/s/extra.png", 1)      # no latent, no caption
    write_latent(tmp_path / "vae-in/s/img-latents-extra.npy", 0, 0)
    with pytest.raises(DatasetMismatchError) as info:
        JsonLabelDataset(tmp_path)
    message = str(info.value)
    assert "2 of 9 ids have no image" in message and "s/001, s/003" in message
    assert "2 of 9 ids have no latent" in message and "s/002, s/003" in message
    assert "1 of 9 ids have no caption" in message and "s/extra" in message
    assert not (tmp_path / "vae-in/latents_stats.pt").exists()


def test_duplicate_ids_are_errors(tmp_path):
    make_text_dataset(tmp_path, [("a", "a.png", "a.npy")])
    (tmp_path / "labels.json").write_text(json.dumps([{"id": "a", "en": "x"}, {"id": "a", "en": "y"}]))
    with pytest.raises(ValueError, match="1 duplicate ids"):
        JsonLabelDataset(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps([{"id": "a", "en": "x"}]))
    write_latent(tmp_path / "vae-in/img-latents-a.npy", 0, 0)
    with pytest.raises(ValueError, match="a.npy / img-latents-a.npy"):
        JsonLabelDataset(tmp_path)


def test_latent_stats_computed_once_cached_and_used(tmp_path):
    entries = [(f"{i:02d}", f"{i:02d}.png", f"img-latents-{i:02d}.npy") for i in range(12)]
    latents = make_text_dataset(tmp_path, entries)
    ds = JsonLabelDataset(tmp_path)
    stats_file = tmp_path / "vae-in" / "latents_stats.pt"
    assert stats_file.is_file()
    stacked = np.stack([latents[k] for k in ds.ids]).astype(np.float64)
    mean, std = load_latent_stats(stats_file)
    assert mean.shape == std.shape == (4, 1, 1)
    np.testing.assert_allclose(mean.flatten(), stacked.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.flatten(), stacked.std(axis=(0, 2, 3), ddof=1), rtol=1e-5)
    _, latent, _ = ds[3]
    torch.testing.assert_close(latent, (torch.from_numpy(latents[ds.ids[3]]) - mean) / std)
    # the cache is read, not recomputed: a hand-written file takes effect
    torch.save({"mean": torch.zeros(4, 1, 1), "std": torch.full((4, 1, 1), 2.0)}, stats_file)
    _, latent, _ = JsonLabelDataset(tmp_path)[3]
    torch.testing.assert_close(latent, torch.from_numpy(latents[ds.ids[3]]) / 2)
    # stale statistics for another channel count are reported
    torch.save({"mean": torch.zeros(8, 1, 1), "std": torch.ones(8, 1, 1)}, stats_file)
    with pytest.raises(ValueError, match="delete the stale file"):
        JsonLabelDataset(tmp_path)


def test_compute_latent_stats_subset_is_seeded(tmp_path):
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"{i}.npy")
        write_latent(paths[-1], 0, seed=i)
    a = compute_latent_stats(paths, max_samples=5, seed=3)
    b = compute_latent_stats(paths, max_samples=5, seed=3)
    c = compute_latent_stats(paths, max_samples=5, seed=4)
    chosen = np.sort(np.random.default_rng(3).choice(20, size=5, replace=False))
    subset = np.stack([np.load(paths[i]) for i in chosen]).astype(np.float64)
    assert torch.equal(a["mean"], b["mean"]) and not torch.equal(a["mean"], c["mean"])
    np.testing.assert_allclose(a["mean"].flatten(), subset.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["std"].flatten(), subset.std(axis=(0, 2, 3), ddof=1), rtol=1e-5)


def test_reference_shaped_latents_and_stats(tmp_path):
    write_image(tmp_path / "images/a.png", 5)
    z = write_latent(tmp_path / "vae-in/img-latents-a.npy", 7.0, 0, batch_dim=True)
    (tmp_path / "labels.json").write_text(json.dumps([{"id": "a", "en": "x"}]))
    torch.save({"mean": torch.ones(1, 4, 1, 1), "std": torch.full((1, 4, 1, 1), 2.0)},
               tmp_path / "vae-in/latents_stats.pt")
    _, latent, _ = JsonLabelDataset(tmp_path)[0]
    torch.testing.assert_close(latent, (torch.from_numpy(z) - 1) / 2)


def test_label_file_override(tmp_path):
    make_text_dataset(tmp_path, [("a", "a.png", "a.npy"), ("b", "b.png", "b.npy")])
    other = tmp_path / "elsewhere" / "custom.json"
    other.parent.mkdir()
    other.write_text(json.dumps([{"id": "b", "en": "custom b"}, {"id": "a", "en": "custom a"}]))
    ds = JsonLabelDataset(tmp_path, label_file=str(other))
    assert [ds[i][2] for i in range(2)] == ["custom a", "custom b"]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        JsonLabelDataset(tmp_path, label_file=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_non_rgb_images_come_back_rgb(tmp_path, mode):
    write_image(tmp_path / "images/a.png", 77, mode=mode)
    write_latent(tmp_path / "vae-in/a.npy", 0, 0)
    (tmp_path / "labels.json").write_text(json.dumps([{"id": "a", "en": "x"}]))
    with PIL.Image.open(tmp_path / "images/a.png") as img:
        assert img.mode == mode
    image, _, _ = JsonLabelDataset(tmp_path)[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert torch.all(image == image[:, :1, :1]) and abs(int(image[0, 0, 0]) - 77) <= 2


def test_collate_keeps_captions_as_strings(tmp_path):
    make_text_dataset(tmp_path, [(f"{i}", f"{i}.png", f"{i}.npy") for i in range(5)])
    ds = JsonLabelDataset(tmp_path)
    images, latents, captions = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert latents.shape == (4, 4, 2, 2) and latents.dtype == torch.float32
    assert captions == [f"caption of {i}" for i in range(4)]
    _, _, default_captions = default_collate([ds[i] for i in range(4)])
    assert list(default_captions) == captions  # default_collate gives a tuple of str
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate))
    assert sum(len(b[2]) for b in batches) == 5


def test_text_embedding_items(tmp_path):
    make_text_dataset(tmp_path, [("a/x", "a/x.png", "a/x.npy"), ("a/y", "a/y.png", "a/y.npy")])
    emb_dir = tmp_path / "text-emb"
    (emb_dir / "a").mkdir(parents=True)
    embedding = np.random.default_rng(0).normal(size=(77, 8)).astype(np.float16)
    np.save(emb_dir / "a/x.npy", embedding)
    with pytest.raises(DatasetMismatchError, match="1 of 2 ids have no text embedding .*a/y"):
        JsonLabelDataset(tmp_path, text_emb_dir=emb_dir)
    np.save(emb_dir / "a/y.npy", embedding)
    ds = JsonLabelDataset(tmp_path, text_emb_dir=emb_dir)
    _, _, cond = ds[0]
    assert cond.dtype == torch.float32 and cond.shape == (77, 8)
    torch.testing.assert_close(cond, torch.from_numpy(embedding).float())
    assert collate([ds[0], ds[1]])[2].shape == (2, 77, 8)


def test_class_label_layout(tmp_path):
    # edm2 / reference naming: images 00000/img00000003.png, latents 00000/img-latents-00000003.npy
    names = [f"{i:08d}" for i in range(6)]
    for i, name in enumerate(names):
        write_image(tmp_path / f"images/{name[:5]}/img{name}.png", 20 * i)
        write_latent(tmp_path / f"vae-in/{name[:5]}/img-latents-{name}.npy", float(i), seed=i)
    labels = [[f"{n[:5]}/img-latents-{n}.npy", (7 * i) % 5] for i, n in enumerate(names)]
    (tmp_path / "vae-in/dataset.json").write_text(json.dumps({"labels": labels[::-1]}))
    ds = CustomDataset(str(tmp_path))
    assert len(ds) == 6 and ds.ids[0] == "00000/00000000"
    for i in range(6):
        image, latent, label = ds[i]
        assert label == (7 * i) % 5 and int(image[0, 0, 0]) == 20 * i
        assert (latent * ds.latent_std + ds.latent_mean)[0, 0, 0].item() == pytest.approx(i, abs=1e-4)
    _, _, batch_labels = default_collate([ds[i] for i in range(3)])
    assert batch_labels.dtype == torch.int64 and batch_labels.tolist() == [0, 2, 4]
    os.remove(tmp_path / "images/00000/img00000002.png")
    with pytest.raises(DatasetMismatchError, match="1 of 6 ids have no image .*00000/00000002"):
        CustomDataset(tmp_path)


def test_without_images_items_skip_decoding_and_keep_latents_and_conditions(tmp_path, monkeypatch):
    entries = [("d/a", "d/a.png", "d/a.npy"), ("d/b", "d/b.png", "d/b.npy")]
    make_text_dataset(tmp_path, entries)
    with_images = JsonLabelDataset(tmp_path)
    expected = [with_images[i] for i in range(2)]
    import json_label_dataset

    def refuse(path):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(json_label_dataset, "read_image", refuse)
    without = JsonLabelDataset(tmp_path, need_images=False)
    assert without.resolution == with_images.resolution == 32
    for index in range(2):
        image, latent, caption = without[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 0, 0)
        assert torch.equal(latent, expected[index][1]) and caption == expected[index][2]
    images, latents, captions = collate([without[0], without[1]])
    assert images.shape == (2, 3, 0, 0) and latents.shape[0] == 2 and captions == ["caption of d/a", "caption of d/b"]
    with pytest.raises(DataItemError, match="was decoded"):
        JsonLabelDataset(tmp_path)[0]


def test_train_reads_images_only_for_repa(tmp_path):
    import train

    make_text_dataset(tmp_path, [("d/a", "d/a.png", "d/a.npy")])
    base = ["--exp-name", "x", "--data-dir", str(tmp_path), "--use-json-dataset",
            "--output-dir", str(tmp_path / "exps")]
    assert not train.build_dataset(train.parse_args([*base, "--enc-type", "none"])).need_images
    assert train.build_dataset(train.parse_args(base)).need_images


def test_images_headers_are_checked_only_where_images_are_used(tmp_path):
    entries = [("d/a", "d/a.png", "d/a.npy"), ("d/b", "d/b.png", "d/b.npy")]
    make_text_dataset(tmp_path, entries)
    (tmp_path / "images" / "d" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataFileError, match="b.png: not a readable image"):
        JsonLabelDataset(tmp_path)
    unused = JsonLabelDataset(tmp_path, need_images=False)
    assert len(unused) == 2 and unused.resolution == 32
