"""Sharded streaming datasets: LitData chunks of (latent, image bytes, caption or label, cached caption embedding).

Layout of a shard dataset (local folder or object-storage URL):
    index.json          LitData's index of the chunk files (what litdata.StreamingDataset reads)
    omegadit.json       what the items hold: fields, condition, latent shape and statistics, image size, ...
    chunk-<part>-<n>.bin
    parts/<part>.json   one record per written part (preprocessing/shard_writer.py; its presence: the part is done)

Items are dicts: 'id' (str), 'latent' (float16 (C, h, w), raw), 'image' (PNG/JPEG bytes, optional), 'caption'
(str) or 'label' (int), 'text_emb' (float16 (L, D), optional). ShardDataset turns them into the (image uint8,
normalised latent float32, condition) items of the folder datasets; ShardLoader gives each process its own part of
every epoch through litdata.StreamingDataLoader and saves and restores its position exactly.
"""
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from omegadit.data_checks import DataFileError

INDEX_FILE = "index.json"
META_FILE = "omegadit.json"
FORMAT = "omegadit-shards/1"
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "hf://", "r2://")
CONDITION_FIELDS = ("caption", "label")
INSTALL_HINT = "sharded datasets need LitData: pip install litdata (listed in requirements.txt)"


def import_litdata():
    """The litdata module (imported on first use; its PyPI version check is turned off: training runs offline)."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    try:
        import litdata
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return litdata


def is_remote(source) -> bool:
    return str(source).startswith(REMOTE_PREFIXES)


def is_shard_dataset(source) -> bool:
    """Whether `source` is a shard dataset: an object-storage URL, or a folder holding index.json."""
    return is_remote(source) or (Path(source) / INDEX_FILE).is_file()


def read_meta(source) -> dict:
    """omegadit.json of a shard dataset (fetched with LitData's downloader for a URL); clear errors when missing."""
    source = str(source)
    if not is_remote(source):
        path = Path(source) / META_FILE
        if not (Path(source) / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{source} is not a shard dataset: no {INDEX_FILE} (write one with "
                                    f"preprocessing/dataset_tools.py pack or encode-wds)")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {source} holds LitData chunks but not the description "
                                    f"OmegaDiT writes beside them (pack or encode-wds writes it)")
        return _checked_meta(json.loads(path.read_text()), str(path))
    import_litdata()
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, META_FILE)
        try:
            get_downloader(source, tmp, []).download_file(f"{source.rstrip('/')}/{META_FILE}", local)
            with open(local) as f:
                return _checked_meta(json.load(f), f"{source}/{META_FILE}")
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"cannot read {source}/{META_FILE}: {e}") from e


