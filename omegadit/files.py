"""Loading files with errors a user can act on: every message names the file.

`load_torch` never runs code from a pickle: a checkpoint that needs more than tensors and plain containers is
refused with UnsafeFileError. A missing file raises FileNotFoundError; a file that is corrupt, truncated or in
another format raises FileReadError (a ValueError).
"""
import functools
import io
import json
import math
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format

NPY_HEADER_READERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
NPY_LENGTH_BYTES = {(1, 0): 2, (2, 0): 4}


class FileReadError(ValueError):
    """A file is corrupt, truncated or not in the expected format."""


class UnsafeFileError(RuntimeError):
    """A pickle would import globals (run code) to load."""


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def _offending_global(message: str):
    """The 'module.name' that torch's weights-only unpickler refused, when its message says."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None


def load_torch(path):
    """torch.load(path, map_location='cpu', weights_only=True), refusing pickles that would run code."""
    path = Path(path)
    _require_file(path, "file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise FileReadError(f"{path}: not a readable torch file: {str(e).splitlines()[0]}") from None
        offending = _offending_global(str(e))
        detail = f" (offending global: {offending})" if offending else ""
        raise UnsafeFileError(
            f"refusing to load code from {path}: it holds pickled Python objects beyond tensors{detail} and cannot "
            f"be loaded safely. If you trust its source, re-save only its tensors, e.g. "
            f"torch.save({{'state_dict': ckpt['state_dict']}}, 'clean.pt').") from None
    except (RuntimeError, EOFError) as e:
        raise FileReadError(f"{path}: not a readable torch file (corrupt or truncated?): "
                            f"{str(e).splitlines()[0]}") from e


def load_safetensors(path) -> dict:
    """{name: tensor} of a .safetensors file on the CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    _require_file(path, "safetensors file")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for any malformed file
        raise FileReadError(f"{path}: not a readable safetensors file (corrupt, truncated or another format): "
                            f"{e}") from e


def _position(text: str, index: int) -> str:
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line} column {column}"


def _find_undecodable(value, where: str = ""):
    """JSON path ('[2]["en"]') of the first key or string holding undecodable bytes (as surrogates), or None."""
    if isinstance(value, str):
        return where if re.search("[\ud800-\udfff]", value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        step = f"[{json.dumps(key)}]" if isinstance(key, str) else f"[{key}]"
        if isinstance(key, str) and _find_undecodable(key) is not None:
            return where + step
        found = _find_undecodable(item, where + step)
        if found is not None:
            return found
    return None


def _undecodable_error(data: bytes, name, error: UnicodeDecodeError) -> FileReadError:
    text = data.decode("utf-8", "surrogateescape")
    message = f"{name}: not valid UTF-8: byte 0x{data[error.start]:02x} at {_position(text, error.start)}"
    try:
        entry = _find_undecodable(json.loads(text))
    except ValueError:
        entry = None
    if entry:
        message += f", in entry {entry}"
    return FileReadError(message + "; re-save the file as UTF-8")


def parse_json(data: bytes, name):
    """The JSON value of `data` (bytes of the file `name`), decoded strictly as UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _undecodable_error(data, name, e) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileReadError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_json(path):
    """The JSON value of a UTF-8 file; errors name the file (and the line and column)."""
    path = Path(path)
    _require_file(path, "JSON file")
    return parse_json(path.read_bytes(), path)


@functools.lru_cache(maxsize=64)
def _parse_npy_header(version: tuple, header: bytes):
    """(shape, dtype) of a raw .npy header (its length field included); the files of a dataset share a few."""
    shape, _, dtype = NPY_HEADER_READERS[version](io.BytesIO(header))
    return shape, dtype


def read_npy_header(path):
    """(shape, dtype, data bytes missing from the end) of a .npy file, reading only its header."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version not in NPY_HEADER_READERS:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            length_field = f.read(NPY_LENGTH_BYTES[version])
            shape, dtype = _parse_npy_header(version, length_field + f.read(int.from_bytes(length_field, "little")))
            data_start = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (ValueError, EOFError) as e:
        raise FileReadError(f"{path}: not a readable .npy header: {e}") from None
    expected = 0 if dtype.hasobject else math.prod(shape) * dtype.itemsize
    return shape, dtype, max(0, data_start + expected - size)


def load_npy(path) -> np.ndarray:
    """The array of a .npy file (never unpickling object arrays)."""
    path = Path(path)
    _require_file(path, ".npy file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UnsafeFileError(f"refusing to load code from {path}: it holds pickled Python objects, "
                                  f"not a numeric array") from None
        raise FileReadError(f"{path}: not a readable .npy file (corrupt or truncated?): {e}") from None
