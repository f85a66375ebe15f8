"""ControlNet: mask pairing and checks, the control models (zero start, scale, frozen base), train.py --control,
generate.py --controlnet, and the mask IoU scorer."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import generate
import train
from conftest import randomize
from control_data import MaskedDataset, check_mask_sizes, pair_masks, read_mask
from demo.shapes import make_dataset, render, render_mask, sample_attributes
from evaluations.mask_iou import mask_iou, score_masks
from json_label_dataset import DatasetMismatchError
from models import BACKBONES
from models.control import build_control, weights_fingerprint
from models.dit import DiT
from models.lightningdit import LightningDiT
from models.sit import SiT
from omegadit import checkpoint
from omegadit.conditioners import ClassConditioner
from omegadit.data_checks import DataFileError
from omegadit.objectives import build_objective


def write_png(path, size=(8, 8), mode="L", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_pairing_with_prefixes_reports_what_is_missing_on_each_side(tmp_path):
    for name in ("Img_001", "Img_002", "Img_003"):
        write_png(tmp_path / "images" / "a" / f"{name}.png", mode="RGB")
    for name in ("seg_001", "seg_002", "seg_004"):
        write_png(tmp_path / "masks" / "a" / f"{name}.png")
    with pytest.raises(DatasetMismatchError) as err:
        pair_masks(["a/Img_001.png", "a/Img_002.png", "a/Img_003.png"], tmp_path / "masks", "Img_", "seg_")
    message = str(err.value)
    assert "1 of 3 images have no mask" in message and "a/Img_003.png (no seg_003.*)" in message
    assert "1 of 3 masks have no image" in message and "a/seg_004.png" in message
    (tmp_path / "masks" / "a" / "seg_004.png").unlink()
    write_png(tmp_path / "masks" / "a" / "seg_003.png")
    paired = pair_masks(["a/Img_002.png", "a/Img_001.png", "a/Img_003.png"], tmp_path / "masks", "Img_", "seg_")
    assert paired == ["a/seg_002.png", "a/seg_001.png", "a/seg_003.png"]
    with pytest.raises(DatasetMismatchError, match="3 of 3 images have no mask"):  # without the prefix mapping
        pair_masks(["a/Img_001.png", "a/Img_002.png", "a/Img_003.png"], tmp_path / "masks")


def test_mask_sizes_and_channels(tmp_path):
    write_png(tmp_path / "img.png", (8, 8), "RGB")
    write_png(tmp_path / "small.png", (6, 8))
    write_png(tmp_path / "ok.png", (8, 8), "RGB", (255, 0, 0))
    with pytest.raises(DataFileError, match=r"small.png is 6x8, its image .*img.png is 8x8"):
        check_mask_sizes([tmp_path / "img.png"] * 2, [tmp_path / "ok.png", tmp_path / "small.png"])
    assert read_mask(tmp_path / "ok.png", 3).shape == (3, 8, 8)
    grey = read_mask(tmp_path / "ok.png", 1)
    assert grey.shape == (1, 8, 8) and grey.dtype == torch.uint8 and 0 < int(grey[0, 0, 0]) < 255


def tiny_backbone(name):
    """A small base network of each family the control models support, with random weights."""
    if name == "sit-text":
        base = SiT(input_size=4, patch_size=2, in_channels=48, hidden_size=32, depth=4, num_heads=2, text_dim=8,
                   text_len=3, z_dims=[])
    elif name == "unet-ldm":
        base = BACKBONES.get("UNet-LDM-Tiny")(input_size=4, in_channels=48, num_classes=3)
    else:
        family = {"dit": DiT, "lightningdit": LightningDiT}[name]
        base = family(input_size=4, patch_size=2, in_channels=48, hidden_size=32, depth=4, num_heads=2,
                      num_classes=3)
    return randomize(base, std=0.05).eval()


@pytest.mark.parametrize("name", ["sit-text", "dit", "lightningdit", "unet-ldm"])
def test_control_starts_as_the_base_and_scale_zero_is_the_base(name):
    torch.manual_seed(0)
    base = tiny_backbone(name)
    control = build_control(base, mask_channels=1, downsample=4).eval()
    x, t = torch.randn(2, 48, 4, 4), torch.tensor([0.3, 0.7]) * (999 if name == "unet-ldm" else 1)
    y = base.null_condition(2) if name == "sit-text" else torch.tensor([0, 2])
    mask = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        expected = base(x, t, y)[0]
        assert torch.equal(control(x, t, y, control=mask)[0], expected)  # zero-initialised joins
        randomize(control.branch, seed=1, std=0.05)
        assert torch.equal(control(x, t, y, control=mask, control_scale=0.0)[0], expected)
        assert torch.equal(control(x, t, y)[0], expected)  # no mask: the base
        guided = control(x, t, y, control=mask)[0]
        stricter = control(x, t, y, control=mask, control_scale=2.0)[0]
    assert (guided - expected).abs().max() > 1e-4 and (stricter - guided).abs().max() > 1e-4


def test_unsupported_bases_are_refused():
    with pytest.raises(ValueError, match="UNet-LDM base"):
        build_control(BACKBONES.get("UNet-Tiny")(input_size=8, in_channels=3))
    with pytest.raises(ValueError, match="copies 1 to 2 blocks"):
        build_control(tiny_backbone("sit-text"), num_blocks=3)


def test_the_base_gets_no_gradient_and_the_branch_alone_is_saved():
    base = tiny_backbone("dit")
    before = weights_fingerprint(base)
    control = build_control(base, downsample=4, num_blocks=1).train()
    assert not base.training
    optimizer = torch.optim.AdamW([p for p in control.parameters() if p.requires_grad], lr=1e-2)
    out = control(torch.randn(2, 48, 4, 4), torch.tensor([10.0, 500.0]), torch.tensor([0, 1]),
                  control=torch.rand(2, 1, 16, 16))[0]
    out.square().mean().backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None for p in control.branch.parameters())
    optimizer.step()
    assert weights_fingerprint(base) == before
    assert all(k.startswith("branch.") for k in control.state_dict()) and control.state_dict()


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    """A tiny class-labelled shapes dataset with masks, a base SiT checkpoint on it, and a ControlNet trained on it
    for 2 steps by train.py --control (in process)."""
    from accelerate.state import AcceleratorState
    from preprocessing.dataset_tools import encode

    root = tmp_path_factory.mktemp("masked")
    data = root / "data"
    make_dataset(data, 8, resolution=16, num_prompts=3, class_labels=True, masks=True)
    encode(data / "images", data / "vae-in", "pixel:4", gpus=0, batch_size=8, workers=0)
    base = randomize(SiT(input_size=4, patch_size=2, in_channels=48, hidden_size=32, depth=4, num_heads=2,
                         num_classes=24, z_dims=[]), std=0.05)
    objective, conditioner = build_objective("flow", time_shifting=False), ClassConditioner(24)
    description = checkpoint.describe("SiT-tiny", base, objective, conditioner, "pixel:4",
                                      (torch.zeros(48, 1, 1), torch.ones(48, 1, 1)), {"num_steps": 2})
    base_file = root / "base.safetensors"
    checkpoint.save_weights(base_file, base.state_dict(), description)
    argv = ["--exp-name", "ctrl", "--output-dir", str(root / "exps"), "--data-dir", str(data), "--control",
            "--init-from", str(base_file), "--enc-type", "none", "--batch-size", "4", "--num-workers", "0",
            "--checkpointing-steps", "2", "--mixed-precision", "no", "--learning-rate", "1e-2", "--log-every", "1"]
    for steps, resume in (("2", []), ("3", ["--resume", "latest"])):
        AcceleratorState._reset_state(reset_partial_state=True)
        train.main(train.parse_args([*argv, "--max-train-steps", steps, *resume]))
    AcceleratorState._reset_state(reset_partial_state=True)
    return root, data, base_file, root / "exps" / "ctrl" / "checkpoints" / "0000002"


def test_train_control_saves_only_the_branch_and_records_its_base(masked_run):
    root, data, base_file, ckpt = masked_run
    weights = load_file(str(ckpt / "ema.safetensors"))
    assert weights and all(k.startswith("branch.") for k in weights)
    raw = load_file(str(ckpt / "model.safetensors"))
    assert any(raw[k].abs().max() > 0 for k in raw if k.startswith("branch.after."))  # the zero joins moved
    description = checkpoint.read_description(ckpt / "model.safetensors")
    base = checkpoint.load(base_file)
    assert description["control"]["base"]["weights_sha256"] == weights_fingerprint(base.model)
    assert description["control"]["config"] == {"num_blocks": 2, "mask_channels": 1, "downsample": 4}
    loaded = checkpoint.load_control(ckpt, base, base_file)  # the base was left unchanged by training
    assert all(torch.equal(v, raw[k]) for k, v in checkpoint.load_control(ckpt, base, base_file, False)
               .model.state_dict().items())
    assert loaded.model.architecture == "transformer-control"
    with pytest.raises(ValueError, match="ControlNet checkpoint"):
        checkpoint.load(ckpt)
    resumed = load_file(str(ckpt.parent / "0000003" / "model.safetensors"))  # --resume latest went on from step 2
    assert resumed.keys() == raw.keys() and any(not torch.equal(resumed[k], raw[k]) for k in raw)


def test_missing_masks_stop_training_data_with_a_report(masked_run):
    from dataset import CustomDataset

    _, data, _, _ = masked_run
    dataset = CustomDataset(data)
    assert MaskedDataset(dataset, data / "masks")[0][3].shape == (1, 16, 16)
    victim = sorted((data / "masks").rglob("*.png"))[0]
    moved = victim.with_suffix(".bak")
    victim.rename(moved)
    try:
        with pytest.raises(DatasetMismatchError, match=f"1 of 8 images have no mask.*{victim.stem}"):
            MaskedDataset(dataset, data / "masks")
    finally:
        moved.rename(victim)


def test_generate_with_masks_writes_side_by_side_and_refuses_another_base(masked_run, tmp_path,
                                                                          fresh_accelerate_state):
    root, data, base_file, ckpt = masked_run
    common = ["--controlnet", str(ckpt), "--mask-folder", str(data / "control_eval" / "masks"), "--num-steps", "2",
              "--mixed-precision", "no", "--balanced-sampling", "--name", "m"]
    generate.main(generate.parse_args(["--ckpt", str(base_file), "--sample-dir", str(tmp_path / "s"), *common]))
    pairs = sorted((tmp_path / "s" / "m_compare").glob("*.png"))
    assert len(pairs) == 3 and (tmp_path / "s" / "m_compare_grid.png").exists()
    pair = np.asarray(Image.open(pairs[1]))
    mask = np.asarray(Image.open(data / "control_eval" / "masks" / "000001.png"))
    assert pair.shape == (16, 32, 3)
    assert np.array_equal(pair[:, :16, 0], mask)
    assert np.array_equal(pair[:, 16:], np.asarray(Image.open(tmp_path / "s" / "m" / "000001.png")))

    other = checkpoint.load(base_file)
    with torch.no_grad():
        other.model.final_layer.linear.bias.add_(1e-3)
    other_file = tmp_path / "other.safetensors"
    checkpoint.save_weights(other_file, other.model.state_dict(), other.description)
    with pytest.raises(ValueError, match="ControlNet of other weights"):
        generate.main(generate.parse_args(["--ckpt", str(other_file), "--sample-dir", str(tmp_path / "o"),
                                           *common]))
    assert not any((tmp_path / "o").iterdir())


def test_mask_iou_of_synthetic_shapes():
    rng = np.random.default_rng(0)
    shapes = [sample_attributes(rng) for _ in range(4)]
    images = [render(a, 32) for a in shapes]
    masks = [render_mask(a, 32) for a in shapes]
    assert all(mask_iou(image, mask) > 0.7 for image, mask in zip(images, masks))
    assert mask_iou(images[0], np.zeros((32, 32), np.uint8)) == 0.0
    assert mask_iou(np.full((32, 32, 3), 30, np.uint8), masks[0]) == 0.0  # no shape drawn
    shifted = np.roll(masks[0], 6, axis=1)
    assert mask_iou(images[0], shifted) < mask_iou(images[0], masks[0]) - 0.2
    scores = score_masks(images + images[::-1], masks)
    assert scores["n"] == 8 and scores["iou_mean"] < np.mean([mask_iou(i, m) for i, m in zip(images, masks)])


def test_unet_ldm_controlnet_trains_and_samples(masked_run, tmp_path, fresh_accelerate_state):
    _, data, _, _ = masked_run
    base = randomize(BACKBONES.get("UNet-LDM-Tiny")(input_size=4, in_channels=48, num_classes=24), std=0.02)
    objective = build_objective(base.default_objective, **base.objective_defaults)
    description = checkpoint.describe("UNet-LDM-Tiny", base, objective, ClassConditioner(24), "pixel:4",
                                      (torch.zeros(48, 1, 1), torch.ones(48, 1, 1)), base.sampling_defaults)
    base_file = tmp_path / "unet.safetensors"
    checkpoint.save_weights(base_file, base.state_dict(), description)
    train.main(train.parse_args([
        "--exp-name", "u", "--output-dir", str(tmp_path / "exps"), "--data-dir", str(data), "--control",
        "--init-from", str(base_file), "--enc-type", "none", "--cfm-coeff", "0", "--batch-size", "4",
        "--num-workers", "0", "--max-train-steps", "1", "--mixed-precision", "no"]))
    ckpt = tmp_path / "exps" / "u" / "checkpoints" / "0000001"
    assert checkpoint.read_description(ckpt / "ema.safetensors")["control"]["architecture"] == "unet-control"
    fresh_accelerate_state_reset()
    generate.main(generate.parse_args([
        "--ckpt", str(base_file), "--controlnet", str(ckpt), "--mask", str(data / "control_eval" / "masks" /
                                                                          "000000.png"),
        "--num-fid-samples", "2", "--num-steps", "2", "--sample-dir", str(tmp_path / "s"), "--name", "u",
        "--mixed-precision", "no"]))
    assert len(list((tmp_path / "s" / "u_compare").glob("*.png"))) == 2


def fresh_accelerate_state_reset():
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)


def test_generate_refuses_masks_of_another_size_naming_them(tmp_path):
    import generate

    good, bad = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("L", (16, 16), 255).save(good)
    Image.new("L", (24, 16), 255).save(bad)
    assert generate.read_masks([good], 1, 16).shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"16x16: 1 masks differ .*b\.png \(24x16\)"):
        generate.read_masks([good, bad], 1, 16)
