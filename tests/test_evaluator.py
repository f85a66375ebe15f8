"""ADM evaluator: metric math against ADM's own numbers, the FID Inception port, and the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, fixture_path
from evaluations import evaluator
from evaluations.evaluator import frechet_distance, inception_score, precision_recall
from evaluations.inception import FID_WEIGHTS_URL, FIDInceptionV3, load_inception, resize_bilinear_tf1

# Parameter names of pytorch-fid's fid_inception_v3() (torchvision Inception3 with FIDInceptionA/C/E blocks).
STEM = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
BRANCHES = {
    "A": ["branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
          "branch_pool"],
    "B": ["branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
    "C": ["branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
          "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"],
    "D": ["branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"],
    "E": ["branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"],
}
BLOCKS = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C", "Mixed_6c": "C",
          "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}


def pt_inception_keys():
    convs = STEM + [f"{block}.{branch}" for block, kind in BLOCKS.items() for branch in BRANCHES[kind]]
    suffixes = ["conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    return {f"{conv}.{suffix}" for conv in convs for suffix in suffixes} | {"fc.weight", "fc.bias"}


def random_inception(seed=0):
    """FID Inception with random weights that keep activations of order one through the depth."""
    torch.manual_seed(seed)
    model = FIDInceptionV3().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.1, 0.1)
    torch.nn.init.normal_(model.fc.weight, std=0.05)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception_random.pth"
    torch.save(random_inception().state_dict(), path)
    return path


def images(seed, n, h, w):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# --- metric math --------------------------------------------------------------------------------------------


def test_metrics_match_adm_fixture():
    data = np.load(fixture_path("adm_metrics.npz"))
    expected = json.loads(fixture_path("adm_metrics.json").read_text())
    stats = {name: evaluator.compute_statistics(data[name]) for name in data.files if "softmax" not in name}
    fid = frechet_distance(*stats["sample_pool"], *stats["ref_pool"])
    sfid = frechet_distance(*stats["sample_spatial"], *stats["ref_spatial"])
    score = inception_score(data["sample_softmax"], split_size=expected["is_split_size"])
    precision, recall = precision_recall(data["ref_pool"], data["sample_pool"], k=expected["nhood_size"])
    assert fid == pytest.approx(expected["fid"], rel=1e-4)
    assert sfid == pytest.approx(expected["sfid"], rel=1e-4)
    assert score == pytest.approx(expected["inception_score"], rel=1e-4)
    assert precision == pytest.approx(expected["precision"], abs=0.01)
    assert recall == pytest.approx(expected["recall"], abs=0.01)


def test_frechet_distance_of_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="differ in size"):
        frechet_distance(mu1, np.diag(var1), mu2[:2], np.diag(var2[:2]))


def test_inception_score_of_confident_and_uniform_predictions():
    one_hot = np.full((8, 4), 1e-12)
    one_hot[np.arange(8), np.arange(8) % 4] = 1.0
    assert inception_score(one_hot, split_size=4) == pytest.approx(4.0, rel=1e-6)
    assert inception_score(one_hot, split_size=2) == pytest.approx(2.0, rel=1e-6)
    assert inception_score(np.full((6, 5), 0.2)) == pytest.approx(1.0)


def test_precision_recall_batching_matches_one_batch():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(57, 16)).astype(np.float32)
    sample = (rng.normal(size=(43, 16)) * 1.3 + 0.4).astype(np.float32)
    whole = precision_recall(ref, sample, k=3)
    assert 0.0 < whole[0] < 1.0 and 0.0 < whole[1] < 1.0
    for rows, cols in [(1, 1), (5, 7), (16, 100)]:
        assert precision_recall(ref, sample, k=3, row_batch_size=rows, col_batch_size=cols) == whole
    assert precision_recall(ref, ref, k=3, row_batch_size=8, col_batch_size=9) == (1.0, 1.0)


def test_pairwise_distances_float16_with_float32_fallback():
    rng = np.random.default_rng(1)
    u, v = torch.from_numpy(rng.normal(size=(5, 8))), torch.from_numpy(rng.normal(size=(6, 8)))
    exact = torch.cdist(u, v) ** 2
    small = evaluator.pairwise_distances(u, v)
    assert small.dtype == torch.float32
    assert torch.equal(small, small.half().float())  # float16 values
    torch.testing.assert_close(small.double(), exact, rtol=5e-3, atol=5e-3)
    large = evaluator.pairwise_distances(u * 300, v * 300)  # squared norms overflow float16
    assert not torch.equal(large, large.half().float())
    torch.testing.assert_close(large.double(), exact * 300**2, rtol=1e-5, atol=1e-2)


# --- Inception network ----------------------------------------------------------------------------------------


def test_inception_has_pt_inception_key_layout(tmp_path):
    state = FIDInceptionV3().state_dict()
    assert {k for k in state if not k.endswith("num_batches_tracked")} == pt_inception_keys()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6d.branch1x1.conv.weight"].shape == (192, 768, 1, 1)
    assert state["Mixed_7c.branch_pool.bn.running_var"].shape == (192,)
    assert state["fc.weight"].shape == (1008, 2048)
    assert state["fc.bias"].shape == (1008,)

    source = random_inception(seed=3).state_dict()
    without_counters = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}
    for name, state_dict in [("full.pth", source), ("converted.pth", without_counters)]:
        torch.save(state_dict, tmp_path / name)
        loaded = load_inception(tmp_path / name).state_dict()
        assert all(torch.equal(loaded[k], source[k]) for k in without_counters)

    torch.save({**without_counters, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, tmp_path / "aux.pth")
    with pytest.raises(RuntimeError, match="AuxLogits"):
        load_inception(tmp_path / "aux.pth")


def test_inception_outputs_and_sfid_layer():
    model = random_inception()
    captured = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.update(out=out))
    batch = torch.from_numpy(images(0, 2, 40, 56))
    with torch.no_grad():
        pool, spatial = model(batch)
        softmax = torch.softmax(model.logits(pool), dim=1)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 7 * 17 * 17) and softmax.shape == (2, 1008)
    torch.testing.assert_close(softmax.sum(1), torch.ones(2))
    assert torch.isfinite(pool).all() and pool.std() > 0
    # mixed_6/conv:0[..., :7] == ReLU output of Mixed_6d.branch1x1, flattened in NHWC order.
    assert captured["out"].shape == (2, 192, 17, 17) and captured["out"].min() >= 0
    torch.testing.assert_close(spatial, captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    torch.testing.assert_close(model.logits(pool), pool @ model.fc.weight.t())  # ADM drops the bias


def test_resize_follows_tf1_resize_bilinear():
    def resize_row(values, width):
        return resize_bilinear_tf1(torch.tensor(values).view(1, 1, 1, -1), (1, width)).flatten().tolist()

    # Source x = dst * in / out with no half-pixel offset, right neighbour clamped to the edge.
    assert resize_row([0.0, 10.0], 4) == pytest.approx([0.0, 5.0, 10.0, 10.0])
    assert resize_row([0.0, 10.0, 20.0], 5) == pytest.approx([0.0, 6.0, 12.0, 18.0, 20.0])
    grid = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.tensor([[0.0, 2.0], [8.0, 10.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(resize_bilinear_tf1(grid, (2, 2)), expected)
    x = torch.rand(1, 3, 299, 299) * 255
    assert resize_bilinear_tf1(x, (299, 299)) is x
    pixels = torch.full((1, 8, 8, 3), 255, dtype=torch.uint8)
    graph_input = FIDInceptionV3.preprocess(pixels)
    assert graph_input.shape == (1, 3, 299, 299)
    torch.testing.assert_close(graph_input, torch.full_like(graph_input, 127 / 128))


def test_missing_weights_name_the_url(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_URL) as error:
        load_inception(download=False)
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)

    def offline(url, dst, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match="network unreachable.*" + FID_WEIGHTS_URL):
        load_inception()
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_URL):
        load_inception(tmp_path / "nowhere.pth")


# --- batches and command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_image_batches_stream_from_npz(tmp_path, save):
    array = images(1, 7, 5, 6)
    save(tmp_path / "batch.npz", array, np.arange(7))
    count, batches = evaluator.iterate_images(tmp_path / "batch.npz", batch_size=3)
    batches = list(batches)
    assert count == 7 and [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), array)
    np.savez(tmp_path / "gray.npz", array[..., 0])
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        evaluator.iterate_images(tmp_path / "gray.npz", batch_size=3)


def test_reference_activations_cache(tmp_path):
    model = random_inception()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    np.savez(tmp_path / "ref.npz", images(2, 3, 16, 16))
    cache = tmp_path / "ref_acts.npz"
    first = evaluator.read_activations(tmp_path / "ref.npz", model, batch_size=2, cache=cache)
    assert calls == [2, 1] and cache.exists()
    second = evaluator.read_activations(tmp_path / "ref.npz", model, batch_size=2, cache=cache)
    assert calls == [2, 1]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    as_batch = evaluator.read_activations(cache, model)  # the cache file is itself a usable batch
    np.testing.assert_array_equal(as_batch[0], first[0])
    np.savez(tmp_path / "ref.npz", images(3, 4, 16, 16))  # another file at the same path
    third = evaluator.read_activations(tmp_path / "ref.npz", model, batch_size=4, cache=cache)
    assert calls == [2, 1, 4] and len(third[0]) == 4


class FrechetSpy:
    """Stands in for frechet_distance (scipy's sqrtm of 2048x2048 takes ~20 s on one core) and records its inputs;
    the real function is checked against ADM above."""

    def __init__(self):
        self.calls = []

    def __call__(self, mu1, sigma1, mu2, sigma2):
        self.calls.append((mu1, sigma1, mu2, sigma2))
        return float(np.sum((np.asarray(mu1) - mu2) ** 2))


def test_statistics_in_the_batch_files_are_used(tmp_path, monkeypatch):
    spy = FrechetSpy()
    monkeypatch.setattr(evaluator, "frechet_distance", spy)
    stats = {"mu": np.full(2048, 0.5), "sigma": np.eye(2048), "mu_s": np.full(2023, 0.5), "sigma_s": np.eye(2023)}
    np.savez(tmp_path / "ref.npz", images(4, 4, 24, 24), **stats)
    np.savez(tmp_path / "sample.npz", images(5, 4, 24, 24))
    model = random_inception()
    metrics = evaluator.evaluate(tmp_path / "ref.npz", tmp_path / "sample.npz", model, batch_size=4, k=2,
                                 device="cpu")
    pool, spatial = evaluator.compute_activations(model, tmp_path / "sample.npz")
    (mu1, sigma1, mu2, sigma2), (mu1_s, sigma1_s, mu2_s, sigma2_s) = spy.calls
    np.testing.assert_allclose(mu1, pool.mean(0), rtol=1e-5)
    np.testing.assert_allclose(sigma1, np.cov(pool, rowvar=False), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mu1_s, spatial.mean(0), rtol=1e-5)
    assert sigma1_s.shape == (2023, 2023)
    for got, key in [(mu2, "mu"), (sigma2, "sigma"), (mu2_s, "mu_s"), (sigma2_s, "sigma_s")]:
        np.testing.assert_array_equal(got, stats[key])
    assert metrics["fid"] == pytest.approx(np.sum((pool.mean(0) - 0.5) ** 2), rel=1e-5)
    assert metrics["num_ref"] == metrics["num_samples"] == 4
    assert 1.0 <= metrics["inception_score"] <= 4.0


def test_command_line_end_to_end(tmp_path, weights_file, monkeypatch, capsys):
    spy = FrechetSpy()
    monkeypatch.setattr(evaluator, "frechet_distance", spy)
    np.savez(tmp_path / "ref.npz", images(6, 6, 32, 32))
    np.savez(tmp_path / "sample.npz", images(6, 6, 32, 32)[:5], np.arange(5))
    save_path = tmp_path / "out" / "metrics.json"
    args = [str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--inception-weights", str(weights_file),
            "--save-path", str(save_path), "--device", "cpu", "--batch-size", "4",
            "--ref-cache", str(tmp_path / "ref_acts.npz"), "--is-split-size", "2"]
    evaluator.main(args)
    printed = capsys.readouterr().out
    metrics = json.loads(save_path.read_text())
    for label, key in [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                       ("Precision", "precision"), ("Recall", "recall")]:
        assert f"{label}: {metrics[key]}" in printed
    assert metrics["num_ref"] == 6 and metrics["num_samples"] == 5
    assert metrics["precision"] == 1.0  # every sample image is also a reference image
    assert 1.0 <= metrics["inception_score"] <= 2.0
    with np.load(tmp_path / "ref_acts.npz") as cache:
        ref_pool = cache["pool"]
    assert ref_pool.shape == (6, 2048)
    sample_mu, _, ref_mu, ref_sigma = spy.calls[0]
    np.testing.assert_allclose(ref_mu, ref_pool.mean(0), rtol=1e-5)
    np.testing.assert_allclose(sample_mu, ref_mu - (ref_pool[5] - ref_mu) / 5, rtol=1e-4, atol=1e-6)
    assert metrics["fid"] == spy(*spy.calls[0])


def test_script_runs_from_repo_root_and_names_missing_weights(tmp_path):
    np.savez(tmp_path / "batch.npz", images(7, 4, 8, 8))
    batch = str(tmp_path / "batch.npz")
    command = [sys.executable, "evaluations/evaluator.py", batch, batch, "--no-download",
               "--inception-weights", str(tmp_path / "missing.pth")]
    result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert FID_WEIGHTS_URL in result.stderr and "missing.pth" in result.stderr
