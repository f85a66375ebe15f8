"""FIDInceptionV3 against pytorch-fid's FID InceptionV3, layer for layer, on the same random weights.

pytorch-fid (requirements-dev.txt) builds its network from torchvision's Inception3 with its FID blocks and then
downloads the FID weights; here its download function is replaced by one that hands over a random state dict in
the layout of that weights file, so nothing is downloaded.
"""
import functools
import importlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluations import inception
from evaluations.inception import (FID_WEIGHTS_URL, PYTORCH_FID_BLOCKS, FIDInceptionV3, convert_pytorch_fid_state_dict,
                                   load_inception, preprocess_pytorch_fid)

# Every module of FIDInceptionV3's forward path, in order.
BLOCKS = [name for group in PYTORCH_FID_BLOCKS for name in group]


def require(module):
    """Import `module`; it is a dev requirement, so its absence fails under CI=true and skips elsewhere."""
    if os.environ.get("CI", "").lower() == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is missing: pip install -r requirements-dev.txt")


@functools.lru_cache(maxsize=None)
def pt_inception_layout():
    """Parameter names and shapes of pytorch-fid's weights file: torchvision's Inception3 with 1008 classes and no
    auxiliary head, as pytorch-fid's fid_inception_v3() builds it (the FID blocks keep the parent's parameters)."""
    torchvision = require("torchvision")
    model = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    return {key: (value.shape, value.dtype) for key, value in model.state_dict().items()}


def random_pt_inception(seed=0):
    """Random weights in the pt_inception layout, scaled so that activations stay of order one through the depth."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, (shape, dtype) in pt_inception_layout().items():
        if key.endswith("num_batches_tracked"):
            continue  # the real file has none; BatchNorm fills it in
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "bn.running_var")):
            value = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith(("bn.bias", "bn.running_mean")):
            value = (torch.rand(shape, generator=generator) - 0.5) * 0.2
        else:  # fc
            value = torch.randn(shape, generator=generator) * 0.05
        state[key] = value.to(dtype)
    return state


@pytest.fixture(scope="module")
def pt_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt_inception") / "pt_inception_random.pth"
    torch.save(random_pt_inception(), path)
    return path


@pytest.fixture(scope="module")
def pytorch_fid_network(pt_weights):
    """pytorch-fid's InceptionV3 returning all four of its blocks, its download answered from `pt_weights`."""
    pytorch_fid = require("pytorch_fid.inception")
    requested = []

    def fake_download(url, *args, **kwargs):
        requested.append(url)
        return torch.load(pt_weights, map_location="cpu", weights_only=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pytorch_fid, "load_state_dict_from_url", fake_download)
        model = pytorch_fid.InceptionV3(output_blocks=[0, 1, 2, 3], use_fid_inception=True)
    assert requested == [FID_WEIGHTS_URL]  # pytorch-fid's weights are the file ours names
    return model.eval()


def record_outputs(model, names):
    outputs = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    return outputs


def assert_close(ours, theirs, what):
    scale = theirs.abs().max().item()
    assert scale > 0, f"{what}: all zero"
    error = (ours - theirs).abs().max().item()
    assert error <= 1e-4 * scale, f"{what}: max |diff| {error:.3g} > 1e-4 x {scale:.3g}"


