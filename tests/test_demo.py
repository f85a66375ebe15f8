"""The built-in demo end to end (the `tiny` preset: every stage, a few seconds each) and its guards."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO_ROOT
from demo import run as demo


def test_tiny_preset_runs_every_stage_and_reports_scores(tmp_path):
    work = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-m", "demo.run", "--preset", "tiny", "--workdir", str(work)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "REPA is off" in result.stdout
    for stage in range(1, 6):
        assert f"[{stage}/5]" in result.stdout
    results = json.loads((work / "demo_results.json").read_text())
    scores = results["scores"]
    assert scores["held_out"]["n"] == scores["seen"]["n"] == results["settings"]["num_prompts"]
    for group in ("all", "seen", "held_out"):
        for attribute in ("colour", "shape", "size", "position", "all_attributes"):
            assert 0.0 <= scores[group][attribute] <= 1.0
    assert Image.open(results["grids"]["held_out"]).size[0] > 0
    assert f"sample grid (held-out prompts): {results['grids']['held_out']}" in result.stdout
    held_out = (work / "data" / "holdout_prompts.txt").read_text().splitlines()
    assert all(any(combo.split()[0] in p and combo.split()[1] in p for combo in demo.HOLDOUT) for p in held_out)
    train_log = (work / "exps" / demo.EXP_NAME / "log.txt").read_text()
    assert "--enc-type none" in train_log


def test_overrides_apply_on_top_of_the_preset():
    settings = demo.settings_from(demo.parse_args(["--preset", "cpu", "--steps", "7", "--holdout", "red circle"]))
    assert settings["steps"] == 7 and settings["holdout"] == ["red circle"]
    assert settings["batch_size"] == demo.PRESETS["cpu"]["batch_size"]


def test_refuses_a_folder_that_is_not_a_demo_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="not empty"):
        demo.main(["--preset", "tiny", "--workdir", str(tmp_path)])
    assert (tmp_path / "thesis.tex").read_text() == "precious"
