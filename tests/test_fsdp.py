"""train.py --fsdp on 2 CPU processes (gloo): the same weights as DDP, an exact resume from sharded checkpoints,
and consolidation into the weights file generate.py samples. One launch runs all the training commands."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import generate
import train
from conftest import REPO_ROOT, add_shape_class_labels
from omegadit import checkpoint, sharding
from omegadit.consolidate import consolidate


def train_argv(data, out, exp, *extra):
    return ["--exp-name", exp, "--output-dir", str(out), "--data-dir", str(data), "--num-classes", "3",
            "--tokenizer", "pixel", "--model", "SiT-T/2", "--enc-type", "none", "--batch-size", "8",
            "--gradient-accumulation-steps", "2", "--num-workers", "0", "--log-every", "1",
            "--mixed-precision", "no", "--learning-rate", "1e-3", "--ema-decay", "0.9", "--path-drop-prob", "0.3",
            "--sprint-drop-ratio", "0.25", "--max-train-steps", "3", *extra]


def launch_two_processes(commands, tmp_path):
    """Run train.py commands one after another in one 2-process CPU launch (tests/train_sequence.py)."""
    commands_file = tmp_path / "commands.json"
    commands_file.write_text(json.dumps(commands))
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            "29531", "tests/train_sequence.py", str(commands_file)]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def metrics(exp_dir):
    return [json.loads(line) for line in (exp_dir / "metrics.jsonl").read_text().splitlines()]


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(text_dataset, tmp_path_factory):
    """DDP, FSDP (+ gradient checkpointing) and HSDP (shards of 1 process, replicated twice) for 3 steps from the
    same seed, and an FSDP run resumed at step 2 of the other, all on 2 processes with different data per process
    and 2 micro-batches per step."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = tmp / "data"
    shutil.copytree(text_dataset, data)
    add_shape_class_labels(data)
    out = tmp / "exps"
    fsdp = ("--fsdp", "--gradient-checkpointing", "--checkpointing-steps", "2")
    launch_two_processes([
        train_argv(data, out, "ddp", "--checkpointing-steps", "3"),
        train_argv(data, out, "fsdp", *fsdp),
        train_argv(data, out, "resumed", *fsdp, "--resume", str(out / "fsdp" / "checkpoints" / "0000002")),
        train_argv(data, out, "hsdp", "--fsdp", "--fsdp-shard-size", "1", "--checkpointing-steps", "3"),
    ], tmp)
    return out


@pytest.mark.parametrize("exp", ["fsdp", "hsdp"])
def test_fsdp_steps_equal_ddp_steps(runs, exp):
    ddp, fsdp = runs / "ddp" / "checkpoints" / "0000003", runs / exp / "checkpoints" / "0000003"
    if exp == "fsdp":  # one file per process (HSDP's replicas may divide the writing differently)
        assert sorted(p.name for p in (fsdp / sharding.SHARDED_DIR).iterdir()) == [
            "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    for part in ("model", "ema"):
        trained = sharding.read_full(fsdp, part)
        assert max_difference(trained, load_file(str(ddp / f"{part}.safetensors"))) <= 1e-5
    ddp_records, fsdp_records = metrics(runs / "ddp"), metrics(runs / exp)
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in fsdp_records] == pytest.approx([r[key] for r in ddp_records], rel=1e-5)


def test_steps_moved_the_weights(runs):
    start = sharding.read_full(runs / "fsdp" / "checkpoints" / "0000002", "model")
    assert max_difference(sharding.read_full(runs / "fsdp" / "checkpoints" / "0000003", "model"), start) > 1e-4


def test_resume_from_shards_repeats_the_uninterrupted_run(runs):
    once, resumed = runs / "fsdp" / "checkpoints" / "0000003", runs / "resumed" / "checkpoints" / "0000003"
    assert "at step 2" in (runs / "resumed" / "log.txt").read_text()
    for part in ("model", "ema"):
        assert max_difference(sharding.read_full(once, part), sharding.read_full(resumed, part)) <= 1e-6
    assert [r["loss"] for r in metrics(runs / "resumed")] == [metrics(runs / "fsdp")[-1]["loss"]]


