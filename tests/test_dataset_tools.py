"""preprocessing/dataset_tools.py: convert, encode-vavae (resume, tokenizers, processes), encode-text."""
import json
import os
import sys
import types
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import fixture_path
from json_label_dataset import JsonLabelDataset, read_image
from models.tokenizers import PixelTokenizer, load_tokenizer
from preprocessing import dataset_tools
from preprocessing.dataset_tools import ImageSource, center_crop_adm, main, run_shards


def write_random_image(path, size, mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def make_raw_folder(root):
    write_random_image(root / "cats/a.jpg", (80, 50), seed=1)
    write_random_image(root / "cats/deep/b.png", (40, 90), mode="L", seed=2)
    write_random_image(root / "dogs/c.png", (64, 64), mode="RGBA", seed=3)
    write_random_image(root / "dogs/d.gif", (33, 47), mode="P", seed=4)
    (root / "dogs/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "cats/empty.jpg").write_bytes(b"")
    (root / "captions.json").write_text("[]")


def test_center_crop_adm_box_halving_then_bicubic_crop():
    rng = np.random.default_rng(0)
    img = PIL.Image.fromarray(rng.integers(0, 256, (128, 256, 3), dtype=np.uint8))
    out = center_crop_adm(img, 64)
    halved = img.resize((128, 64), resample=PIL.Image.Resampling.BOX)  # min side 128 >= 2*64: halve once
    assert out.size == (64, 64)
    np.testing.assert_array_equal(np.array(out), np.array(halved)[:, 32:96])
    small = center_crop_adm(PIL.Image.fromarray(np.zeros((20, 30, 3), np.uint8)), 32)  # upscale
    assert small.size == (32, 32)


def test_convert_keeps_paths_skips_unreadable_and_resumes(tmp_path, capsys):
    raw, dest = tmp_path / "raw", tmp_path / "data/images"
    make_raw_folder(raw)
    assert main(["convert", "--source", str(raw), "--dest", str(dest), "--resolution", "32", "--workers", "0",
                 "--dir-labels"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 unreadable files" in err and "dogs/broken.png" in err and "cats/empty.jpg" in err
    written = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.png"))
    assert written == ["cats/a.png", "cats/deep/b.png", "dogs/c.png", "dogs/d.png"]
    for rel in written:
        with PIL.Image.open(dest / rel) as img:
            assert img.size == (32, 32) and img.mode == "RGB"
    labels = json.loads((dest / "dataset.json").read_text())["labels"]
    assert labels == [["cats/a.png", 0], ["cats/deep/b.png", 0], ["dogs/c.png", 1], ["dogs/d.png", 1]]
    mtime = (dest / "cats/a.png").stat().st_mtime_ns
    result = dataset_tools.convert(raw, dest, 32)
    assert result["converted"] == 0 and result["skipped_existing"] == 4
    assert result["unreadable"] == ["cats/empty.jpg", "dogs/broken.png"]
    assert (dest / "cats/a.png").stat().st_mtime_ns == mtime


def test_convert_from_zip_with_worker_processes(tmp_path):
    raw = tmp_path / "raw"
    make_raw_folder(raw)
    archive = tmp_path / "raw.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in raw.rglob("*"):
            if path.is_file():
                z.write(path, path.relative_to(raw).as_posix())
    result = dataset_tools.convert(archive, tmp_path / "out", 16, workers=2)
    assert result["converted"] == 4 and len(result["unreadable"]) == 2
    direct = dataset_tools.convert(raw, tmp_path / "direct", 16)
    assert direct["converted"] == 4
    for rel in ["cats/a.png", "dogs/d.png"]:
        assert torch.equal(read_image(tmp_path / "out" / rel), read_image(tmp_path / "direct" / rel))


def make_images(root, n=6, size=32):
    for i in range(n):
        write_random_image(root / f"data_{i % 2:06d}/flux_{i:08d}.png", (size, size), seed=i)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


def test_encode_pixel_resumes_only_missing_files(tmp_path, capsys):
    images, dest = tmp_path / "images", tmp_path / "vae-in"
    names = make_images(images)
    args = ["encode-vavae", "--tokenizer", "pixel", "--source", str(images), "--dest", str(dest), "--gpus", "0",
            "--batch-size", "4", "--workers", "0"]
    assert main(args + ["--max-images", "3"]) == 0  # an "interrupted" run
    assert "3 encoded, 0 already there" in capsys.readouterr().out
    outputs = [dest / (os.path.splitext(n)[0] + ".npy") for n in names]
    assert [p.exists() for p in outputs] == [True] * 3 + [False] * 3
    mtimes = {p: p.stat().st_mtime_ns for p in outputs[:3]}
    os.remove(outputs[1])
    assert main(args) == 0
    assert "4 encoded, 2 already there" in capsys.readouterr().out
    assert all(p.exists() for p in outputs)
    assert outputs[0].stat().st_mtime_ns == mtimes[outputs[0]] and outputs[2].stat().st_mtime_ns == mtimes[outputs[2]]
    assert not [p for p in dest.rglob("*") if p.name.endswith(".tmp")]
    tok = PixelTokenizer(4)
    for name, path in zip(names, outputs):
        latent = np.load(path)
        assert latent.shape == (48, 8, 8) and latent.dtype == np.float32
        image = read_image(images / name)[None]
        np.testing.assert_array_equal(latent, tok.encode(image)[0].numpy())
        assert torch.equal(tok.decode(torch.from_numpy(latent)[None]), image)


def test_encode_float16_and_cli_requires_one_tokenizer(tmp_path):
    images = tmp_path / "images"
    make_images(images, n=2)
    result = dataset_tools.encode(images, tmp_path / "vae-in", "pixel:2", batch_size=1, dtype="float16")
    assert result == {"encoded": 2, "skipped_existing": 0, "failed": []}
    assert np.load(tmp_path / "vae-in/data_000000/flux_00000000.npy").dtype == np.float16
    with pytest.raises(SystemExit):
        main(["encode-vavae", "--source", str(images), "--dest", str(tmp_path / "x"), "--gpus", "0"])


def test_missing_vavae_checkpoint_is_a_clean_cli_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"ckpt_path": "checkpoints/absent.pt", "model": {"params": {
        "embed_dim": 4, "ddconfig": {"z_channels": 4, "ch": 32, "ch_mult": [1], "num_res_blocks": 1,
                                     "resolution": 32}}}}))
    make_images(tmp_path / "images", n=1)
    assert main(["encode-vavae", "--config", str(config), "--source", str(tmp_path / "images"),
                 "--dest", str(tmp_path / "vae-in"), "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert "encode-vavae: error: VA-VAE checkpoint not found" in err and "hustvl/vavae" in err
    assert not (tmp_path / "vae-in").exists()


def test_encode_round_robin_processes(tmp_path, capfd):
    images, dest = tmp_path / "images", tmp_path / "vae-in"
    names = make_images(images, n=5)
    run_shards(2, "cpu", "pixel", None, ImageSource(images), str(dest), names, 2, np.dtype("float32"), 0)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.npy")) == [n[:-4] + ".npy" for n in names]
    progress = capfd.readouterr().err  # one bar per spawned process: 3 images on rank 0, 2 on rank 1
    assert "3/3" in progress and "2/2" in progress and "5/5" not in progress


def test_encode_vavae_config_then_training_dataset(tmp_path):
    meta = json.loads(safe_open(str(fixture_path("vavae.safetensors")), "pt").metadata()["json"])
    config = tmp_path / "vavae.yaml"
    config.write_text(yaml.safe_dump({"ckpt_path": "nowhere.pt", "model": {"params": {
        "embed_dim": meta["embed_dim"], "ddconfig": meta["ddconfig"]}}}))
    data = tmp_path / "data"
    names = make_images(data / "images", n=3)
    ckpt = str(fixture_path("vavae_checkpoint.pt"))
    assert main(["encode-vavae", "--config", str(config), "--ckpt-path", ckpt, "--source", str(data / "images"),
                 "--dest", str(data / "vae-in"), "--gpus", "0", "--workers", "0", "--posterior", "mean"]) == 0
    (data / "labels.json").write_text(json.dumps([{"id": n[:-4], "en": f"text {n}"} for n in names]))
    ds = JsonLabelDataset(data)
    tok = load_tokenizer(f"vavae:{config}", ckpt_path=ckpt)
    image, latent, caption = ds[1]
    assert latent.shape == (4, 16, 16) and caption == f"text {names[1]}"
    torch.testing.assert_close(latent * ds.latent_std + ds.latent_mean, tok.encode(image[None])[0],
                               atol=1e-5, rtol=1e-5)


def test_encode_text_caches_embeddings_and_skips_existing(tmp_path, monkeypatch):
    calls = {"load": 0, "captions": 0}

    class FakeTextEncoder:
        dim = 8

        @classmethod
        def load(cls, model_id_or_path, device="cpu", max_length=77, clip_output="penultimate"):
            calls["load"] += 1
            assert model_id_or_path == "fake-clip" and str(device) == "cpu" and clip_output == "penultimate"
            encoder = cls()
            encoder.max_length = max_length
            return encoder

        def __call__(self, captions):
            calls["captions"] += len(captions)
            return torch.stack([torch.full((self.max_length, self.dim), float(len(c))) for c in captions])

    monkeypatch.setitem(sys.modules, "models.text_encoder", types.SimpleNamespace(TextEncoder=FakeTextEncoder))
    data = tmp_path / "data"
    names = make_images(data / "images", n=4)
    dataset_tools.encode(data / "images", data / "vae-in", "pixel")
    captions = {n[:-4]: "x" * (i + 1) for i, n in enumerate(names)}
    (data / "labels.json").write_text(json.dumps([{"id": k, "en": v} for k, v in captions.items()]))
    args = ["encode-text", "--data-dir", str(data), "--text-encoder", "fake-clip", "--batch-size", "3",
            "--device", "cpu", "--text-len", "20"]
    assert main(args) == 0 and calls == {"load": 1, "captions": 4}
    key = names[2][:-4]
    stored = np.load(data / "text-emb" / f"{key}.npy")
    assert stored.dtype == np.float16 and stored.shape == (20, 8) and stored[0, 0] == len(captions[key])
    os.remove(data / "text-emb" / f"{key}.npy")
    assert main(args) == 0 and calls == {"load": 2, "captions": 5}
    assert main(args) == 0 and calls == {"load": 2, "captions": 5}  # nothing left: the encoder is not even loaded
    ds = JsonLabelDataset(data, text_emb_dir=data / "text-emb")
    _, _, embedding = ds[ds.ids.index(key)]
    assert embedding.shape == (20, 8) and embedding[0, 0].item() == len(captions[key])
