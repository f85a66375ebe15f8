"""The FID Inception-v3 network (TensorFlow graph inception-2015-12-05) in PyTorch, as ADM's evaluator uses it.

The module layout and parameter names follow torchvision's Inception3 with the FID patches, so the weights file
that pytorch-fid downloads (`pt_inception-2015-12-05-6726825d.pth`, a TF-to-PyTorch port of the graph ADM loads,
`classify_image_graph_def.pb`) loads with strict=True.

What ADM takes from the TF graph and where it lives here:

- `pool_3:0` (2048-d): the 8x8 average pool after Mixed_7c (TF `mixed_10`).
- `mixed_6/conv:0[..., :7]` (17x17x7): the TF graph numbers its Inception blocks `mixed, mixed_1, ..., mixed_10`,
  so `mixed_6` is the seventh block, Mixed_6d (after Mixed_5b/5c/5d and Mixed_6a/6b/6c). Inside a block `conv` is
  its first, 1x1 branch (`mixed_6/conv/conv2d_params` and `mixed_6/conv/batchnorm` are Mixed_6d.branch1x1.conv and
  .bn in torch-fidelity's TF-to-PyTorch converter), and the node named `mixed_6/conv` itself is the ReLU after
  `mixed_6/conv/batchnorm` and `mixed_6/conv/CheckNumerics` (node list of classify_image_graph_def.pb:
  `conv/Conv2D, conv/batchnorm, conv/CheckNumerics, conv/control_dependency, conv`). So it is the ReLU output of
  Mixed_6d.branch1x1. The branch is the first slice of the block's concat, so Mixed_6d's output[:, :7] is exactly
  that tensor's first 7 channels (guided-diffusion issue #109 reaches the same layer). It is flattened in ADM's
  NHWC order (h, w, c), which matters when mixing with `mu_s`/`sigma_s` from ADM reference batches.
- `softmax` for the Inception Score: ADM rebuilds it as softmax(pool_3 @ W) from the weight of
  `softmax/logits/MatMul`, without the bias; `logits` below does the same with fc.weight.

Input handling follows the graph from `ExpandDims` on: float pixels in [0, 255] (ADM feeds uint8 NHWC cast to
float32), `ResizeBilinear` to 299x299 with TF1 semantics (align_corners=False and no half-pixel centres: source
coordinate = dst * in/out), then `Sub` 128 and `Mul` 1/128, i.e. (x - 128) / 128 (graph nodes `ExpandDims,
ResizeBilinear, Sub, Mul, conv/...`; torch-fidelity's port of the same graph resizes and normalises this way too).
This differs from pytorch-fid, which resizes with half-pixel centres and maps x/255 to [-1, 1]
(`preprocess_pytorch_fid` below does what it does, for comparisons).

Checking the port against pytorch-fid once the weights are at hand (pytorch-fid installed, e.g. from
requirements-dev.txt):

    python evaluations/inception.py --compare-pytorch-fid FOLDER_OR_NPZ --inception-weights PATH

runs both networks on the same images with pytorch-fid's own preprocessing and reports the largest difference of
the 2048-d pool features (tests/test_inception_parity.py does the same layer by layer on random weights).
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, as the TF graph) -> ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x):
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x):
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction block."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions; branch1x1 comes first in the output."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b7, b7d, bp], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction block."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 convolutions. The graph's last block (mixed_10) max-pools its pool branch."""

    def __init__(self, in_channels, pool="avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = _avg_pool_same if pool == "avg" else _max_pool_same
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b3, b3d, bp], dim=1)


