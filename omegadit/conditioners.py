"""Conditioners: turn a dataset's conditions (captions, cached caption embeddings, class labels) into what a
backbone takes as `y`, and own the condition dropout that trains the null branch of classifier-free guidance.

The null condition itself (a null caption embedding, a null class row) lives with the backbone's weights
(`model.null_condition`); a conditioner decides which samples get it. Unconditional models ('none') get a dummy
label per sample, so that the training loop and the samplers treat every model alike.
"""
import torch

from omegadit.registry import Registry
from omegadit.transfer import to_device

CONDITIONERS = Registry("conditioner")
DEFAULT_TEXT_ENCODER = "AI-ModelScope/CLIP-GmP-ViT-L-14"
DEFAULT_TEXT_LEN = 77


class Conditioner:
    """Base: `kind` (matches a backbone's `conditioning`), `config` (what checkpoints record), dropout."""

    kind = ""

    def __init__(self, dropout: float = 0.1, **config):
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"condition dropout must lie in [0, 1], got {dropout}")
        self.dropout = dropout
        self.config = dict(dropout=dropout, **config)

    def describe(self) -> dict:
        return {"name": self.kind, "config": dict(self.config)}

    def batch_transform(self):
        """A picklable function of a batch's conditions that the DataLoader workers run, so that its CPU work is
        done off the training loop (captions: tokenization), or None. `__call__` accepts its output."""
        return None

    def drop(self, y: torch.Tensor, null: torch.Tensor, generator=None) -> torch.Tensor:
        """y with each sample replaced by `null` with probability `dropout` (training only)."""
        if self.dropout == 0:
            return y
        keep = torch.rand(y.shape[0], device=y.device, generator=generator) >= self.dropout
        return torch.where(keep.view(-1, *[1] * (y.dim() - 1)), y, null.to(y.dtype))


@CONDITIONERS.register("text")
class TextConditioner(Conditioner):
    """Captions -> (N, text_len, dim) float32 token features of a frozen text encoder (models/text_encoder.py),
    run in float32 outside autocast in training and sampling alike. Cached embeddings pass through.
    clip_output: which CLIP features ('penultimate' hidden state, OmegaDiT; 'last', U-ViT)."""

    kind = "text"

    def __init__(self, text_encoder: str = DEFAULT_TEXT_ENCODER, text_len: int = DEFAULT_TEXT_LEN,
                 dropout: float = 0.1, clip_output: str = "penultimate"):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        super().__init__(dropout, text_encoder=text_encoder, text_len=text_len, clip_output=clip_output)
        self.text_len = text_len
        self.encoder = None

    def load(self, device, name=None):
        """Load the text encoder (`name` overrides the recorded one); returns self."""
        from models.text_encoder import TextEncoder
        self.encoder = TextEncoder.load(name or self.config["text_encoder"], device=device, max_length=self.text_len,
                                        clip_output=self.config["clip_output"])
        return self

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def batch_transform(self):
        """The caption tokenizer (see Conditioner.batch_transform); None before `load`."""
        return None if self.encoder is None else self.encoder.tokenize

    def __call__(self, conditions, device) -> torch.Tensor:
        """Token features of a list of captions or of their tokens (`batch_transform`'s output), or cached
        embeddings (N, text_len, dim) moved to `device`."""
        if isinstance(conditions, torch.Tensor):
            return to_device(conditions, device)
        if self.encoder is None:
            raise RuntimeError("TextConditioner.load(device) must run before encoding captions")
        with torch.autocast(torch.device(device).type, enabled=False):
            return self.encoder(conditions).to(device)


@CONDITIONERS.register("class")
class ClassConditioner(Conditioner):
    """Class indices in [0, num_classes) -> a long tensor; out-of-range labels are an error."""

    kind = "class"

    def __init__(self, num_classes: int = 1000, dropout: float = 0.1):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(dropout, num_classes=num_classes)
        self.num_classes = num_classes

    def check(self, labels):
        """Raise unless every label is a class index of this conditioner."""
        labels = torch.as_tensor(labels)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)].unique()[:5].tolist()
            raise ValueError(f"class labels {bad} are outside [0, {self.num_classes}) (num_classes {self.num_classes})")
        return labels

    def __call__(self, conditions, device) -> torch.Tensor:
        return to_device(self.check(conditions), device, torch.long)


@CONDITIONERS.register("none")
class UnconditionalConditioner(Conditioner):
    """No condition (backbones whose conditioning is 'none'): every sample gets the dummy label 0, which such a
    backbone ignores or maps to its one null embedding; nothing is dropped."""

    kind = "none"

    def __init__(self, dropout: float = 0.0):
        super().__init__(0.0)

    def __call__(self, conditions, device) -> torch.Tensor:
        return torch.zeros(len(conditions), dtype=torch.long, device=device)

    def drop(self, y: torch.Tensor, null: torch.Tensor, generator=None) -> torch.Tensor:
        return y


def build_conditioner(name: str, **config):
    """The conditioner registered as `name` with its recorded config."""
    return CONDITIONERS.build(name, **config)
