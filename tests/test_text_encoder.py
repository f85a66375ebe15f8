"""Text encoders: the packaged MiniLM offline, a tiny CLIP saved to disk, and the error paths."""
import importlib.machinery
import sys
import types

import pytest
import torch

from models import text_encoder
from models.text_encoder import TextEncoder, minilm_path

CAPTIONS = ["a red triangle", "a small blue circle to the left of a big green square", "a red triangle"]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.load(minilm_path())


def _offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def _save_tiny_clip(directory, text_only=False):
    """A 3-layer CLIP (text + vision towers unless text_only) and a lowercase-letter BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {token: i for i, token in enumerate(letters + [c + "</w>" for c in letters])}
    merges = [("r", "e"), ("re", "d</w>"), ("b", "l"), ("bl", "u"), ("blu", "e</w>")]
    for pair in merges:
        vocab["".join(pair)] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    text_config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    if text_only:
        model = CLIPTextModel(text_config)
    else:
        vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=28, patch_size=14, projection_dim=16)
        model = CLIPModel(CLIPConfig(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                                     projection_dim=16))
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model.text_model if not text_only else model, tokenizer


def test_minilm_path_is_a_model_dir():
    path = minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_minilm_embeddings(minilm):
    assert minilm.dim == 384 and minilm.max_length == 77 and not minilm.is_clip
    long_caption = " ".join(["red"] * 200)
    z = minilm(CAPTIONS + [long_caption])
    assert z.shape == (4, 77, 384) and z.dtype == torch.float32
    assert torch.allclose(z[0], z[2], atol=1e-5)
    assert (z[0] - z[1]).abs().max() > 1e-2
    assert torch.allclose(minilm([CAPTIONS[0]])[0], z[0], atol=1e-5)
    assert torch.isfinite(z).all()


def test_minilm_padding_does_not_change_real_tokens(minilm):
    batch = minilm.tokenizer([CAPTIONS[1]], return_tensors="pt")
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        unpadded = minilm.model(**batch).last_hidden_state[0]
    assert n < 77
    assert torch.allclose(minilm([CAPTIONS[1]])[0, :n], unpadded, atol=1e-4)


def test_minilm_is_frozen_and_outputs_feed_autograd(minilm):
    minilm.train()
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    z = minilm(CAPTIONS)
    assert not z.requires_grad
    head = torch.nn.Linear(384, 4)
    head(z).square().mean().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_minilm_alias_and_empty_batch():
    encoder = TextEncoder.load("minilm", max_length=16)
    assert encoder([]).shape == (0, 16, 384)
    assert encoder("a red triangle").shape == (1, 16, 384)


@pytest.mark.parametrize("text_only", [False, True])
def test_tiny_clip_returns_penultimate_hidden_state(tmp_path, text_only):
    text_model, tokenizer = _save_tiny_clip(tmp_path, text_only=text_only)
    encoder = TextEncoder.load(tmp_path)
    assert encoder.is_clip and encoder.dim == 32
    captions = ["a red cat", "blue blue bird", ""]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = text_model(input_ids=ids, output_hidden_states=True)
    z = encoder(captions)
    assert z.shape == (3, 77, 32)
    assert torch.allclose(z, out.hidden_states[-2], atol=1e-5)
    assert not torch.allclose(z, out.last_hidden_state, atol=1e-3)
    assert not torch.allclose(z, out.hidden_states[-1], atol=1e-3)


def test_modelscope_id_goes_through_modelscope(tmp_path, monkeypatch):
    _save_tiny_clip(tmp_path / "snapshot")
    requested = []

    def snapshot_download(model_id):
        requested.append(model_id)
        return str(tmp_path / "snapshot")

    fake = types.ModuleType("modelscope")
    fake.__spec__ = importlib.machinery.ModuleSpec("modelscope", None)
    fake.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "modelscope", fake)
    encoder = TextEncoder.load("AI-ModelScope/tiny-clip")
    assert requested == ["AI-ModelScope/tiny-clip"]
    assert encoder(["a red cat"]).shape == (1, 77, 32)


def test_unavailable_id_error_lists_what_was_tried(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path)

    def no_snapshot(model_id):
        raise ConnectionError(f"cannot reach modelscope for {model_id}")

    monkeypatch.setattr(text_encoder, "_modelscope_snapshot", no_snapshot)
    with pytest.raises(FileNotFoundError) as info:
        TextEncoder.load("AI-ModelScope/CLIP-GmP-ViT-L-14")
    message = str(info.value)
    assert "ModelScope AI-ModelScope/CLIP-GmP-ViT-L-14" in message
    assert "Hugging Face hub zer0int/CLIP-GmP-ViT-L-14" in message
    assert "hf download zer0int/CLIP-GmP-ViT-L-14" in message

    with pytest.raises(FileNotFoundError, match="omegadit-tests/no-such-encoder"):
        TextEncoder.load("omegadit-tests/no-such-encoder")


def test_missing_local_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TextEncoder.load(tmp_path / "empty")
    _save_tiny_clip(tmp_path / "no-tokenizer", text_only=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no-tokenizer" / name).unlink()
    with pytest.raises(OSError, match="could not load a text encoder from"):
        TextEncoder.load(tmp_path / "no-tokenizer")


def test_max_length_beyond_positions(tmp_path):
    _save_tiny_clip(tmp_path, text_only=True)
    with pytest.raises(ValueError, match="max_length=100"):
        TextEncoder.load(tmp_path, max_length=100)


def test_train_clip_output_flag_reaches_the_conditioner_and_the_checkpoint(tmp_path):
    """train.py --clip-output last: the text conditioner gives CLIP's last hidden state (U-ViT's MS-COCO models),
    its config records it and the conditioner a checkpoint rebuilds (as generate.py does) uses it too; the
    default stays the penultimate one."""
    import train
    from omegadit.conditioners import build_conditioner

    text_model, tokenizer = _save_tiny_clip(tmp_path)
    ids = tokenizer(["a red cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        out = text_model(input_ids=ids, output_hidden_states=True)
    argv = ["--exp-name", "x", "--data-dir", "d", "--use-json-dataset", "--text-encoder", str(tmp_path),
            "--text-len", "77"]
    last, _ = train.build_conditioner(train.parse_args([*argv, "--clip-output", "last"]), None, "cpu")
    assert torch.allclose(last(["a red cat"], "cpu"), out.last_hidden_state, atol=1e-5)
    description = last.describe()
    rebuilt = build_conditioner(description["name"], **description["config"]).load("cpu")
    assert rebuilt.config["clip_output"] == "last"
    assert torch.allclose(rebuilt(["a red cat"], "cpu"), out.last_hidden_state, atol=1e-5)
    default, _ = train.build_conditioner(train.parse_args(argv), None, "cpu")
    assert torch.allclose(default(["a red cat"], "cpu"), out.hidden_states[-2], atol=1e-5)


def test_captions_tokenized_in_loader_workers_encode_like_the_captions():
    """train.py tokenizes captions in the DataLoader's workers (TransformConditions with the conditioner's
    batch_transform); the tokens that come back encode to exactly the features of the captions themselves."""
    from torch.utils.data import DataLoader

    from json_label_dataset import TransformConditions, collate
    from omegadit.conditioners import TextConditioner

    conditioner = TextConditioner("minilm", text_len=16).load("cpu")
    items = [(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.full((4, 2, 2), float(i)), caption)
             for i, caption in enumerate(CAPTIONS * 2)]
    loader = DataLoader(items, batch_size=3, num_workers=2,
                        collate_fn=TransformConditions(collate, conditioner.batch_transform()))
    batches = list(loader)
    assert len(batches) == 2
    expected = conditioner(CAPTIONS, "cpu")
    for _, latents, tokens in batches:
        assert isinstance(tokens, dict) and tokens["input_ids"].shape == (3, 16)
        torch.testing.assert_close(conditioner(tokens, "cpu"), expected, rtol=0, atol=0)
    assert not torch.equal(conditioner(CAPTIONS[1:] + CAPTIONS[:1], "cpu"), expected)


def test_transform_conditions_leaves_labels_and_cached_embeddings_alone():
    from json_label_dataset import TransformConditions, collate

    def refuse(conditions):
        raise AssertionError("tensor conditions must not be transformed")

    batch = [(torch.zeros(3, 2, 2, dtype=torch.uint8), torch.zeros(4, 2, 2), torch.full((5, 8), float(i)))
             for i in range(2)]
    _, _, conditions = TransformConditions(collate, refuse)(batch)
    assert conditions.shape == (2, 5, 8) and conditions[1].eq(1).all()
