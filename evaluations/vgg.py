"""VGG16 fc2 features for improved precision and recall (Kynkaanniemi et al. 2019).

The paper measures precision and recall with k=3 nearest neighbours in the space of VGG16's 4096-d `fc2` features.
What we chose, and why:

- Features: the output of the second fully connected layer after its ReLU (torchvision's `classifier[4]`, the
  layer often called fc7 / relu7). The reference networks return it this way (NVIDIA's VGG16 port for metrics
  returns fc2 after ReLU, dropout being the identity at inference).
- Resize: images go to 224x224, the size VGG16 was trained at, with TF1's bilinear rule (source coordinate =
  dst * in / out, as the TensorFlow reference resizes in its graph; `resize_bilinear_tf1`, shared with the FID
  Inception).
- Weights: torchvision's ImageNet VGG16, `vgg16-397923af.pth` (a state dict, loaded with weights_only=True, or
  the same tensors as .safetensors). They expect RGB in [0, 1] normalised with the ImageNet mean and std, which
  `preprocess` does. The paper's code and NVIDIA's port carry the VGG authors' original (Caffe) weights, so
  absolute numbers can differ slightly from papers that used them; the metric itself is the same.

The network is written here with torchvision's module layout (`features.N`, `classifier.N`), so that file loads
with strict=True; torchvision itself is not needed.
"""
import os

import torch
import torch.nn as nn

from evaluations.inception import read_state_dict, resize_bilinear_tf1

VGG16_WEIGHTS_NAME = "vgg16-397923af.pth"
VGG16_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_WEIGHTS_ENV = "OMEGADIT_VGG16_WEIGHTS"
INPUT_SIZE = 224
WIDTHS = (64, 128, 256, 512, 512)
CONVS_PER_STAGE = (2, 2, 3, 3, 3)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _first_conv_indices():
    """Index in `features` of the first convolution of each stage (conv, ReLU pairs, then a max pool)."""
    indices, position = [], 0
    for convs in CONVS_PER_STAGE:
        indices.append(position)
        position += 2 * convs + 1
    return indices


class VGG16(nn.Module):
    """VGG16 (configuration D) in torchvision's layout; `widths` and `hidden` can be shrunk for tests."""

    def __init__(self, widths=WIDTHS, hidden=4096, num_classes=1000):
        super().__init__()
        layers, channels = [], 3
        for width, convs in zip(widths, CONVS_PER_STAGE):
            for _ in range(convs):
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 7 * 7, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    @classmethod
    def from_state_dict(cls, state):
        """A VGG16 sized after the tensors of `state` (torchvision's names) and holding them."""
        try:
            widths = tuple(state[f"features.{i}.weight"].shape[0] for i in _first_conv_indices())
            hidden, num_classes = state["classifier.0.weight"].shape[0], state["classifier.6.weight"].shape[0]
        except KeyError as error:
            raise ValueError(f"not a torchvision VGG16 state dict: {error.args[0]} is missing") from None
        with torch.device("meta"):
            model = cls(widths, hidden, num_classes)
        model.load_state_dict(state, strict=True, assign=True)
        return model

    @staticmethod
    def preprocess(images, size=INPUT_SIZE):
        """(N, H, W, 3) pixels in [0, 255] -> (N, 3, size, size), TF1-bilinear resized, ImageNet-normalised."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.permute(0, 3, 1, 2).float(), (size, size)) / 255.0
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def fc2(self, x):
        """Normalised input (N, 3, H, W) -> fc2 features after ReLU (N, hidden)."""
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:5](x)

    def forward(self, images):
        """Images (N, H, W, 3) in [0, 255] -> fc2 features (N, 4096) of the 224x224 resized images."""
        return self.fc2(self.preprocess(images))


def default_weights_path():
    """$OMEGADIT_VGG16_WEIGHTS when set, else torchvision's cache file in $TORCH_HOME/hub/checkpoints."""
    return os.environ.get(VGG16_WEIGHTS_ENV) or os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_WEIGHTS_NAME)


def load_vgg16(weights=None, device="cpu"):
    """VGG16 in eval mode from a local torchvision state dict (.pth, weights_only) or .safetensors; never
    downloads. A missing file raises FileNotFoundError saying where to put it."""
    path = str(weights) if weights is not None else default_weights_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist. VGG16 precision/recall needs torchvision's ImageNet VGG16 weights: download "
            f"{VGG16_WEIGHTS_URL} and pass it with --vgg-weights PATH, set {VGG16_WEIGHTS_ENV}=PATH, or put it at "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints', VGG16_WEIGHTS_NAME)}."
        )
    model = VGG16.from_state_dict(read_state_dict(path))
    return model.to(device).eval().requires_grad_(False)