def test_layer_for_layer_equal_to_pytorch_fid(pytorch_fid_network, pt_weights):
    pytorch_fid = require("pytorch_fid.inception")
    theirs = pytorch_fid_network
    # The wrapper holds torchvision's modules with pytorch-fid's FID patches.
    fid_blocks = (pytorch_fid.FIDInceptionA, pytorch_fid.FIDInceptionC, pytorch_fid.FIDInceptionE_1,
                  pytorch_fid.FIDInceptionE_2)
    assert sum(isinstance(m, fid_blocks) for m in theirs.modules()) == 9
    ours = load_inception(pt_weights)  # the same file, through our loader and key mapping
    their_names = {name: f"blocks.{b}.{i}" for b, group in enumerate(PYTORCH_FID_BLOCKS)
                   for i, name in enumerate(group)}
    their_outputs = record_outputs(theirs, their_names.values())
    our_outputs = record_outputs(ours, BLOCKS)
    inputs = {}
    theirs.blocks[0][0].register_forward_pre_hook(lambda m, args: inputs.setdefault("x", args[0]))

    # pytorch-fid's whole pipeline on images in [0, 1] of another size: it resizes and normalises them itself.
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (2, 67, 91, 3), dtype=np.uint8))
    with torch.no_grad():
        their_blocks = theirs(pixels.permute(0, 3, 1, 2).float() / 255)
        graph_input = inputs["x"]
        assert graph_input.shape == (2, 3, 299, 299)
        pool, spatial = ours.forward_normalized(graph_input)  # the very tensor pytorch-fid fed its first conv

    for name in BLOCKS:
        assert_close(our_outputs[name], their_outputs[their_names[name]], name)
    assert_close(F.max_pool2d(our_outputs["Conv2d_2b_3x3"], 3, 2), their_blocks[0], "block 0 (first max pool)")
    assert_close(F.max_pool2d(our_outputs["Conv2d_4a_3x3"], 3, 2), their_blocks[1], "block 1 (second max pool)")
    assert_close(our_outputs["Mixed_6e"], their_blocks[2], "block 2 (Mixed_6e)")
    assert their_blocks[3].shape == (2, 2048, 1, 1) and pool.shape == (2, 2048)
    assert_close(pool, their_blocks[3].flatten(1), "pool features")
    sfid_layer = their_outputs["blocks.2.6"][:, :7].permute(0, 2, 3, 1).flatten(1)
    assert_close(spatial, sfid_layer, "spatial (sFID) features")
    assert pool.std() > 0.01 * pool.abs().mean()  # the random weights give features that vary

    # The resize, separately: pytorch-fid's input is our preprocess_pytorch_fid, not ADM's TF1 resize.
    torch.testing.assert_close(preprocess_pytorch_fid(pixels), graph_input, rtol=0, atol=1e-6)
    adm_input = FIDInceptionV3.preprocess(pixels)
    assert (adm_input - graph_input).abs().max() > 0.05  # the two evaluators do not see the same pixels


def test_at_299_both_preprocessings_only_normalise():
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.integers(0, 256, (1, 299, 299, 3), dtype=np.uint8))
    scaled = pixels.permute(0, 3, 1, 2).float()
    torch.testing.assert_close(FIDInceptionV3.preprocess(pixels), (scaled - 128) / 128)
    torch.testing.assert_close(preprocess_pytorch_fid(pixels), scaled / 127.5 - 1)


def test_convert_pytorch_fid_wrapper_state_dict(pytorch_fid_network, pt_weights):
    wrapper_state = pytorch_fid_network.state_dict()
    assert any(key.startswith("blocks.3.2.") for key in wrapper_state)
    converted = convert_pytorch_fid_state_dict(wrapper_state)
    file_state = random_pt_inception()
    assert set(converted) - {k for k in converted if k.endswith("num_batches_tracked")} == set(file_state) - {
        "fc.weight", "fc.bias"}
    for key, value in converted.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, file_state[key]), key
    # The file's own layout is already ours.
    assert convert_pytorch_fid_state_dict(file_state).keys() == file_state.keys()
    with pytest.raises(ValueError, match="blocks.4.0"):
        convert_pytorch_fid_state_dict({"blocks.4.0.conv.weight": torch.zeros(1)})


def test_weight_files_pth_safetensors_and_wrapper(tmp_path, pytorch_fid_network, pt_weights):
    from safetensors.torch import save_file

    state = random_pt_inception()
    save_file(state, tmp_path / "pt_inception.safetensors")
    from_safetensors = load_inception(tmp_path / "pt_inception.safetensors").state_dict()
    from_pth = load_inception(pt_weights).state_dict()
    assert all(torch.equal(from_safetensors[k], from_pth[k]) for k in state)
    torch.save(pytorch_fid_network.state_dict(), tmp_path / "wrapper.pth")
    with pytest.raises(ValueError, match="no classifier"):
        load_inception(tmp_path / "wrapper.pth")


def test_compare_command_on_a_folder(tmp_path, pt_weights, capsys):
    require("pytorch_fid.inception")
    from PIL import Image

    rng = np.random.default_rng(2)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(folder / "0.png")
    inception.main(["--compare-pytorch-fid", str(folder), "--inception-weights", str(pt_weights)])
    printed = capsys.readouterr().out
    assert "images: 1" in printed and "OK: the port matches pytorch-fid" in printed

    # A port that differs in one layer is caught.
    broken = torch.load(pt_weights, weights_only=True)
    broken["Mixed_7c.branch_pool.bn.bias"] += 1.0
    torch.save(broken, tmp_path / "broken.pth")
    result = {}
    original = inception.load_inception

    def load_other(weights, *args, **kwargs):  # ours gets the broken weights, pytorch-fid the right ones
        result["loaded"] = True
        return original(tmp_path / "broken.pth", *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_inception", load_other)
        with pytest.raises(SystemExit) as exit_info:
            inception.main(["--compare-pytorch-fid", str(folder), "--inception-weights", str(pt_weights)])
    assert result["loaded"] and exit_info.value.code == 1
    assert "MISMATCH" in capsys.readouterr().out
