"""The built-in demo end to end (the `tiny` preset, and the `dit-cpu` class preset shrunk: every stage, a few seconds
each), its guards, the class labels of the shapes data and the scoring of class-conditional samples."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from demo import conditions
from demo import run as demo
from demo.shapes import CLASS_NAMES, make_dataset, render
from evaluations import alignment


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
    assert Image.open(results["grids"]["held_out"]).size[0] > 0 and Image.open(results["grids"]["seen"]).size[0] > 0
    assert [p.name for p in (work / "logs").glob("sample_*.log")] == ["sample_all.log"]  # one generate.py call
    assert f"sample grid (held-out prompts): {results['grids']['held_out']}" in result.stdout
    held_out = (work / "data" / "holdout_prompts.txt").read_text().splitlines()
    assert all(any(combo.split()[0] in p and combo.split()[1] in p for combo in demo.HOLDOUT) for p in held_out)
    train_log = (work / "exps" / demo.EXP_NAME / "log.txt").read_text()
    assert "--enc-type none" in train_log


def test_overrides_apply_on_top_of_the_preset():
    settings = demo.settings_from(demo.parse_args(["--preset", "cpu", "--steps", "7", "--holdout", "red circle"]))
    assert settings["steps"] == 7 and settings["holdout"] == ["red circle"]
    assert settings["batch_size"] == demo.PRESETS["cpu"]["batch_size"]
    settings = demo.settings_from(demo.parse_args(["--preset", "cpu", "--lr-schedule", "cosine", "--sample-batch", "8"]))
    assert settings["lr_schedule"] == "cosine" and settings["sample_batch"] == 8  # keys the cpu preset leaves out


def test_refuses_a_folder_that_is_not_a_demo_run(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(SystemExit, match="not empty"):
        demo.main(["--preset", "tiny", "--workdir", str(tmp_path)])
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_overwrite_keeps_the_compile_cache_that_train_py_is_given(tmp_path, monkeypatch):
    demo.prepare_workdir(tmp_path)
    for folder in ("exps", "samples", demo.COMPILE_CACHE):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "f").write_text("x")
    demo.prepare_workdir(tmp_path, overwrite=True)
    assert not (tmp_path / "exps").exists() and not (tmp_path / "samples").exists()
    assert (tmp_path / demo.COMPILE_CACHE / "f").read_text() == "x"

    commands = []
    checkpoint = tmp_path / "exps" / demo.EXP_NAME / "checkpoints" / "0000002"

    def record(command, log_path, show=None):
        commands.append(list(map(str, command)))
        checkpoint.mkdir(parents=True)

    monkeypatch.setattr(demo, "run_tool", record)
    assert demo.train(demo.settings_from(demo.parse_args(["--preset", "tiny"])), tmp_path) == checkpoint
    [command] = commands
    assert command[command.index("--compile-cache") + 1] == str(tmp_path / demo.COMPILE_CACHE)


def test_gpu_preset_samples_uncompiled(tmp_path, monkeypatch):
    commands = []
    settings = demo.settings_from(demo.parse_args(["--preset", "gpu"]))
    monkeypatch.setattr(demo, "run_tool", lambda command, *_, **__: commands.append(list(map(str, command))))
    demo.generate(settings, tmp_path, tmp_path / "ckpt", "all", [])
    assert "--no-compile" in commands[0]
    assert "--no-compile" not in demo.conditions.train_flags(settings)
    assert "--cuda-graphs" in demo.conditions.train_flags(settings)


@pytest.mark.parametrize("gpus", [1, 2])
def test_gpu_preset_trains_with_cuda_graphs_on_one_gpu_only(gpus, tmp_path, monkeypatch):
    commands = []
    settings = demo.settings_from(demo.parse_args(["--preset", "gpu"]))
    monkeypatch.setattr(demo, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(demo, "run_tool", lambda command, *_, **__: commands.append(list(map(str, command))))
    with pytest.raises(demo.StageError):  # no checkpoint was written: nothing ran
        demo.train(settings, tmp_path)
    assert ("--cuda-graphs" in commands[0]) == (gpus == 1)
    assert "--compile-mode" in commands[0]


def test_class_preset_runs_every_stage_and_scores_colour_and_shape(tmp_path):
    """dit-cpu shrunk to a few seconds: class labels written and carried to vae-in, DiT trained on them, one sample
    a class with DiT's default sampler, scored on colour and shape only."""
    work = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "demo.run", "--preset", "dit-cpu", "--workdir", str(work),
                             "--num-images", "48", "--steps", "2", "--sample-steps", "2", "--images-per-prompt", "1",
                             "--num-prompts", "2"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = work / "data"
    labels = json.loads((data / "vae-in" / "dataset.json").read_text())["labels"]
    assert len(labels) == 48 and all(name.endswith(".npy") for name, _ in labels)
    assert (data / "class_names.txt").read_text().splitlines() == list(CLASS_NAMES)
    exp = work / "exps" / demo.EXP_NAME
    assert "objective gaussian" in (exp / "log.txt").read_text()
    train_args = json.loads((exp / "args.json").read_text())
    assert train_args["num_classes"] == 24 and not train_args["use_json_dataset"] and train_args["cfm_coeff"] == 0
    assert "(ddpm, 2 steps)" in (work / "logs" / "sample_classes.log").read_text()
    results = json.loads((work / "demo_results.json").read_text())
    scores = results["scores"]
    assert scores["all"]["n"] == len(CLASS_NAMES) and scores["held_out"]["n"] == 0
    assert scores["all"]["size"] is None and scores["all"]["position"] is None
    assert 0.0 <= scores["all"]["colour"] <= 1.0 and 0.0 <= scores["all"]["shape"] <= 1.0
    assert f"sample grid (one per class): {results['grids']['classes']}" in result.stdout