def resize_bilinear_tf1(x, size):
    """Bilinear resize of (N, C, H, W) floats as TF1's ResizeBilinear with align_corners=False.

    Source coordinate = dst * (in / out) (no half-pixel centres), neighbours floor and floor + 1 clamped to the
    edge, interpolated along width then height.
    """
    out_h, out_w = size
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x

    def taps(in_size, out_size):
        scale = float(np.float32(in_size) / np.float32(out_size))
        src = torch.arange(out_size, dtype=torch.float32, device=x.device) * scale
        lo = src.floor()
        frac = (src - lo).to(x.dtype)
        lo = lo.long()
        return lo, (lo + 1).clamp(max=in_size - 1), frac

    y0, y1, fy = taps(in_h, out_h)
    x0, x1, fx = taps(in_w, out_w)
    top, bottom = x[..., y0, :], x[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID TF graph; `forward` gives ADM's pool_3 and mixed_6/conv[..., :7] features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def preprocess(images):
        """(N, H, W, 3) pixels in [0, 255] (uint8 or float) -> (N, 3, 299, 299) graph input in [-1, 1)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()
        x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) / 128.0

    def forward(self, images):
        """Images (N, H, W, 3) in [0, 255] -> (pool (N, 2048), spatial (N, 17*17*7) in NHWC order)."""
        return self.forward_normalized(self.preprocess(images))

    def forward_normalized(self, x):
        """Graph input (N, 3, 299, 299), already resized and in [-1, 1] -> (pool, spatial) as `forward`."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        x = self.Mixed_6d(x)
        spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return pool, spatial

    def logits(self, pool):
        """ADM's IS logits: pool_3 @ W of `softmax/logits/MatMul` (the bias is not used)."""
        return pool @ self.fc.weight.t()


def _missing_weights_message(path=None):
    where = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)
    found = f"{path} does not exist. " if path is not None else ""
    return (
        f"{found}The FID Inception weights are needed: download {FID_WEIGHTS_URL} and pass it with "
        f"--inception-weights PATH, or put it at {where} (the torch.hub cache, $TORCH_HOME/hub/checkpoints)."
    )


def fetch_weights(download=True):
    """Path of the FID Inception weights in the torch.hub cache, downloading them there when allowed."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)
    if os.path.isfile(path):
        return path
    if not download:
        raise FileNotFoundError(_missing_weights_message())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, path)
    except Exception as error:
        raise FileNotFoundError(f"downloading failed ({error}). " + _missing_weights_message()) from error
    return path


def read_state_dict(path):
    """A dict of tensors from a .safetensors file or a torch file, loaded without executing code."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


# The modules of pytorch_fid.inception.InceptionV3's `blocks` (a ModuleList of Sequentials), by position; the
# positions not listed are parameter-free max and average pools.
PYTORCH_FID_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


def convert_pytorch_fid_state_dict(state):
    """pytorch-fid's Inception weights in FIDInceptionV3's parameter names.

    Takes either layout pytorch-fid has: the weights file `pt_inception-2015-12-05-6726825d.pth` (the names of its
    `fid_inception_v3()`, torchvision's Inception3 names, which are FIDInceptionV3's own: kept as they are), or
    the state dict of its feature wrapper `pytorch_fid.inception.InceptionV3` (`blocks.B.I.<name>`, renamed to the
    Inception3 module at that position). The wrapper has no classifier, so a converted wrapper state lacks
    `fc.weight` and `fc.bias`.
    """
    converted = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, block, index, rest = key.split(".", 3)
            try:
                key = f"{PYTORCH_FID_BLOCKS[int(block)][int(index)]}.{rest}"
            except (IndexError, ValueError):
                raise ValueError(f"{key!r} is not a parameter of pytorch-fid's InceptionV3 blocks") from None
        if key in converted:
            raise ValueError(f"{key!r} appears twice after conversion")
        converted[key] = value
    return converted


def load_inception(weights=None, device="cpu", download=True):
    """FIDInceptionV3 in eval mode from `weights` (.pth state dict or .safetensors, in FIDInceptionV3's or
    pytorch-fid's names) or the torch.hub cache / a download."""
    path = weights if weights is not None else fetch_weights(download)
    if not os.path.isfile(path):
        raise FileNotFoundError(_missing_weights_message(path))
    state = convert_pytorch_fid_state_dict(read_state_dict(path))
    if "fc.weight" not in state and "Mixed_7c.branch_pool.conv.weight" in state:
        raise ValueError(
            f"{path} has no classifier (fc.weight), which the Inception Score needs: it looks like the state dict "
            f"of pytorch-fid's InceptionV3 feature wrapper; use the weights file {FID_WEIGHTS_NAME} itself"
        )
    model = FIDInceptionV3()
    # A plain dict carries no module versions, so BatchNorm fills a missing num_batches_tracked itself.
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)


