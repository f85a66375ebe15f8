"""The demo driver's console progress, stage logs, child environment and reruns (no stage is really run)."""
import shlex
import sys

import pytest

from demo import run as demo

FAKE_TRAIN = r"""
import sys
for step in (1, 2):
    sys.stderr.write(f"\rtrain: {step * 25}%|##   | {step}/4 [00:0{step}<00:03]\r{' ' * 40}\r")  # tqdm.write
    print(f"step {step}: loss 0.5000 (denoise 0.5000) lr 1.00e-03 grad_norm 0.100 1.500s/step "
          "(data wait 0.010s) 5.0 img/s")
print("[2026-01-01 00:00:00] saved checkpoint exps/shapes/checkpoints/0000004")
print("[2026-01-01 00:00:01] done at step 4: 4 steps in 6.0s")
print("a line the console does not need")
"""


def test_stage_log_starts_with_the_exact_command(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    command = [sys.executable, "-c", "print('hello')"]
    demo.run_tool(command, tmp_path / "tool.log")
    first, second = (tmp_path / "tool.log").read_text().splitlines()
    assert first == f"$ cd {shlex.quote(str(demo.REPO_ROOT))} && OMP_NUM_THREADS=3 {shlex.join(command)}"
    assert second == "hello"


@pytest.mark.parametrize("user_value, child_value", [(None, "1"), ("4", "4")])
def test_tools_run_with_one_openmp_thread_unless_set(user_value, child_value, tmp_path, monkeypatch):
    if user_value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", user_value)
    demo.run_tool([sys.executable, "-c", "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"],
                  tmp_path / "tool.log")
    assert f"threads {child_value}" in (tmp_path / "tool.log").read_text().splitlines()


def test_training_progress_reaches_the_console_with_an_eta(tmp_path, capsys):
    demo.run_tool([sys.executable, "-c", FAKE_TRAIN], tmp_path / "train.log", show=demo.training_progress(4))
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "    step 1/4: loss 0.5000 (denoise 0.5000) lr 1.00e-03 grad_norm 0.100 1.500s/step (data wait 0.010s) "
        "5.0 img/s; ETA 0m04s",
        "    step 2/4: loss 0.5000 (denoise 0.5000) lr 1.00e-03 grad_norm 0.100 1.500s/step (data wait 0.010s) "
        "5.0 img/s; ETA 0m03s",
        "    [2026-01-01 00:00:00] saved checkpoint exps/shapes/checkpoints/0000004",
        "    [2026-01-01 00:00:01] done at step 4: 4 steps in 6.0s",
    ]


def previous_run(work):
    """A work folder as a finished demo run leaves it."""
    checkpoint = work / "exps" / demo.EXP_NAME / "checkpoints" / "0000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "ema.safetensors").write_bytes(b"weights")
    (work / "logs").mkdir()
    (work / demo.MARKER).touch()
    return checkpoint


def stop_at_first_stage(monkeypatch):
    def stop(*args):
        raise demo.StageError("stopped by the test")
    monkeypatch.setattr(demo, "make_data", stop)


def test_rerun_refuses_to_delete_a_previous_run_without_overwrite(tmp_path, monkeypatch):
    checkpoint = previous_run(tmp_path)
    stop_at_first_stage(monkeypatch)
    with pytest.raises(SystemExit, match=f"holds a previous demo run .*checkpoint {checkpoint}.*--overwrite"):
        demo.main(["--preset", "tiny", "--workdir", str(tmp_path)])
    assert (checkpoint / "ema.safetensors").read_bytes() == b"weights"


def test_overwrite_says_what_it_deletes(tmp_path, monkeypatch, capsys):
    checkpoint = previous_run(tmp_path)
    stop_at_first_stage(monkeypatch)
    with pytest.raises(SystemExit, match="stopped by the test"):
        demo.main(["--preset", "tiny", "--workdir", str(tmp_path), "--overwrite"])
    assert f"--overwrite: deleting the previous demo run in {tmp_path} (exps/, logs/; checkpoint {checkpoint})" in (
        capsys.readouterr().out)
    assert not (tmp_path / "exps").exists()
