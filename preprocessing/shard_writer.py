"""Writing shard datasets (omegadit/shards.py) part by part, so that an interrupted run redoes only unfinished parts.

A part is written with LitData's BinaryWriter into <out>/.tmp/<part>/, its chunk files are moved to
<out>/chunk-<part>-<n>.bin, and <out>/parts/<part>.json records its chunks, item count, fields and latent sums.
`finalize` merges the records into LitData's index.json and writes omegadit.json.
"""
import json
import os
import shutil
from pathlib import Path

from omegadit.shards import FORMAT, INDEX_FILE, META_FILE, LatentSums, import_litdata
from utils import write_json

PARTS_DIR = "parts"
TMP_DIR = ".tmp"
DEFAULT_CHUNK_BYTES = "64MB"


def part_record_path(out_dir, part: str) -> Path:
    return Path(out_dir) / PARTS_DIR / f"{part}.json"


def part_done(out_dir, part: str) -> bool:
    """Whether part `part` of `out_dir` was written completely (an interrupted part has no record)."""
    return part_record_path(out_dir, part).is_file()


def item_properties(item: dict) -> dict:
    """What every item of one dataset shares: the shapes of its arrays."""
    return {f"{key}_shape": list(item[key].shape) for key in ("latent", "text_emb") if key in item}


def write_part(out_dir, part: str, items, chunk_bytes=DEFAULT_CHUNK_BYTES) -> dict:
    """Write the dicts of the iterable `items` as part `part` of the shard dataset `out_dir`; returns its record
    (every item must have the fields and item_properties of the first)."""
    import_litdata()
    from litdata.streaming.writer import BinaryWriter

    out_dir = Path(out_dir)
    tmp = out_dir / TMP_DIR / part
    shutil.rmtree(tmp, ignore_errors=True)
    writer = BinaryWriter(str(tmp), chunk_bytes=chunk_bytes)
    sums, count, fields, properties = LatentSums(), 0, None, None
    for item in items:
        if fields is None:
            fields, properties = sorted(item), item_properties(item)
        elif sorted(item) != fields:
            raise ValueError(f"part {part}: item '{item['id']}' has the fields {sorted(item)}, the first one {fields}")
        elif item_properties(item) != properties:
            raise ValueError(f"part {part}: item '{item['id']}' has {item_properties(item)}, the first one "
                             f"{properties}")
        writer.add_item(count, item)
        sums.add(item["latent"])
        count += 1
    chunks, config = [], None
    if count:
        writer.done()
        index = json.loads((tmp / f"{writer.rank}.{INDEX_FILE}").read_text())
        config = index["config"]
        for number, chunk in enumerate(index["chunks"]):
            name = f"chunk-{part}-{number}.bin"
            os.replace(tmp / chunk["filename"], out_dir / name)
            chunks.append({**chunk, "filename": name})
    record = {"part": part, "num_items": count, "fields": fields or [], "properties": properties or {},
              "chunks": chunks, "config": config, "latent_sums": sums.to_json() if count else None}
    path = part_record_path(out_dir, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    shutil.rmtree(tmp, ignore_errors=True)
    return record


def finalize(out_dir, extra_meta: dict) -> dict:
    """Merge every part record of `out_dir` into index.json and write omegadit.json; returns the description.

    Parts whose fields, shapes or LitData configs differ are refused, naming them.
    """
    out_dir = Path(out_dir)
    records = [json.loads(p.read_text()) for p in sorted((out_dir / PARTS_DIR).glob("*.json"))]
    records = [r for r in records if r["num_items"]]
    if not records:
        raise ValueError(f"{out_dir}: no items were written")
    first = records[0]
    sums, chunks = LatentSums(), []
    for record in records:
        for key in ("fields", "properties"):
            if record[key] != first[key]:
                raise ValueError(f"{out_dir}: part {record['part']} has {key} {record[key]}, part {first['part']} "
                                 f"{first[key]}; one dataset holds items of one kind")
        if record["config"]["data_format"] != first["config"]["data_format"]:
            raise ValueError(f"{out_dir}: part {record['part']} was stored as {record['config']['data_format']}, "
                             f"part {first['part']} as {first['config']['data_format']}")
        sums.merge(LatentSums.from_json(record["latent_sums"]))
        chunks.extend(record["chunks"])
    mean, std = sums.mean_std()
    meta = {"format": FORMAT, "fields": first["fields"], "num_items": sum(r["num_items"] for r in records),
            "latent_mean": mean, "latent_std": std, **first["properties"], **extra_meta}
    write_json(out_dir / INDEX_FILE, {"chunks": chunks, "config": first["config"]})
    write_json(out_dir / META_FILE, meta)
    shutil.rmtree(out_dir / TMP_DIR, ignore_errors=True)
    return meta


def check_settings(path: Path, settings: dict) -> None:
    """Record the settings of a run in `path`; a rerun into the same folder with other settings would mix two kinds
    of items: refused."""
    path = Path(path)
    if path.is_file():
        held = json.loads(path.read_text())
        if held != settings:
            raise ValueError(f"{path.parent} holds items written with {held}; this run would write them with "
                             f"{settings}: use another output folder or the same settings")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)
