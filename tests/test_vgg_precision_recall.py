"""VGG16 precision and recall beside FID: the network against torchvision's, the k-NN definition on hand-made
features, image folders read as .npz batches are, and the command line with --vgg-pr."""
import importlib
import json
import os

import numpy as np
import pytest
import torch

from evaluations import evaluator
from evaluations.evaluator import precision_recall
from evaluations.vgg import VGG16, VGG16_WEIGHTS_ENV, VGG16_WEIGHTS_URL, load_vgg16
from test_evaluator import FrechetSpy, images, random_inception

TINY = dict(widths=(4, 8, 8, 16, 16), hidden=32, num_classes=10)


def require(module):
    """Import `module`; it is a dev requirement, so its absence fails under CI=true and skips elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is missing: pip install -r requirements-dev.txt")


def tiny_vgg(seed=0):
    """A narrow VGG16 with random weights whose fc2 features differ from image to image."""
    torch.manual_seed(seed)
    model = VGG16(**TINY).eval()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.nn.init.uniform_(module.bias, 0.0, 0.1)
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg16_tiny.pth"
    torch.save(tiny_vgg().state_dict(), path)
    return path


class PixelStatistics(torch.nn.Module):
    """Stands in for FIDInceptionV3 where the Inception features are not what is tested (a 299x299 Inception
    forward costs about a second per image on a CPU): (pool, spatial) from average pooled pixels, and `logits`."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(10, 12, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float() / 255
        pool = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return pool, pool[:, :3]

    def logits(self, pool):
        return pool @ self.weight.t()


def write_folder(folder, arrays, suffix=".png"):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"{i:06d}{suffix}")
    return folder


# --- the network ----------------------------------------------------------------------------------------------


def test_vgg16_fc2_equals_torchvision_vgg16():
    torchvision = require("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.vgg16(weights=None).eval()  # the real architecture, random weights
    state = reference.state_dict()
    with torch.device("meta"):
        assert set(VGG16().state_dict()) == set(state)  # vgg16-397923af.pth's names load as they are
    ours = VGG16.from_state_dict(state).eval()
    captured = {}
    reference.classifier[4].register_forward_hook(lambda m, a, out: captured.update(fc2_relu=out))
    # torchvision's ReLUs work in place, so the linear output is copied before the ReLU overwrites it.
    reference.classifier[3].register_forward_hook(lambda m, a, out: captured.update(fc2=out.clone()))
    x = torch.randn(2, 3, 48, 48)  # small input; both pool the last feature map to 7x7 adaptively
    with torch.no_grad():
        logits = reference(x)
        features = ours.fc2(x)
    assert logits.shape == (2, 1000) and features.shape == (2, 4096)
    torch.testing.assert_close(features, captured["fc2_relu"], rtol=1e-5, atol=1e-6)
    assert (captured["fc2"] < 0).any() and features.min() >= 0  # after the ReLU, as chosen
    assert features.std() > 0


def test_preprocess_resizes_to_224_and_normalises():
    pixels = torch.full((1, 31, 47, 3), 255, dtype=torch.uint8)
    x = VGG16.preprocess(pixels)
    assert x.shape == (1, 3, 224, 224)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 100, 100], expected)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        VGG16.preprocess(pixels[..., 0])


