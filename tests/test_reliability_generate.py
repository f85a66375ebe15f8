"""generate.py's guards: flag ranges checked before loading, the sample-folder manifest, default names that differ
with the settings, the prompt truncation warning, and eval.sh's default name."""
import json
import os
import shutil
import subprocess

import pytest

import generate
from conftest import REPO_ROOT
from test_generate import checkpoint, generate_argv, pngs, run_generate, save_legacy_weights, text_model  # noqa: F401


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle on the left\na small blue square at the top\n")
    return path


@pytest.fixture(scope="module")
def sampled(checkpoint, prompts, tmp_path_factory):  # noqa: F811
    """A folder 'g' sampled with generate_argv's settings."""
    out = tmp_path_factory.mktemp("sampled")
    run_generate(generate_argv(checkpoint, prompts, out, "g"))
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if generate.py loads a checkpoint."""
    def refuse(*args, **kwargs):
        raise AssertionError("generate.py loaded the checkpoint before checking its arguments")
    monkeypatch.setattr(generate.checkpoint, "load", refuse)


def other_checkpoint(checkpoint, tmp_path):  # noqa: F811
    """A checkpoint of another experiment at the same step: same folder name, other weights."""
    other = tmp_path / "other-exp" / checkpoint.name
    shutil.copytree(checkpoint, other)
    model = text_model()
    model.final_layer.linear.bias.data += 0.5
    save_legacy_weights(model, other / "ema.safetensors")
    return other


# ------------------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--num-steps", "0"], "--num-steps must be a positive integer, got 0"),
    (["--per-proc-batch-size", "0"], "--per-proc-batch-size must be a positive integer, got 0"),
    (["--num-images-per-prompt", "0"], "--num-images-per-prompt must be a positive integer, got 0"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number, got inf"),
    (["--guidance-low", "0.8", "--guidance-high", "0.2"], "--guidance-low 0.8 and --guidance-high 0.2"),
])
def test_bad_flags_stop_before_loading(extra, message, prompts, tmp_path, no_loading, capsys):
    with pytest.raises(SystemExit) as stop:
        run_generate(generate_argv(tmp_path / "ckpt", prompts, tmp_path, "x", *extra))
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_sample_dir_stops_before_loading(prompts, tmp_path, no_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"--sample-dir {blocker / 'samples'} is not a writable folder"):
        run_generate(generate_argv(tmp_path / "ckpt", prompts, blocker / "samples", "x"))


def test_long_prompts_are_counted_in_one_warning(checkpoint, tmp_path, capsys):  # noqa: F811
    long = "a small red circle on the left next to a large blue square at the top of a green triangle"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle\n{long}\n{long} again\n")
    run_generate(generate_argv(checkpoint, prompts, tmp_path, "long", "--num-steps", "1"))
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1
    assert f"WARNING: 2 of 3 prompts are longer than the model's 16 caption tokens and are truncated, e.g. {long!r}" in out


# ------------------------------------------------------------------------------------------------------------------
# The sample-folder manifest
# ------------------------------------------------------------------------------------------------------------------

def test_manifest_records_weights_prompts_and_settings(sampled, checkpoint):  # noqa: F811
    manifest = json.loads((sampled / "g" / "manifest.json").read_text())
    assert manifest["checkpoint"] == str((checkpoint / "ema.safetensors").resolve())
    assert len(manifest["weights_fingerprint"]) == 64 and len(manifest["conditions_sha256"]) == 64
    assert manifest["num_images"] == 2 and manifest["sampler"] == "euler" and manifest["num_steps"] == 3
    assert manifest["cfg_scale"] == 2.0 and manifest["guidance_interval"] == [0.0, 1.0]
    assert manifest["ema"] and not manifest["path_drop"] and manifest["global_seed"] == 0
    assert manifest["autoencoder"] == "pixel" and manifest["objective"]["name"] == "flow"


@pytest.mark.parametrize("change, difference", [
    (["--guidance-low", "0.3"], "guidance_interval: [0.0, 1.0] -> [0.3, 1.0]"),
    (["--path-drop"], "path_drop: False -> True"),
    (["--heun"], "sampler: euler -> heun"),
    (["--no-ema"], "ema: True -> False"),
    (["--sampler", "sde"], "sampler: euler -> sde"),
    (["--num-images-per-prompt", "2"], "num_images: 2 -> 4"),
])
def test_same_name_with_other_settings_is_refused(sampled, checkpoint, prompts, change, difference):  # noqa: F811
    before = {p.name: p.stat().st_mtime_ns for p in (sampled / "g").iterdir()}
    with pytest.raises(FileExistsError, match="made with other settings") as refusal:
        run_generate(generate_argv(checkpoint, prompts, sampled, "g", *change))
    assert difference in str(refusal.value)
    assert {p.name: p.stat().st_mtime_ns for p in (sampled / "g").iterdir()} == before


def test_same_name_with_other_prompts_or_weights_is_refused(sampled, checkpoint, prompts, tmp_path):  # noqa: F811
    others = tmp_path / "others.txt"
    others.write_text("a green triangle\na yellow circle\n")
    with pytest.raises(FileExistsError, match="conditions_sha256"):
        run_generate(generate_argv(checkpoint, others, sampled, "g"))
    with pytest.raises(FileExistsError, match="weights_fingerprint"):
        run_generate(generate_argv(other_checkpoint(checkpoint, tmp_path), prompts, sampled, "g"))


def test_same_weights_at_another_path_resume_the_folder(sampled, checkpoint, prompts, tmp_path):  # noqa: F811
    moved = tmp_path / "moved" / checkpoint.name
    shutil.copytree(checkpoint, moved)
    (sampled / "g" / "000001.png").rename(tmp_path / "kept.png")
    run_generate(generate_argv(moved, prompts, sampled, "g"))
    assert sorted(pngs(sampled / "g")) == ["000000.png", "000001.png"]


def test_images_without_manifest_are_refused(checkpoint, prompts, tmp_path):  # noqa: F811
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "000000.png").write_bytes(b"png")
    with pytest.raises(FileExistsError, match="holds 1 images but no manifest.json"):
        run_generate(generate_argv(checkpoint, prompts, tmp_path, "old"))
    assert (legacy / "000000.png").read_bytes() == b"png"


def test_default_names_differ_with_any_setting(checkpoint, tmp_path):  # noqa: F811
    prompt = ["--prompt", "a red circle", "--num-steps", "1", "--mode", "ode", "--mixed-precision", "no"]
    base = ["--sample-dir", str(tmp_path / "s"), *prompt]
    run_generate(["--ckpt", str(checkpoint), *base])
    run_generate(["--ckpt", str(checkpoint), *base, "--guidance-high", "0.5"])
    run_generate(["--ckpt", str(other_checkpoint(checkpoint, tmp_path)), *base])
    folders = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert len(folders) == 3
    assert all(name.startswith("0000010-ema-euler1-cfg4.0-seed0-") for name in folders)


# ------------------------------------------------------------------------------------------------------------------
# eval.sh
# ------------------------------------------------------------------------------------------------------------------

def eval_sh_name(tmp_path, **settings):
    """The --name eval.sh passes to generate.py (torchrun and python replaced by stubs that record their args)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "calls.txt"
    for tool in ("torchrun", "python"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
        (bin_dir / tool).chmod(0o755)
    record.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CKPT": "exps/a/checkpoints/0000010",
           **settings}
    subprocess.run(["sh", "eval.sh"], cwd=REPO_ROOT, env=env, check=True, timeout=60)
    words = record.read_text().splitlines()[0].split()
    return words[words.index("--name") + 1]


def test_eval_sh_default_name_differs_with_the_settings(tmp_path):
    base = eval_sh_name(tmp_path)
    assert base.startswith("eval-0000010-original-seed0-")  # eval.sh's default recipe is the original's
    assert eval_sh_name(tmp_path) == base
    others = [eval_sh_name(tmp_path, GUIDANCE_LOW="0.2"), eval_sh_name(tmp_path, EXTRA="--path-drop"),
              eval_sh_name(tmp_path, CKPT="exps/b/checkpoints/0000010"), eval_sh_name(tmp_path, PROMPTS="p.txt"),
              eval_sh_name(tmp_path, NUM_SAMPLES="100"), eval_sh_name(tmp_path, RECIPE="omegadit")]
    assert len({base, *others}) == 7
    assert eval_sh_name(tmp_path, NAME="mine") == "mine"
