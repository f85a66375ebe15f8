"""Shapes demo: deterministic dataset, held-out combinations, caption parsing and the alignment scorer."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from demo.shapes import (
    ATTRIBUTES,
    BACKGROUND,
    PALETTE,
    VALUES,
    all_combinations,
    caption,
    make_dataset,
    matches,
    parse_caption,
    parse_holdout,
    phrasings,
    render,
    sample_attributes,
)
from evaluations.alignment import load_samples, main as alignment_main, measure, score

REPO_ROOT = Path(__file__).resolve().parents[1]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _attrs(item):
    return {key: item[key] for key in ATTRIBUTES}


def _samples(count, resolution, seed):
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng) for _ in range(count)]
    return attrs, [render(a, resolution) for a in attrs]


def test_make_dataset_is_deterministic_in_the_dataset_layout(tmp_path):
    kwargs = dict(num=60, resolution=32, holdout=["red triangle"], num_prompts=8, per_folder=25)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_dataset(tmp_path / name, seed=seed, **kwargs)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert a == b
    assert set(a) == set(c)
    assert a["labels.json"] != c["labels.json"]
    assert sum(a[key] != c[key] for key in a if key.endswith(".png")) > 30

    labels = json.loads(a["labels.json"])
    meta = json.loads(a["demo_meta.json"])
    assert len(labels) == 60 and labels[30]["id"] == "data_000001/img_00000030"
    assert (meta["seed"], meta["resolution"], meta["num"], meta["holdout"]) == (0, 32, 60, ["red triangle"])
    for item in labels:
        assert set(item) == {"id", "en"} and re.fullmatch(r"data_\d{6}/img_\d{8}", item["id"])
        truth = _attrs(meta["attributes"][item["id"]])
        assert parse_caption(item["en"]) == truth
        with Image.open(tmp_path / "a" / "images" / f"{item['id']}.png") as image:
            assert image.size == (32, 32) and image.mode == "RGB"
            assert measure(np.asarray(image)) == truth
    with pytest.raises(FileExistsError):
        make_dataset(tmp_path / "a", seed=0, **kwargs)


def test_workers_write_the_same_files(tmp_path):
    kwargs = dict(num=1100, resolution=16, num_prompts=4, per_folder=400, masks=True)
    make_dataset(tmp_path / "one", workers=0, **kwargs)
    make_dataset(tmp_path / "three", workers=3, **kwargs)
    one, three = _files(tmp_path / "one"), _files(tmp_path / "three")
    assert sum(key.startswith("masks/") for key in one) >= 1100 and sum(key.endswith(".png") for key in one) >= 2200
    assert one == three


def test_held_out_combinations_stay_out_of_training(tmp_path):
    holdout = ["red triangle", "blue circle", "small left"]
    specs = [parse_holdout(text) for text in holdout]
    assert specs == [{"colour": "red", "shape": "triangle"}, {"colour": "blue", "shape": "circle"},
                     {"size": "small", "position": "left"}]
    make_dataset(tmp_path, 400, seed=5, holdout=holdout, num_prompts=64)
    labels = json.loads((tmp_path / "labels.json").read_text())
    meta = json.loads((tmp_path / "demo_meta.json").read_text())
    trained = [parse_caption(item["en"]) for item in labels]
    assert not any(matches(a, spec) for a in trained for spec in specs)
    assert not any(matches(a, spec) for a in meta["attributes"].values() for spec in specs)
    assert len({tuple(a.values()) for a in trained}) > 150

    held = (tmp_path / "holdout_prompts.txt").read_text().splitlines()
    seen = (tmp_path / "seen_prompts.txt").read_text().splitlines()
    assert len(held) == len(seen) == 64
    held_attrs = [parse_caption(line) for line in held]
    assert all(any(matches(a, spec) for spec in specs) for a in held_attrs)
    for spec in specs:
        covered = [a for a in held_attrs if matches(a, spec)]
        assert len(covered) >= 16
        assert len({(a["size"], a["position"], a["colour"], a["shape"]) for a in covered}) >= 8
    assert not any(matches(parse_caption(line), spec) for line in seen for spec in specs)

    with pytest.raises(ValueError, match="unknown words"):
        parse_holdout("red triangel")
    with pytest.raises(ValueError, match="no combination"):
        make_dataset(tmp_path / "none", 4, holdout=["circle", "square", "triangle"])


def test_parse_caption_round_trips_every_phrasing():
    total = 0
    for combo in all_combinations():
        texts = phrasings(combo)
        assert len(set(texts)) == len(texts) >= 10
        for text in texts:
            assert parse_caption(text) == combo, text
        total += len(texts)
    assert total > 240 * 20
    red_circle = phrasings(dict(colour="red", shape="circle", size="large", position="left"))
    assert "a large red circle on the left" in red_circle and "red circle, large, left side" in red_circle
    blue_square = phrasings(dict(colour="blue", shape="square", size="small", position="top"))
    assert "a small blue square at the top of the image" in blue_square
    orange = phrasings(dict(colour="orange", shape="square", size="small", position="centre"))
    assert "an orange square, small, in the middle" in orange and not any("a orange" in t for t in orange)
    assert parse_caption("A BIG Magenta Circle in the Center.") == dict(
        colour="purple", shape="circle", size="large", position="centre")
    assert parse_caption("a triangle") == dict(colour=None, shape="triangle", size=None, position=None)
    with pytest.raises(ValueError, match="two values of colour"):
        parse_caption("a red circle next to a blue one")
    rng = np.random.default_rng(0)
    combo = all_combinations()[7]
    assert len({caption(combo, rng) for _ in range(60)}) > 10


def test_scorer_is_right_on_generated_images():
    combos = all_combinations()
    rng = np.random.default_rng(0)
    result = score((render(c, 64) for c in combos), [caption(c, rng) for c in combos])
    assert result["all"]["n"] == 240 and result["all"]["all_attributes"] >= 0.99
    for resolution, count in ((64, 300), (32, 200)):
        attrs, images = _samples(count, resolution, seed=resolution)
        rng = np.random.default_rng(1)
        result = score(images, [caption(a, rng) for a in attrs])["all"]
        assert result["n"] == count and result["all_attributes"] >= 0.99, (resolution, result)


def test_scorer_tolerates_blur_and_noise():
    attrs, images = _samples(200, 64, seed=2)
    rng = np.random.default_rng(3)
    noisy = [
        np.clip(ndimage.gaussian_filter(im.astype(np.float32), (1.0, 1.0, 0)) + rng.normal(0, 8, im.shape), 0, 255)
        .astype(np.uint8) for im in images
    ]
    result = score(noisy, [caption(a, rng) for a in attrs])["all"]
    assert result["all_attributes"] >= 0.97, result


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_scorer_rejects_wrong_captions(attribute):
    attrs, images = _samples(150, 64, seed=4)
    rng = np.random.default_rng(5)
    wrong = []
    for a in attrs:
        values = VALUES[attribute]
        swapped = dict(_attrs(a), **{attribute: values[(values.index(a[attribute]) + 1) % len(values)]})
        wrong.append(caption(swapped, rng))
    result = score(images, wrong)["all"]
    assert result[attribute] < 0.05 and result["all_attributes"] < 0.05, result
    assert all(result[other] >= 0.99 for other in ATTRIBUTES if other != attribute), result


def test_empty_images_score_zero():
    rng = np.random.default_rng(6)
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    noisy = np.clip(blank + rng.normal(0, 6, blank.shape), 0, 255).astype(np.uint8)
    filled = np.full((64, 64, 3), PALETTE["red"], dtype=np.uint8)
    for image in (blank, noisy, filled):
        assert measure(image) == dict.fromkeys(ATTRIBUTES)
    result = score([blank, noisy, filled], ["a large red circle on the left"] * 3)["all"]
    assert result["n"] == 3 and all(result[key] == 0.0 for key in ATTRIBUTES + ("all_attributes",))


def test_command_lines_end_to_end(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "demo.shapes", "--out", str(data), "--num", "50", "--resolution", "32",
                    "--seed", "3", "--holdout", "red triangle", "--holdout", "blue circle", "--num-prompts", "16"],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    assert len(list((data / "images").rglob("*.png"))) == 50
    prompts = [line for name in ("holdout_prompts.txt", "seen_prompts.txt")
               for line in (data / name).read_text().splitlines()]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    images = [render(parse_caption(line), 64) for line in prompts]
    images[0] = np.full_like(images[0], BACKGROUND)
    samples = tmp_path / "samples"
    samples.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(samples / f"{index:06d}.png")

    scores_path = tmp_path / "scores.json"
    run = subprocess.run([sys.executable, "evaluations/alignment.py", "--images", str(samples), "--prompts",
                          str(tmp_path / "prompts.txt"), "--meta", str(data / "demo_meta.json"),
                          "--save-path", str(scores_path)], cwd=REPO_ROOT, env=env, check=True, capture_output=True,
                         text=True)
    assert "held_out" in run.stdout
    scores = json.loads(scores_path.read_text())
    assert [scores[g]["n"] for g in ("all", "seen", "held_out")] == [32, 16, 16]
    assert scores["seen"]["all_attributes"] == 1.0
    assert scores["held_out"]["all_attributes"] == pytest.approx(15 / 16)
    assert scores["held_out"]["colour"] == pytest.approx(15 / 16)

    np.savez(tmp_path / "samples.npz", arr_0=np.stack(images))
    holdout_flags = ["--holdout", "red triangle", "--holdout", "blue circle"]
    npz_args = ["--images", str(tmp_path / "samples.npz"), "--prompts", str(tmp_path / "prompts.txt")]
    assert alignment_main(npz_args + holdout_flags) == scores
    np.savez(tmp_path / "samples.npz", arr_0=np.repeat(np.stack(images), 3, axis=0))
    repeated = alignment_main(npz_args + holdout_flags + ["--images-per-prompt", "3"])
    assert repeated["all"]["n"] == 96 and repeated["held_out"]["all_attributes"] == pytest.approx(15 / 16)
    listing = [{"file": f"samples/{i:06d}.png", "prompt": p} for i, p in enumerate(prompts)]
    (tmp_path / "listing.json").write_text(json.dumps(listing))
    loaded, loaded_prompts = load_samples(tmp_path / "listing.json")
    assert loaded_prompts == prompts
    assert score(loaded, loaded_prompts, ["red triangle", "blue circle"]) == scores
