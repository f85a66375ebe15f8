"""FID and caption alignment during training (omegadit/evaluation_during_training.py, train.py --eval-every): the
numbers are the evaluator's and the alignment scorer's, the reference statistics are prepared from a folder, train.py
logs them to metrics.jsonl and the trackers at the chosen steps only and keeps evaluation time out of its step
timings. Random Inception weights stand
in for the FID weights, which CI cannot download."""
import json
import shutil
import time

import numpy as np
import pytest
import torch

from evaluations.evaluator import compute_statistics, frechet_distance, read_activations
from evaluations.inception import load_inception
from omegadit import evaluation_during_training as edt
from test_inception_parity import pt_weights  # noqa: F401  (fixture: random FID Inception weights in a .pth)


@pytest.fixture(scope="module")
def inception_weights(pt_weights):  # noqa: F811
    return pt_weights


@pytest.fixture(scope="module")
def reference(text_dataset, inception_weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref_stats.npz"
    edt.main(["prepare", str(text_dataset / "images"), str(out), "--inception-weights", str(inception_weights),
              "--batch-size", "16", "--device", "cpu"])
    return out


def test_prepare_gives_the_evaluators_statistics(reference, text_dataset, inception_weights, tmp_path):
    files = edt.image_files(text_dataset / "images")  # the dataset nests images in subfolders
    images = np.stack([np.asarray(__import__("PIL.Image").Image.open(p).convert("RGB")) for p in files])
    np.savez(tmp_path / "batch.npz", arr_0=images)
    pool, _ = read_activations(str(tmp_path / "batch.npz"), load_inception(inception_weights), batch_size=16)
    mu, sigma = compute_statistics(pool)
    with np.load(reference) as data:
        assert int(data["num_images"]) == len(files) == 32
        np.testing.assert_allclose(data["mu"], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(data["sigma"], sigma, rtol=1e-4, atol=1e-6)
    # the three kinds of --eval-ref give the same statistics
    np.savez(tmp_path / "pool.npz", pool=pool)
    inception = load_inception(inception_weights)
    for source in (reference, tmp_path / "pool.npz", tmp_path / "batch.npz"):
        got_mu, got_sigma = edt.reference_statistics(source, inception, batch_size=16)
        np.testing.assert_allclose(got_mu, mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_sigma, sigma, rtol=1e-4, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="prepare"):
        edt.reference_statistics(tmp_path / "missing.npz")


def test_fid_is_the_evaluators_on_the_same_samples(reference, inception_weights, text_dataset, minilm, tmp_path,
                                                   monkeypatch):
    from json_label_dataset import load_latent_stats
    from models.sit import SiT
    from models.tokenizers import LatentDecoder, load_tokenizer
    from omegadit.conditioners import TextConditioner
    from omegadit.objectives.flow import FlowMatching
    from test_export_diffusers import small_random

    model = small_random(SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=64, depth=4, num_heads=2,
                             text_dim=384, text_len=16, z_dims=[]))
    mean, std = load_latent_stats(text_dataset / "vae-in" / "latents_stats.pt")
    inception = load_inception(inception_weights)
    evaluator = edt.TrainingEvaluator(FlowMatching(time_shifting=True), TextConditioner(minilm, 16).load("cpu"),
                                      LatentDecoder(load_tokenizer("pixel"), mean, std), ["a red circle", "a blue square"],
                                      (48, 8, 8), "cpu", edt.reference_statistics(reference), inception,
                                      num_samples=6, batch_size=4, num_steps=2)
    calls = []

    def recording(*args):
        calls.append(args)
        return frechet_distance(*args)

    monkeypatch.setattr(edt, "frechet_distance", recording)
    fid = evaluator.evaluate(model)["fid"]
    samples = evaluator.last_images
    assert samples.shape == (6, 32, 32, 3) and samples.dtype == np.uint8
    # the evaluator's features of the same images, through evaluations/evaluator.py's own reading path
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    pool, _ = read_activations(str(tmp_path / "samples.npz"), inception, batch_size=4)
    (mu, sigma, ref_mu, ref_sigma), = calls
    expected_mu, expected_sigma = compute_statistics(pool)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-4, atol=1e-6)
    with np.load(reference) as data:
        np.testing.assert_array_equal(ref_mu, data["mu"])
        np.testing.assert_array_equal(ref_sigma, data["sigma"])
    assert np.isfinite(fid) and fid > 0
    np.testing.assert_array_equal(evaluator.samples(model), samples)  # fixed noise and conditions