def preprocess_pytorch_fid(images):
    """(N, H, W, 3) pixels in [0, 255] -> (N, 3, 299, 299) input as pytorch-fid makes it.

    pytorch-fid reads images as x / 255, resizes them with F.interpolate (bilinear, align_corners=False: half-pixel
    centres) and maps them to [-1, 1] by 2x - 1. Only for comparisons with pytorch-fid: ADM's evaluator, and so
    ours, uses `FIDInceptionV3.preprocess`.
    """
    x = images.permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


def pytorch_fid_inception(weights):
    """pytorch-fid's own InceptionV3 feature network (2048-d pool, with its own resize and normalisation) holding
    the weights file `weights`, built without downloading: its loader is pointed at the file while it is built."""
    from pytorch_fid import inception as pytorch_fid

    state = read_state_dict(weights)

    def from_file(url, *args, **kwargs):
        if url != pytorch_fid.FID_WEIGHTS_URL:
            raise ValueError(f"pytorch-fid asked for {url}, not its FID weights")
        return state

    original = pytorch_fid.load_state_dict_from_url
    pytorch_fid.load_state_dict_from_url = from_file
    try:
        model = pytorch_fid.InceptionV3([pytorch_fid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
    finally:
        pytorch_fid.load_state_dict_from_url = original
    return model.eval().requires_grad_(False)


@torch.no_grad()
def compare_with_pytorch_fid(images_path, weights, batch_size=16, device="cpu"):
    """Pool features of FIDInceptionV3 and of pytorch-fid's InceptionV3 with the same weights on the images of an
    .npz batch or a folder, both given pytorch-fid's preprocessing. Returns the number of images, the largest
    absolute difference, that difference relative to the largest feature, and how far ADM's preprocessing moves
    our features from pytorch-fid's (relative, for information)."""
    from evaluations.evaluator import _full_precision, iterate_images

    ours = load_inception(weights, device, download=False)
    theirs = pytorch_fid_inception(weights).to(device)
    count, batches = iterate_images(images_path, batch_size)
    diff = scale = adm_diff = 0.0
    with _full_precision():
        for batch in batches:
            pixels = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            reference = theirs(pixels.permute(0, 3, 1, 2).float() / 255.0)[0].flatten(1)
            pool = ours.forward_normalized(preprocess_pytorch_fid(pixels))[0]
            adm_pool = ours(pixels)[0]
            diff = max(diff, (pool - reference).abs().max().item())
            adm_diff = max(adm_diff, (adm_pool - reference).abs().max().item())
            scale = max(scale, reference.abs().max().item())
    scale = scale or 1.0
    return {"images": count, "max_abs_diff": diff, "max_rel_diff": diff / scale,
            "adm_preprocess_rel_diff": adm_diff / scale}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check the FID Inception port against pytorch-fid on images.")
    parser.add_argument("--compare-pytorch-fid", required=True, metavar="IMAGES",
                        help="an image folder (png/jpg) or an ADM .npz batch")
    parser.add_argument("--inception-weights", default=None,
                        help=f"{FID_WEIGHTS_NAME} (default: the torch.hub cache; never downloaded here)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative difference accepted")
    args = parser.parse_args(argv)
    try:
        weights = args.inception_weights or fetch_weights(download=False)
        result = compare_with_pytorch_fid(args.compare_pytorch_fid, weights, args.batch_size, args.device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"images: {result['images']}")
    print(f"pool features, same input: max |ours - pytorch-fid| = {result['max_abs_diff']:.3g} "
          f"({result['max_rel_diff']:.3g} of the largest feature)")
    print(f"ADM's preprocessing instead of pytorch-fid's moves them by {result['adm_preprocess_rel_diff']:.3g}")
    if result["max_rel_diff"] > args.tolerance:
        print(f"MISMATCH: above the tolerance {args.tolerance}")
        sys.exit(1)
    print("OK: the port matches pytorch-fid")


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
