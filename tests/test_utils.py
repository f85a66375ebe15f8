"""utils.py: the sample grid, EMA, learning-rate schedules, the resumable batch sampler, atomic directories."""
import numpy as np
import pytest
import torch

from utils import ResumableBatchSampler, commit_directory, image_grid, lr_lambda, update_ema


def test_small_images_are_enlarged_by_a_whole_factor_and_captioned():
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    images = np.broadcast_to(colours[:, None, None], (3, 32, 32, 3))
    grid = np.asarray(image_grid(images, ["a red one", "a green one", "a blue one"], ncols=3))
    tile = 128
    assert grid.shape[1] == 3 * tile and grid.shape[0] > tile
    for i, colour in enumerate(colours):
        assert (grid[:tile, i * tile:(i + 1) * tile] == colour).all()
        caption_area = grid[tile:, i * tile:(i + 1) * tile]
        assert (caption_area < 128).any()  # dark text on the white band


def test_large_images_keep_their_size_and_no_caption_band_without_captions():
    images = np.zeros((4, 200, 150, 3), dtype=np.uint8)
    grid = image_grid(images)
    assert grid.size == (2 * 150, 2 * 200)


def test_update_ema_moves_each_parameter_by_one_minus_decay():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    model.register_buffer("counter", torch.tensor([7.0]))
    ema.register_buffer("counter", torch.tensor([0.0]))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update_ema(ema, model, decay=0.9)
    for name in ("weight", "bias"):
        expected = 0.9 * before[name] + 0.1 * model.state_dict()[name]
        torch.testing.assert_close(ema.state_dict()[name], expected)
    assert ema.counter.item() == 7.0  # buffers are copied, not averaged


def test_lr_schedules():
    constant, warmup, cosine = (lr_lambda(s, warmup_steps=4, max_steps=14) for s in ("constant", "warmup", "cosine"))
    assert [constant(s) for s in (0, 5, 100)] == [1.0, 1.0, 1.0]
    assert [warmup(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(9) == pytest.approx(0.55)  # half way down from 1 to 0.1
    assert cosine(14) == pytest.approx(0.1) and cosine(1000) == pytest.approx(0.1)
    assert all(cosine(s) > cosine(s + 1) for s in range(4, 14))
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_lambda("linear", 0, 10)


def first_batches(sampler, n):
    batches = iter(sampler)
    return [next(batches) for _ in range(n)]


def test_batch_sampler_splits_each_global_batch_across_ranks():
    single = first_batches(ResumableBatchSampler(20, 8, seed=3), 6)
    ranks = [first_batches(ResumableBatchSampler(20, 8, rank=r, world_size=2, seed=3), 6) for r in (0, 1)]
    for step, global_batch in enumerate(single):
        assert len(ranks[0][step]) == len(ranks[1][step]) == 4
        assert not set(ranks[0][step]) & set(ranks[1][step])
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(global_batch)
    assert sorted(single[0] + single[1]) != sorted(single[2] + single[3])  # a new permutation each epoch
    assert first_batches(ResumableBatchSampler(20, 8, rank=1, world_size=2, seed=3, start_batch=4), 2) == ranks[1][4:]
    with pytest.raises(ValueError, match="not divisible"):
        ResumableBatchSampler(20, 9, world_size=2)


def test_commit_directory_replaces_the_old_version(tmp_path):
    final, tmp = tmp_path / "0000010", tmp_path / "0000010.tmp"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("new")
    commit_directory(tmp, final)
    assert (final / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000010"]