def _checked_meta(meta, where: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not an OmegaDiT shard description (expected format {FORMAT!r})")
    return meta


def require_fields(meta: dict, fields, source, hint: str = "") -> None:
    """DataFileError naming the fields of `fields` the shards of `source` do not hold."""
    missing = [f for f in fields if f not in meta["fields"]]
    if missing:
        raise DataFileError(f"{source}: the shards hold no {', '.join(repr(f) for f in missing)} field "
                            f"(they hold {', '.join(meta['fields'])}){hint}")


def chunk_problems(source) -> list:
    """(path, message) for each chunk file of a local shard dataset that is missing or of the wrong size."""
    if is_remote(source):
        return []
    index = json.loads((Path(source) / INDEX_FILE).read_text())
    problems = []
    for chunk in index["chunks"]:
        path = Path(source) / chunk["filename"]
        if not path.is_file():
            problems.append((str(path), "missing (listed in index.json)"))
        elif chunk.get("chunk_bytes") is not None and path.stat().st_size != chunk["chunk_bytes"]:
            problems.append((str(path), f"{path.stat().st_size} bytes, index.json says {chunk['chunk_bytes']}"))
    return problems


class LatentSums:
    """Per-channel count, sum and sum of squares of latents, to merge the statistics of parts written apart."""

    def __init__(self, count=0, total=None, squares=None):
        self.count = count
        self.total = None if total is None else np.asarray(total, np.float64)
        self.squares = None if squares is None else np.asarray(squares, np.float64)

    def add(self, latent) -> None:
        z = np.asarray(latent, np.float64).reshape(latent.shape[0], -1)
        if self.total is None:
            self.total, self.squares = np.zeros(z.shape[0]), np.zeros(z.shape[0])
        self.count += z.shape[1]
        self.total += z.sum(axis=1)
        self.squares += (z * z).sum(axis=1)

    def merge(self, other: "LatentSums") -> None:
        if other.total is None:
            return
        if self.total is None:
            self.total, self.squares = np.zeros_like(other.total), np.zeros_like(other.squares)
        self.count += other.count
        self.total += other.total
        self.squares += other.squares

    def to_json(self) -> dict:
        return {"count": self.count, "sum": self.total.tolist(), "sum_squares": self.squares.tolist()}

    @classmethod
    def from_json(cls, record: dict) -> "LatentSums":
        return cls(record["count"], record["sum"], record["sum_squares"])

    def mean_std(self):
        """Per-channel mean and unbiased std (at least 1e-6), as lists."""
        mean = self.total / self.count
        var = np.maximum(self.squares - self.count * mean ** 2, 0) / max(self.count - 1, 1)
        return mean.tolist(), np.maximum(np.sqrt(var), 1e-6).tolist()


def decode_image(data: bytes) -> torch.Tensor:
    """uint8 (3, H, W) RGB tensor of encoded image bytes."""
    from json_label_dataset import read_image

    return read_image(io.BytesIO(data))


class ItemDecoder:
    """Raw shard item -> (image uint8 (3, H, W) or an empty (3, 0, 0), normalised latent float32, condition)."""

    def __init__(self, condition: str, mean, std, text_emb: bool, images: bool):
        self.condition, self.text_emb, self.images = condition, text_emb, images
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, item: dict):
        try:
            image = decode_image(item["image"]) if self.images else torch.zeros(3, 0, 0, dtype=torch.uint8)
            latent = torch.from_numpy(np.asarray(item["latent"])).float()
            if not torch.isfinite(latent).all():
                raise ValueError("the latent holds NaN or infinite values")
            if self.text_emb:
                condition = torch.from_numpy(np.asarray(item["text_emb"])).float()
            else:
                condition = item[self.condition]
        except Exception as e:
            raise RuntimeError(f"shard item '{item.get('id')}' could not be read: {type(e).__name__}: {e}") from e
        return image, (latent - self.mean) / self.std, condition


