import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train
from conftest import REPO_ROOT, accelerate_launch
from loss import SILoss, TrainingLoss
from models.sit import SiT
from conftest import randomize
from test_sit import to_reference_layout


def train_argv(data_dir, out_dir, minilm, *extra):
    return ["--exp-name", "run", "--output-dir", str(out_dir), "--data-dir", str(data_dir), "--use-json-dataset",
            "--clip-model-id", minilm, "--tokenizer", "pixel", "--model", "SiT-S/4", "--enc-type", "none",
            "--batch-size", "4", "--num-workers", "0", "--log-every", "1", "--mixed-precision", "no",
            "--learning-rate", "1e-3", "--ema-decay", "0.9", "--cfg-prob", "0.3", "--path-drop-prob", "0.3",
            "--sprint-drop-ratio", "0.25", *extra]


def run_training(argv):
    train.main(train.parse_args(argv))


def weights(checkpoint):
    return load_file(str(checkpoint / "model.safetensors")), load_file(str(checkpoint / "ema.safetensors"))


def test_tiny_training_writes_checkpoints_logs_and_samples(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "4", "--checkpointing-steps", "2",
                            "--keep-last", "1", "--sample-every", "4", "--num-samples", "4", "--sample-steps", "3",
                            "--text-len", "16"))
    exp = tmp_path / "run"
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000004"]
    records = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "loss_denoise", "loss_proj", "loss_cfm", "lr", "grad_norm", "images_per_sec", "data_wait"):
        assert all(key in r for r in records)
    assert records[0]["loss"] != records[-1]["loss"]
    assert (exp / "samples" / "0000004.png").exists()
    model, ema = weights(exp / "checkpoints" / "0000004")
    assert any(not torch.equal(model[k], ema[k]) for k in model)
    assert "REPA is off" in (exp / "log.txt").read_text()
    description = json.loads(safe_open(str(exp / "checkpoints" / "0000004" / "ema.safetensors"), "pt").metadata()["omegadit"])
    config = description["backbone"]["config"]
    assert config["text_len"] == 16 and config["text_dim"] == 384
    assert description["conditioner"] == {"name": "text", "config": {"dropout": 0.3, "text_encoder": minilm,
                                                                     "text_len": 16, "clip_output": "penultimate"}}
    assert description["objective"]["name"] == "flow" and description["objective"]["config"]["time_shifting"]
    assert description["autoencoder"] == "pixel" and len(description["latent_stats"]["mean"]) == 48


def test_logged_data_wait_is_the_time_steps_spend_waiting_for_batches(text_dataset, minilm, tmp_path,
                                                                      fresh_accelerate_state, monkeypatch):
    build_batches = train.build_batches

    def slow_batches(*args, **kwargs):
        batches, data_state = build_batches(*args, **kwargs)

        def delayed():
            for batch in batches:
                time.sleep(0.3)
                yield batch
        return delayed(), data_state
    monkeypatch.setattr(train, "build_batches", slow_batches)
    run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "2", "--checkpointing-steps", "2"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(0.3 <= r["data_wait"] <= r["step_time"] for r in records)


