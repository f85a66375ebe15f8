"""Shard datasets (omegadit/shards.py): pack, encode-wds, check, two-process streaming with exact resume, train.py."""
import hashlib
import io
import json
import os
import socket
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from json_label_dataset import JsonLabelDataset, collate
from omegadit.data_checks import DataFileError
from omegadit.shards import ShardDataset, is_shard_dataset
from preprocessing.dataset_tools import main as dataset_tools
from preprocessing.pack import pack
from test_train import run_training, train_argv


@pytest.fixture(scope="module")
def shards(text_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "packed"
    pack(text_dataset, out, items_per_part=10)
    return out


def fingerprint(latent) -> str:
    return hashlib.sha1(latent.numpy().tobytes()).hexdigest()


def test_items_skip_stored_images_that_nothing_uses(text_dataset, shards):
    with_images, without = ShardDataset(shards), ShardDataset(shards, need_images=False)
    image, latent, caption = with_images[3]
    empty, same_latent, same_caption = without[3]
    assert image.numel() > 0 and empty.shape == (3, 0, 0) and empty.dtype == torch.uint8
    assert torch.equal(latent, same_latent) and caption == same_caption
    assert without.resolution == with_images.resolution == image.shape[-1] == JsonLabelDataset(text_dataset).resolution


def test_pack_holds_the_folder_items_and_resumes_by_part(text_dataset, shards, capsys):
    folder = JsonLabelDataset(text_dataset)
    packed = ShardDataset(shards)
    assert is_shard_dataset(shards) and not is_shard_dataset(text_dataset)
    assert len(packed) == len(folder) and packed.meta["fields"] == ["caption", "id", "image", "latent"]
    by_id = {packed.raw_item(i)["id"]: i for i in range(len(packed))}
    assert sorted(by_id) == folder.ids and list(by_id) != folder.ids  # all items, in a shuffled order
    for index in (0, 7):
        image, latent, caption = folder[index]
        s_image, s_latent, s_caption = packed[by_id[folder.ids[index]]]
        assert torch.equal(image, s_image) and caption == s_caption
        assert torch.allclose(latent, s_latent, atol=2e-3 * latent.abs().max().item())  # float16 storage
    assert torch.allclose(packed.latent_mean, folder.latent_mean, atol=1e-3)
    assert torch.allclose(packed.latent_std, folder.latent_std, rtol=1e-3)
    assert packed.captions[:2] == [packed.raw_item(0)["caption"], packed.raw_item(1)["caption"]]

    (shards / "parts" / "00001.json").unlink()
    chunk = shards / "chunk-00001-0.bin"
    chunk.unlink()
    pack(text_dataset, shards, items_per_part=10)
    assert "4 parts, 3 already in" in capsys.readouterr().out and chunk.is_file()
    with pytest.raises(ValueError, match="seed"):
        pack(text_dataset, shards, items_per_part=10, seed=1)


def test_missing_field_or_chunk_fails_before_training(text_dataset, shards, tmp_path):
    no_images = tmp_path / "no-images"
    pack(text_dataset, no_images, images=False)
    with pytest.raises(DataFileError, match="no images, which REPA needs"):
        ShardDataset(no_images)
    assert ShardDataset(no_images, need_images=False)[0][0].shape == (3, 0, 0)
    with pytest.raises(DataFileError, match="no 'label' field"):
        ShardDataset(shards, condition="label")
    with pytest.raises(DataFileError, match="no 'text_emb' field"):
        ShardDataset(shards, use_text_emb=True)
    chunk = no_images / "chunk-00000-0.bin"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(DataFileError, match="chunk-00000-0.bin: .* bytes, index.json says"):
        ShardDataset(no_images, need_images=False)
    assert dataset_tools(["check", "--data-dir", str(no_images)]) == 1
    assert dataset_tools(["check", "--data-dir", str(shards)]) == 0


def _loader_worker(rank, world, data, port, steps, resume_at, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dataset = ShardDataset(data, need_images=False)

    def take(loader, n):
        return [[fingerprint(latent) for latent in next(loader)[1]] for _ in range(n)]

    uninterrupted = take(dataset.loader(3, 0, 5, collate), steps)
    first = dataset.loader(3, 0, 5, collate)
    before = take(first, resume_at)
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    resumed = dataset.loader(3, 0, 5, collate)
    assert resumed.load_state_dict(state) == []
    after = take(resumed, steps - resume_at)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"uninterrupted": uninterrupted, "resumed": before + after}, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_see_disjoint_parts_and_resume_exactly(shards, tmp_path):
    steps, resume_at = 8, 3
    mp.spawn(_loader_worker, args=(2, str(shards), free_port(), steps, resume_at, str(tmp_path)), nprocs=2)
    runs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    everything = {fingerprint(ShardDataset(shards)[i][1]) for i in range(len(ShardDataset(shards)))}
    per_epoch = len(everything) // 2 // 3  # full batches of 3 per process and epoch
    epoch = [{f for batch in run["uninterrupted"][:per_epoch] for f in batch} for run in runs]
    assert not epoch[0] & epoch[1]  # the processes see disjoint items
    assert len(epoch[0]) == len(epoch[1]) == per_epoch * 3 and epoch[0] | epoch[1] <= everything
    assert len(everything - epoch[0] - epoch[1]) < 2 * 3  # only the short last batches are left out
    for run in runs:
        assert steps > per_epoch  # the comparison crosses an epoch boundary
        assert run["resumed"] == run["uninterrupted"]
    assert runs[0]["uninterrupted"] != runs[1]["uninterrupted"]


def test_train_on_shards_resumes_as_one_run(shards, minilm, tmp_path, fresh_accelerate_state):
    def argv(out, steps, *extra):
        return train_argv(shards, out, minilm, "--max-train-steps", steps, "--checkpointing-steps", "2",
                          "--text-len", "8", *extra)

    run_training(argv(tmp_path / "once", "4"))
    run_training(argv(tmp_path / "twice", "2"))
    run_training(argv(tmp_path / "twice", "4", "--resume", "latest"))
    saved = tmp_path / "twice" / "run" / "checkpoints" / "0000002"
    assert json.loads((saved / "data_state_0.json").read_text())["source"] == str(shards)
    once = load_file(str(tmp_path / "once" / "run" / "checkpoints" / "0000004" / "model.safetensors"))
    twice = load_file(str(tmp_path / "twice" / "run" / "checkpoints" / "0000004" / "model.safetensors"))
    assert max((once[k] - twice[k]).abs().max().item() for k in once) <= 1e-6
    class_argv = [a for a in argv(tmp_path / "class", "1") if a != "--use-json-dataset"]
    with pytest.raises(DataFileError, match="no 'label' field"):
        run_training(class_argv)


def write_wds_tar(path, samples):
    """A tar as img2dataset writes it: NNN.jpg with NNN.txt and/or NNN.json per sample."""
    with tarfile.open(path, "w") as tar:
        for key, (image, caption, as_json) in samples.items():
            buffer = io.BytesIO()
            image.save(buffer, format="jpeg")
            files = {f"{key}.jpg": buffer.getvalue()}
            if as_json:
                files[f"{key}.json"] = json.dumps({"caption": caption, "url": "http://x"}).encode()
            else:
                files[f"{key}.txt"] = caption.encode()
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_encode_wds_writes_shards_and_redoes_only_unfinished_tars(tmp_path, capsys):
    rng = np.random.default_rng(0)
    source = tmp_path / "wds"
    source.mkdir()
    for t in range(2):
        write_wds_tar(source / f"{t:05d}.tar", {
            f"{t:05d}{i:04d}": (PIL.Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)),
                                f"caption {t} {i}", i % 2 == 1) for i in range(3)})
    out = tmp_path / "shards"
    argv = ["encode-wds", "--source", str(source), "--dest", str(out), "--tokenizer", "pixel:4", "--resolution", "16",
            "--batch-size", "2"]
    assert dataset_tools(argv) == 0
    dataset = ShardDataset(out)
    assert len(dataset) == 6 and dataset.meta["latent_shape"] == [48, 4, 4] and dataset.meta["image_size"] == 16
    items = {dataset.raw_item(i)["id"]: dataset.raw_item(i) for i in range(6)}
    assert items["00001/000010001"]["caption"] == "caption 1 1"  # from the .json
    assert items["00000/000000000"]["caption"] == "caption 0 0"  # from the .txt
    assert dataset[0][0].shape == (3, 16, 16)
    (out / "parts" / "00001.json").unlink()
    capsys.readouterr()
    assert dataset_tools(argv) == 0
    assert "1 of 2 tars to encode" in capsys.readouterr().out
    assert len(ShardDataset(out)) == 6


