"""train.py's guards: flag ranges, the experiment folder lock, what resume accepts and logs, the non-finite stop."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import train
from conftest import REPO_ROOT, accelerate_launch
from loss import TrainingLoss
from test_train import run_training, train_argv


def dead_pid():
    """The PID of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(exp, pid, host=None):
    exp.mkdir(parents=True, exist_ok=True)
    lock = exp / "train.lock"
    lock.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}))
    return lock


def log_text(exp):
    return (exp / "log.txt").read_text()


def metrics(exp):
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_steps(text_dataset, minilm, tmp_path_factory):
    """An experiment trained for 2 steps with a checkpoint at each step (copy it before changing it)."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("two-steps")
    AcceleratorState._reset_state(reset_partial_state=True)
    run_training(train_argv(text_dataset, out, minilm, "--max-train-steps", "2", "--checkpointing-steps", "1"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def copy_of(two_steps, tmp_path):
    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--checkpointing-steps", "--log-every", "--batch-size", "--max-train-steps"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_intervals_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--exp-name", "x", "--data-dir", "d", flag, value])
    assert stop.value.code == 2
    assert f"{flag} must be a positive integer, got {value}" in capsys.readouterr().err


def test_every_flag_has_a_resume_family():
    from omegadit import run_state

    families = [set(run_state.FROZEN_ON_RESUME), set(run_state.APPLIED_ON_RESUME), set(run_state.NOT_COMPARED)]
    dests = {a.dest for a in train.build_parser()._actions
             if a.dest != "help" and not a.dest.startswith(run_state.ORIGINAL_FLAG_PREFIX)} | {"explicit"}
    assert sum(len(f) for f in families) == len(set().union(*families))  # no flag in two families
    assert set().union(*families) == dests


# ------------------------------------------------------------------------------------------------------------------
# The experiment lock
# ------------------------------------------------------------------------------------------------------------------

def test_second_run_refuses_while_the_first_holds_the_lock(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    lock = write_lock(tmp_path / "run", os.getpid())
    with pytest.raises(Exception, match=f"{lock}.*PID {os.getpid()} on host {socket.gethostname()}"):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "1"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.lock"]  # nothing else was written


def test_lock_of_another_host_refuses(tmp_path):
    from omegadit.locking import ExperimentLock, ExperimentLocked

    lock = write_lock(tmp_path, dead_pid(), host="some-other-host")
    with pytest.raises(ExperimentLocked, match="on host some-other-host"):
        ExperimentLock.acquire(lock)


def test_stale_lock_of_a_killed_run_does_not_block(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    pid = dead_pid()
    lock = write_lock(tmp_path / "run", pid)
    run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "1", "--checkpointing-steps", "1"))
    assert f"took over the stale lock {lock} of PID {pid}" in log_text(tmp_path / "run")
    assert not lock.exists()  # released at the end


def test_lock_is_released_when_the_run_fails(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(json.loads((text_dataset / "labels.json").read_text())[:-3]))
    with pytest.raises(ValueError, match="caption"):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--label-file", str(labels), "--max-train-steps", "1"))
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "train.lock").exists()


def test_two_processes_both_stop_when_the_folder_is_locked(text_dataset, minilm, tmp_path):
    lock = write_lock(tmp_path / "run", os.getpid())
    argv = [*accelerate_launch(2), "train.py",
            *train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "2", "--checkpointing-steps", "2")]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert f"{lock} is held by PID {os.getpid()}" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() and lock.exists()


# ------------------------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------------------------

def test_changed_learning_rate_is_applied_and_logged(two_steps, text_dataset, minilm, tmp_path,
                                                     fresh_accelerate_state):
    exp = copy_of(two_steps, tmp_path)
    run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "3", "--checkpointing-steps", "1",
                            "--resume", "latest", "--learning-rate", "5e-4", "--adam-weight-decay", "0.01"))
    log = log_text(exp)
    assert "resume: --learning-rate changed 0.001 -> 0.0005: applied" in log
    assert "resume: --max-train-steps changed 2 -> 3: applied" in log
    assert metrics(exp)[-1]["step"] == 3 and metrics(exp)[-1]["lr"] == pytest.approx(5e-4)
    state = torch.load(exp / "checkpoints" / "0000003" / "training_state.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.01


def test_changed_model_or_data_flags_are_refused(two_steps, text_dataset, minilm, tmp_path,
                                                 fresh_accelerate_state):
    exp = copy_of(two_steps, tmp_path)
    before = (exp / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"--batch-size 4 -> 8, --cfg-prob 0.3 -> 0.1.*--init-from"):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "3", "--resume", "latest",
                                "--batch-size", "8", "--cfg-prob", "0.1"))
    assert (exp / "metrics.jsonl").read_text() == before


def test_fresh_run_refuses_to_overwrite_checkpoints(two_steps, text_dataset, minilm, tmp_path,
                                                    fresh_accelerate_state):
    exp = copy_of(two_steps, tmp_path)
    with pytest.raises(FileExistsError, match="--resume latest"):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "2", "--checkpointing-steps", "1"))
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["0000001", "0000002"]


def test_resume_latest_without_checkpoint_logs_a_fresh_start(text_dataset, minilm, tmp_path,
                                                              fresh_accelerate_state):
    run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "1", "--checkpointing-steps", "1",
                            "--resume", "latest"))
    assert (f"resume: --resume latest: no complete checkpoint under {tmp_path / 'run' / 'checkpoints'}; "
            f"starting fresh at step 0") in log_text(tmp_path / "run")


def test_incomplete_newest_checkpoint_falls_back_and_missing_rng_warns(two_steps, text_dataset, minilm, tmp_path,
                                                                      fresh_accelerate_state):
    exp = copy_of(two_steps, tmp_path)
    (exp / "checkpoints" / "0000002" / "training_state.pt").unlink()
    (exp / "checkpoints" / "0000001" / "rng_state_0.pt").unlink()
    run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "2", "--checkpointing-steps", "1",
                            "--resume", "latest"))
    log = log_text(exp)
    assert f"resume: skipped incomplete checkpoint {exp / 'checkpoints' / '0000002'} (training_state.pt missing)" in log
    assert f"resume: WARNING: {exp / 'checkpoints' / '0000001'} has no rng_state_0.pt" in log
    assert "the resume is not exact" in log
    assert f"resumed from {exp / 'checkpoints' / '0000001'} at step 1" in log
    assert (exp / "checkpoints" / "0000002" / "training_state.pt").exists()


# ------------------------------------------------------------------------------------------------------------------
# Non-finite loss
# ------------------------------------------------------------------------------------------------------------------

def poison_after(monkeypatch, calls):
    """Make the loss NaN from call `calls + 1` on."""
    seen = {"n": 0}
    original = TrainingLoss.__call__

    def poisoned(self, model, images, *args, **kwargs):
        seen["n"] += 1
        return original(self, model, images * float("nan") if seen["n"] > calls else images, *args, **kwargs)

    monkeypatch.setattr(TrainingLoss, "__call__", poisoned)


def test_non_finite_stop_names_the_last_good_checkpoint(text_dataset, minilm, tmp_path, fresh_accelerate_state,
                                                        monkeypatch):
    poison_after(monkeypatch, 2)
    with pytest.raises(SystemExit):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "6", "--checkpointing-steps",
                                "2", "--log-every", "3"))
    good = tmp_path / "run" / "checkpoints" / "0000002"
    assert f"non-finite loss at or before step 3; the last good checkpoint is {good}" in log_text(tmp_path / "run")


def test_non_finite_stop_without_checkpoint_says_none_exists(text_dataset, minilm, tmp_path,
                                                             fresh_accelerate_state, monkeypatch):
    poison_after(monkeypatch, 1)
    with pytest.raises(SystemExit):
        run_training(train_argv(text_dataset, tmp_path, minilm, "--max-train-steps", "6", "--checkpointing-steps",
                                "5", "--log-every", "2"))
    log = log_text(tmp_path / "run")
    assert "non-finite loss at or before step 2; no good checkpoint exists: this run saved none" in log
    assert "last good checkpoint" not in log


def test_a_run_without_ema_resumes_from_its_checkpoint(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    """Checkpoints of --no-ema runs hold no ema.safetensors; they are complete, and --resume latest takes them."""
    run_training(train_argv(text_dataset, tmp_path, minilm, "--no-ema", "--max-train-steps", "2",
                            "--checkpointing-steps", "2"))
    run_training(train_argv(text_dataset, tmp_path, minilm, "--no-ema", "--max-train-steps", "3",
                            "--checkpointing-steps", "3", "--resume", "latest"))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "checkpoints/0000002 at step 2" in log and "starting fresh" not in log
    assert not (tmp_path / "run" / "checkpoints" / "0000003" / "ema.safetensors").exists()