def test_consolidated_weights_sample_with_generate(runs, tmp_path, fresh_accelerate_state):
    saved = runs / "fsdp" / "checkpoints" / "0000003"
    out = consolidate(saved, tmp_path / "ema.safetensors")
    assert max_difference(load_file(str(out)), load_file(str(saved / "ema.safetensors"))) == 0
    loaded = checkpoint.load(out)
    assert loaded.description["backbone"]["name"] == "SiT-T/2" and loaded.latent_stats is not None
    assert max_difference(loaded.model.state_dict(), sharding.read_full(saved, "ema")) == 0
    generate.main(generate.parse_args(["--ckpt", str(out), "--sample-dir", str(tmp_path / "samples"), "--name", "s",
                                       "--num-fid-samples", "2", "--num-steps", "2", "--mixed-precision", "no"]))
    with np.load(tmp_path / "samples" / "s.npz") as f:
        assert f["arr_0"].shape == (2, 32, 32, 3)


def test_shards_alone_need_consolidation(runs, tmp_path):
    shards_only = tmp_path / "0000003"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "0000003", shards_only)
    (shards_only / "ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="omegadit.consolidate"):
        checkpoint.load(shards_only)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        consolidate(runs / "ddp" / "checkpoints" / "0000003", tmp_path / "x.safetensors")


def test_resuming_across_fsdp_and_ddp_is_refused(runs, tmp_path):
    args = train.parse_args(train_argv(runs, tmp_path, "x", "--resume", str(runs / "fsdp" / "checkpoints" / "0000002")))
    with pytest.raises(ValueError, match="--fsdp True -> False"):
        train.plan_resume(args)


def test_single_process_fsdp_without_launcher(runs, tmp_path, fresh_accelerate_state):
    train.main(train.parse_args(train_argv(runs.parent / "data", tmp_path, "one", "--fsdp", "--max-train-steps", "1",
                                           "--checkpointing-steps", "1", "--no-ema")))
    assert not torch.distributed.is_initialized()  # end_training() ended the one-process group
    saved = tmp_path / "one" / "checkpoints" / "0000001"
    assert sharding.saved_parts(saved) == {"model", "optimizer"}
    assert max_difference(sharding.read_full(saved, "model"), load_file(str(saved / "model.safetensors"))) == 0


def test_one_process_resumes_the_shards_of_two(runs, tmp_path, fresh_accelerate_state):
    saved = runs / "fsdp" / "checkpoints" / "0000002"
    train.main(train.parse_args(train_argv(runs.parent / "data", tmp_path, "alone", "--fsdp", "--resume", str(saved),
                                           "--learning-rate", "0", "--checkpointing-steps", "3")))
    assert f"resumed from {saved} at step 2" in (tmp_path / "alone" / "log.txt").read_text()
    # learning rate 0: the step leaves the weights as the 2-process shards were re-cut into one process
    assert max_difference(sharding.read_full(tmp_path / "alone" / "checkpoints" / "0000003", "model"),
                          sharding.read_full(saved, "model")) == 0


def test_fsdp_benchmark_case_runs_on_cpu(fresh_accelerate_state, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench_fsdp

    try:
        result = bench_fsdp.run_case("SiT-T/2", "fsdp", True, 2, torch.device("cpu"), mixed_precision="no",
                                     compile_model=False, warmup=1, iters=1, latent=(4, 8, 8), text=(8, 16),
                                     repa=(16, 16))
    finally:
        torch.distributed.destroy_process_group()
    assert result["img_s"] > 0 and result["mode"] == "fsdp"


def test_fsdp_with_fp8_is_a_usage_error(capsys):
    import train

    with pytest.raises(SystemExit):
        train.parse_args(["--exp-name", "x", "--data-dir", "unused", "--fsdp", "--fp8"])
    assert "--fp8 with --fsdp is not supported" in capsys.readouterr().err