class _Captions(Sequence):
    """The captions of a ShardDataset, read on demand (sample grids take the first few)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.dataset.raw_item(index)["caption"]


class ShardDataset:
    """A shard dataset for train.py: items like JsonLabelDataset's / CustomDataset's, by index or streamed.

    condition: 'caption' or 'label'. use_text_emb: items carry the cached caption embedding instead of the caption
    (True: the shards must hold 'text_emb'; None: when they hold it; False: never). need_images: the shards must
    hold images (REPA); without it stored images are not decoded (an empty (3, 0, 0) tensor stands in). Everything
    is checked against omegadit.json and, for a local folder, the chunk files' sizes, before any training.
    """

    def __init__(self, source, condition: str = "caption", use_text_emb=False, need_images: bool = True):
        import_litdata()
        self.source = str(source)
        self.meta = read_meta(self.source)
        self.condition = condition
        fix = " (pack or encode them again with it)"
        require_fields(self.meta, ["id", "latent", condition], self.source, fix)
        if use_text_emb is None:
            use_text_emb = "text_emb" in self.meta["fields"]
        if use_text_emb:
            require_fields(self.meta, ["text_emb"], self.source, " (pack with --text-emb-dir, or encode-wds with "
                                                                 "--text-encoder, to cache caption embeddings)")
        self.has_images = "image" in self.meta["fields"]
        if need_images and not self.has_images:
            raise DataFileError(f"{self.source}: the shards hold no images, which REPA needs: pack them with images "
                                f"or train with --enc-type none")
        problems = chunk_problems(self.source)
        if problems:
            from omegadit.data_checks import format_problems
            raise DataFileError(f"{self.source}: {len(problems)} chunk file(s) do not match index.json:\n"
                                + format_problems(problems))
        self.use_text_emb = use_text_emb
        self.decoder = ItemDecoder(condition, self.meta["latent_mean"], self.meta["latent_std"], use_text_emb,
                                   self.has_images and need_images)
        self.latent_mean, self.latent_std = self.decoder.mean, self.decoder.std
        self._reader = None

    @property
    def captions(self):
        return _Captions(self)

    @property
    def resolution(self) -> int:
        """Side of the stored images in pixels (0 for shards without images), whether or not items decode them."""
        return self.meta.get("image_size") or 0

    def __len__(self):
        return self.meta["num_items"]

    def raw_item(self, index: int) -> dict:
        """The stored dict of item `index` (in the order of index.json), read by random access."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self._reader is None:
            self._reader = import_litdata().StreamingDataset(self.source)
        return self._reader[index]

    def __getitem__(self, index: int):
        return self.decoder(self.raw_item(index))

    def loader(self, batch_size: int, num_workers: int, seed: int, collate_fn, pin_memory: bool = False):
        """A ShardLoader giving this process `batch_size` items per batch, shuffled by `seed` each epoch."""
        return ShardLoader(self, batch_size, num_workers, seed, collate_fn, pin_memory)


class ShardLoader:
    """Endless batches of this process's part of each epoch (LitData splits the chunks among processes and
    workers, reshuffled each epoch from the seed); state_dict() after a step and load_state_dict() on resume give
    the batches an uninterrupted run would have seen, with the same processes and --num-workers. An epoch's last
    batch is dropped when it is short, so that every step has the same batch size."""

    def __init__(self, dataset: ShardDataset, batch_size: int, num_workers: int, seed: int, collate_fn,
                 pin_memory: bool = False):
        litdata = import_litdata()
        self.source, self.batch_size, self.num_workers = dataset.source, batch_size, num_workers
        stream = litdata.StreamingDataset(dataset.source, shuffle=True, seed=seed, drop_last=True,
                                          transform=dataset.decoder)
        # Its own generator: starting an epoch then draws no number from the training's random streams.
        self.loader = litdata.StreamingDataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                                                  collate_fn=collate_fn, pin_memory=pin_memory,
                                                  generator=torch.Generator().manual_seed(seed))
        self._batches = None

    def __iter__(self):
        return self

    def __next__(self):
        for _ in range(2):  # a new epoch when this one is over
            if self._batches is None:
                self._batches = iter(self.loader)
            for batch in self._batches:
                if len(batch[1]) == self.batch_size:
                    return batch
            self._batches = None
        raise RuntimeError(f"{self.source}: an epoch gave this process no full batch of {self.batch_size} items: "
                           f"the dataset is too small for the batch size, processes and workers")

    def state_dict(self) -> dict:
        """The position after the batches returned so far (JSON-serialisable)."""
        return {"source": self.source, "num_workers": self.num_workers, "batch_size": self.batch_size,
                "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> list:
        """Continue from a state_dict(); returns log lines about what is not exact."""
        if state["source"] != self.source:
            raise ValueError(f"the checkpoint's data loader read {state['source']}, this run reads {self.source}: "
                             f"resume with the same --data-dir (LitData ties its position to the shards' location)")
        notes = []
        saved = (state["loader"]["dataset"]["world_size"], state["num_workers"], state["batch_size"])
        now = (self.loader.dataset.distributed_env.world_size, self.num_workers, self.batch_size)
        if saved != now:
            notes.append(f"processes, --num-workers and items per process {saved} -> {now}: LitData goes on with "
                         f"the items of the epoch not yet seen, in another order than an uninterrupted run")
        self.loader.load_state_dict(state["loader"])
        self._batches = None
        return notes