def test_weight_files_and_missing_weights(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model = tiny_vgg(seed=1)
    torch.save(model.state_dict(), tmp_path / "vgg.pth")
    save_file(model.state_dict(), tmp_path / "vgg.safetensors")
    batch = torch.from_numpy(images(0, 2, 20, 28))
    expected = model(batch)
    assert expected.shape == (2, 32)
    for name in ("vgg.pth", "vgg.safetensors"):
        torch.testing.assert_close(load_vgg16(tmp_path / name)(batch), expected, rtol=0, atol=0)
    monkeypatch.setenv(VGG16_WEIGHTS_ENV, str(tmp_path / "vgg.pth"))
    torch.testing.assert_close(load_vgg16()(batch), expected, rtol=0, atol=0)

    monkeypatch.setenv(VGG16_WEIGHTS_ENV, str(tmp_path / "nowhere.pth"))
    with pytest.raises(FileNotFoundError) as error:
        load_vgg16()
    for hint in ("nowhere.pth", "--vgg-weights", VGG16_WEIGHTS_ENV, VGG16_WEIGHTS_URL, "hub"):
        assert hint in str(error.value)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        load_vgg16(tmp_path / "other.pth")


# --- precision and recall as defined ----------------------------------------------------------------------


def on_a_line(positions, dim=8, seed=0):
    """Points at the given positions along one random direction of R^dim, plus a common random offset."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    offset = rng.normal(size=dim) * 0.1
    return (np.asarray(positions, dtype=np.float64)[:, None] * direction + offset).astype(np.float32)


def test_precision_recall_follow_the_definition():
    rng = np.random.default_rng(0)
    cluster = rng.normal(size=(40, 16)).astype(np.float32)
    assert precision_recall(cluster, cluster, k=3, device="cpu") == (1.0, 1.0)
    far = cluster + 100.0
    assert precision_recall(cluster, far, k=3, device="cpu") == (0.0, 0.0)

    # References at 0, 0.1, ..., 1.9 on a line; k=3 radii: 0.2 inside, 0.3 at both ends.
    ref = on_a_line(np.arange(20) * 0.1)
    # Samples covering only the first half: each sits 0.025 from a reference (precision 1). Their radii are 0.2,
    # 0.3 at the ends, so the references they reach are those up to 0.925 + 0.3: 0.0 ... 1.2, 13 of 20.
    half = on_a_line(np.arange(10) * 0.1 + 0.025)
    assert precision_recall(ref, half, k=3, device="cpu") == (1.0, pytest.approx(13 / 20))
    # Three good samples and three far off the line: precision 1/2; the good ones' balls reach past 4.9 to the
    # far ones, so they cover every reference: recall 1.
    mixed = on_a_line([0.05, 0.95, 1.85, 5.0, 6.0, 7.0])
    assert precision_recall(ref, mixed, k=3, device="cpu") == (0.5, 1.0)
    # k is the neighbour count: with k=1 the radii shrink to 0.1 and the same half covers 0.0 ... 1.0.
    assert precision_recall(ref, half, k=1, device="cpu") == (1.0, pytest.approx(11 / 20))


# --- folders and the evaluator ----------------------------------------------------------------------------


def test_folder_reads_like_npz(tmp_path):
    arrays = images(1, 5, 24, 32)
    np.savez(tmp_path / "batch.npz", arrays)
    folder = write_folder(tmp_path / "pngs", arrays)
    (folder / "notes.txt").write_text("not an image")
    count, batches = evaluator.iterate_images(folder, batch_size=2)
    batches = list(batches)
    assert count == 5 and [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), arrays)

    jpegs = write_folder(tmp_path / "jpgs", arrays, suffix=".JPG")
    from PIL import Image

    decoded = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(jpegs.iterdir())])
    np.testing.assert_array_equal(np.concatenate(list(evaluator.iterate_images(jpegs, 3)[1])), decoded)

    write_folder(tmp_path / "mixed", [arrays[0], images(2, 1, 24, 30)[0]])
    with pytest.raises(ValueError, match="one size"):
        list(evaluator.iterate_images(tmp_path / "mixed", 4)[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png or .jpg"):
        evaluator.iterate_images(tmp_path / "empty", 4)


def test_folder_features_equal_npz_features(tmp_path):
    """VGG16 features and FID Inception activations of a folder are those of the same images in an .npz."""
    arrays = images(3, 4, 32, 32)
    np.savez(tmp_path / "batch.npz", arrays)
    folder = write_folder(tmp_path / "images", arrays)
    vgg, inception = tiny_vgg(), random_inception()
    from_npz = evaluator.compute_vgg_features(vgg, tmp_path / "batch.npz", batch_size=3)
    from_folder = evaluator.compute_vgg_features(vgg, folder, batch_size=3)
    assert from_npz.shape == (4, 32) and from_npz.dtype == np.float32
    np.testing.assert_array_equal(from_folder, from_npz)
    distances = np.linalg.norm(from_npz[:, None] - from_npz[None], axis=-1)
    assert distances[~np.eye(4, dtype=bool)].min() > 0  # distinct images, distinct features
    two = write_folder(tmp_path / "two", arrays[:2])
    np.savez(tmp_path / "two.npz", arrays[:2])
    for a, b in zip(evaluator.compute_activations(inception, two, 2),
                    evaluator.compute_activations(inception, tmp_path / "two.npz", 2)):
        assert a.shape[0] == 2 and a.std() > 0
        np.testing.assert_array_equal(a, b)


def test_evaluate_with_vgg_and_a_shared_cache(tmp_path, monkeypatch):
    spy = FrechetSpy()
    monkeypatch.setattr(evaluator, "frechet_distance", spy)
    ref_arrays = images(4, 6, 32, 32)
    ref = write_folder(tmp_path / "ref", ref_arrays)
    np.savez(tmp_path / "sample.npz", ref_arrays[:4])
    vgg, inception = tiny_vgg(), PixelStatistics()
    calls = []
    vgg.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    cache = tmp_path / "ref_cache.npz"
    metrics = evaluator.evaluate(ref, tmp_path / "sample.npz", inception, batch_size=4, ref_cache=cache, k=3,
                                 device="cpu", vgg=vgg)
    assert calls == [4, 2, 4]  # reference folder in two batches, then the samples
    ref_vgg = evaluator.compute_vgg_features(vgg, ref, batch_size=4)  # batched as evaluate() did
    sample_vgg = evaluator.compute_vgg_features(vgg, tmp_path / "sample.npz", batch_size=6)
    assert (metrics["vgg_precision"], metrics["vgg_recall"]) == precision_recall(ref_vgg, sample_vgg, k=3,
                                                                                 device="cpu")
    assert metrics["vgg_precision"] == 1.0  # every sample is a reference image
    assert metrics["num_ref"] == 6 and metrics["num_samples"] == 4

    with np.load(cache) as data:
        assert {"pool", "spatial", "vgg", "source"} <= set(data.files)
        np.testing.assert_allclose(data["vgg"], ref_vgg, rtol=1e-6)
    calls.clear()
    again = evaluator.evaluate(ref, tmp_path / "sample.npz", inception, batch_size=4, ref_cache=cache, k=3,
                               device="cpu", vgg=vgg)
    assert calls == [4]  # the reference features came from the cache
    assert again["vgg_precision"] == metrics["vgg_precision"] and again["vgg_recall"] == metrics["vgg_recall"]
    # Identical sets: precision and recall 1 in VGG space too.
    same = evaluator.evaluate(tmp_path / "sample.npz", tmp_path / "sample.npz", inception, batch_size=4, k=3,
                              device="cpu", vgg=vgg)
    assert (same["vgg_precision"], same["vgg_recall"]) == (1.0, 1.0)


def test_command_line_vgg_pr_on_folders(tmp_path, vgg_weights, monkeypatch, capsys):
    monkeypatch.setattr(evaluator, "frechet_distance", FrechetSpy())
    loaded = []
    monkeypatch.setattr(evaluator, "load_inception", lambda *args, **kwargs: loaded.append(args) or PixelStatistics())
    inception_weights = tmp_path / "inception.pth"
    ref_arrays = images(5, 5, 32, 32)
    ref = write_folder(tmp_path / "ref", ref_arrays)
    samples = write_folder(tmp_path / "samples", np.concatenate([ref_arrays[:3], images(6, 2, 32, 32)]))
    save_path = tmp_path / "metrics.json"
    evaluator.main([str(ref), str(samples), "--inception-weights", str(inception_weights), "--vgg-pr",
                    "--vgg-weights", str(vgg_weights), "--device", "cpu", "--batch-size", "5",
                    "--save-path", str(save_path)])
    printed = capsys.readouterr().out
    metrics = json.loads(save_path.read_text())
    assert f"VGG16 Precision: {metrics['vgg_precision']}" in printed
    assert f"VGG16 Recall: {metrics['vgg_recall']}" in printed
    vgg = load_vgg16(vgg_weights)
    expected = precision_recall(evaluator.compute_vgg_features(vgg, ref), evaluator.compute_vgg_features(vgg, samples),
                                k=3, device="cpu")
    assert (metrics["vgg_precision"], metrics["vgg_recall"]) == expected
    assert metrics["vgg_precision"] >= 0.6  # the three reference images among the five samples are inside
    assert metrics["num_ref"] == metrics["num_samples"] == 5
    assert loaded[0][0] == str(inception_weights)

    with pytest.raises(SystemExit) as exit_info:
        evaluator.main([str(ref), str(samples), "--inception-weights", str(inception_weights), "--vgg-pr",
                        "--vgg-weights", str(tmp_path / "missing_vgg.pth")])
    assert exit_info.value.code == 1
    assert "missing_vgg.pth" in capsys.readouterr().err