def test_class_labels_follow_colour_and_shape(tmp_path):
    meta = make_dataset(tmp_path, 40, resolution=16, class_labels=True, num_prompts=2)
    labels = dict(json.loads((tmp_path / "images" / "dataset.json").read_text())["labels"])
    assert len(labels) == 40 and meta["classes"] == list(CLASS_NAMES) == (tmp_path / "class_names.txt").read_text(
    ).splitlines()
    for image_id, attrs in meta["attributes"].items():
        assert CLASS_NAMES[labels[f"{image_id}.png"]] == f"{attrs['colour']} {attrs['shape']}"
    assert len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 24
    make_dataset(tmp_path / "text", 4, resolution=16, num_prompts=2)
    assert not (tmp_path / "text" / "images" / "dataset.json").exists()


def test_class_folders_give_the_class_labels_an_image_folder_reads(tmp_path):
    """--class-folders: one folder per class, numbered as ImageFolderDataset numbers them (sorted folder names),
    so that the labels train.py reads are the classes class_names.txt names; the U-Net presets train on them."""
    from image_folder_dataset import ImageFolderDataset

    meta = make_dataset(tmp_path, 120, resolution=16, class_folders=True, num_prompts=2)
    dataset = ImageFolderDataset(tmp_path / "classes", "pixel:1")
    assert dataset.num_classes_for(1000, False) == len(CLASS_NAMES) == 24
    by_name = {f"{image_id.split('/')[-1]}.png": attrs for image_id, attrs in meta["attributes"].items()}
    for path, label in zip(dataset.files, dataset.labels):
        attrs = by_name[os.path.basename(path)]
        assert CLASS_NAMES[label] == f"{attrs['colour']} {attrs['shape']}"
    with pytest.raises(ValueError, match="no images of the classes"):
        make_dataset(tmp_path / "few", 10, resolution=16, class_folders=True, num_prompts=2)
    s = demo.settings_from(demo.parse_args(["--preset", "ddpm-cpu"]))
    assert "--class-folders" in conditions.data_flags(s)
    assert conditions.train_data_dir(s, tmp_path) == tmp_path / "classes"


def test_class_samples_are_scored_on_the_attributes_the_class_fixes(tmp_path):
    """Rendered shapes of every class, one with the wrong colour: colour and shape are scored, size and position
    (which a class leaves free) are not."""
    images = [render(dict(zip(("colour", "shape"), name.split()), size="large", position=position), 32)
              for name, position in zip(CLASS_NAMES, ["left", "top", "centre"] * 8)]
    images[0] = render(dict(colour="blue", shape="circle", size="small", position="right"), 32)  # class 0: red circle
    np.savez(tmp_path / "samples.npz", arr_0=np.stack(images * 2))
    (tmp_path / "class_names.txt").write_text("".join(f"{name}\n" for name in CLASS_NAMES))
    scores = alignment.main(["--images", str(tmp_path / "samples.npz"), "--class-names",
                             str(tmp_path / "class_names.txt")])
    assert scores["all"]["n"] == 48
    assert scores["all"]["colour"] == 46 / 48 and scores["all"]["shape"] == 1.0
    assert scores["all"]["size"] is None and scores["all"]["position"] is None


def test_class_presets_pass_their_conditioning_to_every_stage(tmp_path):
    s = demo.settings_from(demo.parse_args(["--preset", "lightningdit-gpu"]))
    assert s["holdout"] == [] and conditions.data_flags(s) == ["--class-labels"]
    flags = list(map(str, conditions.train_flags(s)))
    assert flags[:2] == ["--num-classes", "24"] and "--use-json-dataset" not in flags and "--shift-base" not in flags
    assert "--weighting" not in flags  # the objective's own logit-normal times (train.py passes only flags given)
    [(group, prompts, condition)] = conditions.sample_jobs(s, tmp_path)
    assert group == "classes" and prompts == tmp_path / "class_names.txt"
    assert condition[:3] == ["--balanced-sampling", "--num-fid-samples", 24 * s["images_per_prompt"]]
    assert conditions.sampler_flags(s) == ["--cfg-scale", 1.0]  # the backbone's sampler and step count
    assert conditions.images_per_prompt(s) == 1
    text = demo.settings_from(demo.parse_args(["--preset", "uvit-text-cpu"]))
    assert text["holdout"] == list(demo.HOLDOUT) and "--use-json-dataset" in conditions.train_flags(text)
    assert [job[0] for job in conditions.sample_jobs(text, tmp_path)] == ["held_out", "seen"]