def train_argv(data, out, minilm, *extra):
    return ["--exp-name", "fid", "--output-dir", str(out), "--data-dir", str(data), "--use-json-dataset",
            "--text-encoder", minilm, "--text-len", "8", "--tokenizer", "pixel", "--model", "SiT-T/4",
            "--enc-type", "none", "--batch-size", "4", "--num-workers", "0", "--mixed-precision", "no",
            "--log-every", "1", *extra]


def test_train_logs_fid_at_eval_steps_only_and_outside_step_times(text_dataset, minilm, reference, inception_weights,
                                                                  tmp_path, monkeypatch, fresh_accelerate_state):
    import accelerate

    import train

    tracked = []
    monkeypatch.setattr(accelerate.Accelerator, "log", lambda self, values, step=None, **kw: tracked.append(
        (step, dict(values))))
    data = tmp_path / "data"
    shutil.copytree(text_dataset, data)
    started = time.perf_counter()
    train.main(train.parse_args(train_argv(data, tmp_path, minilm, "--max-train-steps", "4", "--eval-every", "2",
                                           "--eval-ref", str(reference), "--eval-num-samples", "4",
                                           "--eval-batch-size", "4", "--eval-steps", "2", "--eval-cfg-scale", "2.0",
                                           "--eval-inception-weights", str(inception_weights))))
    total = time.perf_counter() - started
    records = [json.loads(line) for line in (tmp_path / "fid" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fid" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(np.isfinite(r["fid"]) for r in evals)
    assert all(r["fid_num_samples"] == 4 for r in evals)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [s for s, values in tracked if "fid" in values] == [2, 4]
    # every FID here takes seconds (a 2048-d matrix square root); the step timings leave it out
    assert max(r["step_time"] for r in steps) < min(r["eval_seconds"] for r in evals) / 2
    assert sum(r["step_time"] for r in steps) < total - sum(r["eval_seconds"] for r in evals)
    assert "FID" in (tmp_path / "fid" / "log.txt").read_text()
    # the model card of the run's checkpoint reports the FID and the losses of its step
    from omegadit import checkpoint
    from omegadit.export.model_card import model_card

    ckpt = tmp_path / "fid" / "checkpoints" / "0000004"
    card = model_card(checkpoint.read_description(ckpt / "ema.safetensors"), ckpt)
    assert f"| fid (step 4) | {evals[-1]['fid']:.6g} |" in card and f"| loss (step 4) | {steps[-1]['loss']:.6g} |" in card
    assert "| experiment | `fid` |" in card and "| checkpoint step | 4 |" in card


def test_bad_eval_flags_fail_before_the_first_step(text_dataset, minilm, inception_weights, tmp_path,
                                                   fresh_accelerate_state):
    import train

    with pytest.raises(ValueError, match="--eval-ref"):
        train.main(train.parse_args(train_argv(text_dataset, tmp_path, minilm, "--eval-every", "2")))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        train.main(train.parse_args(train_argv(text_dataset, tmp_path, minilm, "--eval-every", "2", "--eval-ref",
                                               str(tmp_path / "missing.npz"), "--eval-inception-weights",
                                               str(inception_weights))))
    assert not (tmp_path / "fid" / "metrics.jsonl").exists()


def test_evaluator_conditions_for_class_and_unconditional_models(reference, inception_weights):
    from types import SimpleNamespace

    from omegadit.conditioners import ClassConditioner, UnconditionalConditioner
    from omegadit.objectives.flow import FlowMatching

    args = SimpleNamespace(eval_every=2, eval_ref=str(reference), eval_inception_weights=str(inception_weights),
                           eval_batch_size=8, eval_prompts=None, eval_cfg_scale=None, cfg_scale=4.0,
                           tokenizer="pixel", eval_num_samples=5, eval_steps=2, eval_sampler="euler", seed=0,
                           guidance_low=0.0, guidance_high=0.7)
    dataset = SimpleNamespace(latent_mean=torch.zeros(48, 1, 1), latent_std=torch.ones(48, 1, 1), captions=[])
    labelled = edt.build_evaluator(args, dataset, ClassConditioner(3), FlowMatching(), (48, 8, 8), "cpu")
    assert labelled.conditions == [0, 1, 2, 0, 1] and labelled.cfg_scale == 4.0
    assert labelled.interval == (0.0, 0.7) and labelled.sampler_name == "euler"
    unconditional = edt.build_evaluator(args, dataset, UnconditionalConditioner(), FlowMatching(), (48, 8, 8), "cpu")
    assert unconditional.conditions == [0] * 5 and unconditional.cfg_scale == 1.0
    assert edt.build_evaluator(SimpleNamespace(eval_every=0), dataset, None, None, None, "cpu") is None


def test_alignment_is_the_scorers_on_the_same_samples(text_dataset, minilm):
    from evaluations.alignment import score
    from json_label_dataset import load_latent_stats
    from models.sit import SiT
    from models.tokenizers import LatentDecoder, load_tokenizer
    from omegadit.conditioners import TextConditioner
    from omegadit.objectives.flow import FlowMatching
    from test_export_diffusers import small_random

    model = small_random(SiT(input_size=8, patch_size=4, in_channels=48, hidden_size=64, depth=4, num_heads=2,
                             text_dim=384, text_len=16, z_dims=[]))
    mean, std = load_latent_stats(text_dataset / "vae-in" / "latents_stats.pt")
    captions = ["a red circle", "a large blue square at the top", "a green triangle"]
    evaluator = edt.TrainingEvaluator(FlowMatching(time_shifting=True), TextConditioner(minilm, 16).load("cpu"),
                                      LatentDecoder(load_tokenizer("pixel"), mean, std), captions, (48, 8, 8), "cpu",
                                      None, None, num_samples=5, batch_size=4, num_steps=2,
                                      alignment=(captions, ["red circle"]))
    metrics = evaluator.evaluate(model)
    expected = score(evaluator.last_images, [captions[i % 3] for i in range(5)], ["red circle"])
    assert "fid" not in metrics
    assert metrics["alignment_all_attributes"] == expected["all"]["all_attributes"]
    assert metrics["alignment_held_out_colour"] == expected["held_out"]["colour"]
    assert metrics["alignment_seen_position"] == expected["seen"]["position"]  # only the second caption names it
    assert "alignment_size" in metrics and "alignment_held_out_size" not in metrics  # no held-out caption names a size


def test_train_logs_alignment_without_a_fid_reference(text_dataset, minilm, tmp_path, fresh_accelerate_state):
    import train

    data = tmp_path / "data"
    shutil.copytree(text_dataset, data)
    meta = json.loads((data / "demo_meta.json").read_text())
    (data / "demo_meta.json").write_text(json.dumps({**meta, "holdout": ["red circle"]}))
    train.main(train.parse_args(train_argv(data, tmp_path, minilm, "--max-train-steps", "2", "--eval-every", "2",
                                           "--eval-alignment", "--eval-num-samples", "4", "--eval-steps", "2")))
    evals = [r for r in map(json.loads, (tmp_path / "fid" / "metrics.jsonl").read_text().splitlines())
             if "eval_seconds" in r]
    assert [r["step"] for r in evals] == [2] and "fid" not in evals[0]
    assert 0 <= evals[0]["alignment_all_attributes"] <= 1 and "alignment_colour" in evals[0]
    assert "step 2: alignment" in (tmp_path / "fid" / "log.txt").read_text()


def test_alignment_of_a_class_model_needs_its_class_names(tmp_path):
    from types import SimpleNamespace

    from omegadit.conditioners import ClassConditioner

    args = SimpleNamespace(data_dir=str(tmp_path), eval_class_names=None)
    with pytest.raises(FileNotFoundError, match="class_names.txt"):
        edt.alignment_captions(args, ClassConditioner(3), [0, 1, 2])
    (tmp_path / "class_names.txt").write_text("red circle\nblue square\n")
    with pytest.raises(ValueError, match="names 2 classes, the model has 3"):
        edt.alignment_captions(args, ClassConditioner(3), [0, 1, 2])
    (tmp_path / "class_names.txt").write_text("red circle\nblue square\ngreen triangle\nred square\n")
    assert edt.alignment_captions(args, ClassConditioner(3), [0, 1, 2]) == (
        ["red circle", "blue square", "green triangle"], [])