def test_resume_gives_the_same_weights_as_one_run(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    run_training(train_argv(text_dataset, tmp_path / "once", minilm, "--max-train-steps", "6",
                            "--checkpointing-steps", "6"))
    run_training(train_argv(text_dataset, tmp_path / "twice", minilm, "--max-train-steps", "3",
                            "--checkpointing-steps", "3"))
    run_training(train_argv(text_dataset, tmp_path / "twice", minilm, "--max-train-steps", "6",
                            "--checkpointing-steps", "3", "--resume", "latest"))
    twice_dir = tmp_path / "twice" / "run"
    assert f"resumed from {twice_dir / 'checkpoints' / '0000003'} at step 3" in (twice_dir / "log.txt").read_text()
    records = [json.loads(line) for line in (twice_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the second run went on from step 4
    once = weights(tmp_path / "once" / "run" / "checkpoints" / "0000006")
    twice = weights(twice_dir / "checkpoints" / "0000006")
    for a, b in zip(once, twice):
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_config_file_supplies_flags_and_rejects_unknown_keys(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("exp-name: from-yaml\ndata_dir: somewhere\nlearning-rate: 0.5\n")
    args = train.parse_args(["--config", str(config), "--learning-rate", "0.25"])
    assert (args.exp_name, args.data_dir, args.learning_rate) == ("from-yaml", "somewhere", 0.25)
    config.write_text("exp-name: x\ndata-dir: y\nlearning-rat: 0.5\n")
    with pytest.raises(ValueError, match="learning-rat"):
        train.parse_args(["--config", str(config)])


def test_missing_captions_fail_before_training(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(json.loads((text_dataset / "labels.json").read_text())[:-3]))
    with pytest.raises(ValueError, match="caption"):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--label-file", str(labels),
                                "--max-train-steps", "1"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_text_encoder_fails_before_training(text_dataset, tmp_path, fresh_accelerate_state, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(Exception, match="no-such-encoder"):
        run_training(train_argv(text_dataset, tmp_path, "no-such-org/no-such-encoder", "--max-train-steps", "1"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(text_dataset, minilm, tmp_path,
                                                              fresh_accelerate_state, monkeypatch):
    calls = {"n": 0}
    original = TrainingLoss.__call__

    def poisoned(self, model, images, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            images = images * float("nan")
        return original(self, model, images, *args, **kwargs)

    monkeypatch.setattr(TrainingLoss, "__call__", poisoned)
    with pytest.raises(SystemExit) as stop:
        run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "6",
                                "--checkpointing-steps", "2", "--log-every", "3"))
    assert stop.value.code == 1
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["0000002"]
    assert "non-finite" in (tmp_path / "run" / "log.txt").read_text()


def test_interrupt_writes_a_checkpoint(text_dataset, minilm, tmp_path):
    argv = [sys.executable, "train.py", *train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "100000",
                                                    "--checkpointing-steps", "100000")]
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    saved = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1 and int(saved[0].name) >= 2
    assert "interrupted" in output


def test_two_process_cpu_run(text_dataset, minilm, tmp_path):
    probe = tmp_path / "probe"
    argv = [*accelerate_launch(2), "tests/rank_probe.py", "train",
            *train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "2", "--checkpointing-steps", "2")]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PROBE_DIR": str(probe)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "0000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "args.json", "ema.safetensors", "model.safetensors", "rng_state_0.pt", "rng_state_1.pt", "training_state.pt"]
    # Each process saw different data and noise, so only gradient averaging keeps their weights identical.
    rank0, rank1 = (torch.load(probe / f"rank{r}_step2.pt", weights_only=True) for r in (0, 1))
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], saved[k]) for k in saved)
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2


def test_cached_caption_embeddings_must_match_text_len(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    from preprocessing.dataset_tools import encode_text

    encode_text(text_dataset, minilm, dest=tmp_path / "text-emb", device="cpu", text_len=20)
    with pytest.raises(ValueError, match="20 tokens but --text-len is 77"):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--text-emb-dir", str(tmp_path / "text-emb"),
                                "--max-train-steps", "1"))
    run_training(train_argv(text_dataset, tmp_path, minilm, "--text-emb-dir", str(tmp_path / "text-emb"),
                            "--text-len", "20", "--max-train-steps", "1", "--checkpointing-steps", "1"))
    assert (tmp_path / "run" / "checkpoints" / "0000001" / "ema.safetensors").exists()


def test_init_from_original_checkpoint(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    original = SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=384, depth=12, num_heads=6,
                   text_dim=384, text_len=77, z_dims=[], projector_dim=2048)
    randomize(original)
    path = tmp_path / "0010000.pt"
    torch.save({"model": to_reference_layout(original), "opt": {}, "steps": 10000,
                "args": Namespace(model="SiT-S/4", projector_dim=2048)}, path)
    run_training(train_argv(text_dataset, tmp_path, minilm, "--init-from", str(path), "--learning-rate", "0",
                            "--max-train-steps", "1", "--checkpointing-steps", "1"))
    model, _ = weights(tmp_path / "run" / "checkpoints" / "0000001")
    expected = original.state_dict()
    assert all(torch.equal(model[k], expected[k]) for k in expected)


def tiny_model(proj_z_dims=(16,)):
    model = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=5,
                z_dims=list(proj_z_dims), projector_dim=16, path_drop_prob=0.0)
    randomize(model)
    return model


def gradients(proj_coeff, cfm_coeff):
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    zs = [torch.randn(4, 16, 16, generator=g)]
    out = SILoss(apply_time_shift=True)(model, x, dict(y=torch.tensor([0, 1, 2, 3])), zs,
                                       time_input=torch.rand(4, 1, 1, 1, generator=g),
                                       noises=torch.randn(4, 4, 8, 8, generator=g))
    out.total(proj_coeff, cfm_coeff).backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_repa_and_cfm_terms_change_gradients_only_when_weighted():
    base = gradients(0.0, 0.0)
    with_proj = gradients(0.5, 0.0)
    with_cfm = gradients(0.0, 0.05)
    projector = [n for n in base if n.startswith("projectors.")]
    assert all(base[n].abs().max() == 0 for n in projector)
    assert all(with_proj[n].abs().max() > 0 for n in projector)
    assert not torch.allclose(with_proj["blocks.0.attn.qkv.weight"], base["blocks.0.attn.qkv.weight"])
    assert all(with_cfm[n].abs().max() == 0 for n in projector)
    assert not torch.allclose(with_cfm["final_layer.linear.weight"], base["final_layer.linear.weight"])
    assert all(torch.equal(gradients(0.0, 0.0)[n], base[n]) for n in base)