def test_encode_wds_caches_the_clip_layer_asked_for_and_train_refuses_another(tmp_path, capsys):
    from types import SimpleNamespace

    import train
    from test_text_encoder import _save_tiny_clip

    text_model, tokenizer = _save_tiny_clip(tmp_path / "clip", text_only=True)
    source = tmp_path / "wds"
    source.mkdir()
    rng = np.random.default_rng(0)
    write_wds_tar(source / "00000.tar", {
        f"0000{i}": (PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), caption, False)
        for i, caption in enumerate(["a red cat", "a blue bed"])})
    out = tmp_path / "shards"
    argv = ["encode-wds", "--source", str(source), "--dest", str(out), "--tokenizer", "pixel:4", "--resolution", "16",
            "--text-encoder", str(tmp_path / "clip"), "--text-len", "77"]
    assert dataset_tools([*argv, "--clip-output", "last"]) == 0
    dataset = ShardDataset(out, need_images=False, use_text_emb=None)
    assert dataset.meta["clip_output"] == "last"
    for i in range(2):
        ids = tokenizer([dataset.raw_item(i)["caption"]], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = text_model(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(dataset[i][2], hidden.last_hidden_state[0], atol=5e-3, rtol=5e-3)
        assert not torch.allclose(dataset[i][2], hidden.hidden_states[-2][0], atol=5e-2)
    capsys.readouterr()
    assert dataset_tools(argv) == 2  # the folder's settings record the layer: a rerun with another is refused
    assert "holds items written with" in capsys.readouterr().err
    args = SimpleNamespace(use_json_dataset=True, text_encoder="unused", text_len=77, cfg_prob=0.1,
                           clip_output="penultimate", sample_every=0, text_emb_dir=None, data_dir=str(out))
    with pytest.raises(ValueError, match="pass --clip-output last"):
        train.build_conditioner(args, dataset, "cpu")
    args.clip_output = "last"
    assert train.build_conditioner(args, dataset, "cpu")[1] == 32


def test_cached_caption_embeddings_travel_in_the_shards(text_dataset, tmp_path):
    from types import SimpleNamespace

    import train

    folder = JsonLabelDataset(text_dataset)
    emb_dir = tmp_path / "text-emb"
    rng = np.random.default_rng(0)
    for key in folder.ids:
        (emb_dir / key).parent.mkdir(parents=True, exist_ok=True)
        np.save(emb_dir / f"{key}.npy", rng.standard_normal((6, 10)).astype(np.float16))
    out = tmp_path / "shards"
    pack(text_dataset, out, text_emb_dir=emb_dir, images=False)
    dataset = ShardDataset(out, need_images=False, use_text_emb=None)
    key = dataset.raw_item(3)["id"]
    assert torch.equal(dataset[3][2], torch.from_numpy(np.load(emb_dir / f"{key}.npy")).float())
    args = SimpleNamespace(use_json_dataset=True, text_encoder="unused", text_len=6, cfg_prob=0.1,
                           clip_output="penultimate", sample_every=0, text_emb_dir=None, data_dir=str(out))
    assert train.build_conditioner(args, dataset, "cpu")[1] == 10  # the text encoder is never loaded
    args.text_len = 77
    with pytest.raises(ValueError, match="6 tokens but --text-len is 77"):
        train.build_conditioner(args, dataset, "cpu")
