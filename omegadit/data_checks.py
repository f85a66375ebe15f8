"""Checks of dataset files, each problem a (path, message) pair.

The header checks read only .npy headers and image headers, cheap enough to run whenever a dataset is built;
the content checks load every file (`python preprocessing/dataset_tools.py check`).
"""
from collections import Counter

import numpy as np
import PIL.Image

from omegadit.files import FileReadError, UnsafeFileError, load_npy, read_npy_header

FLOAT_DTYPES = frozenset(np.dtype(name) for name in ("float16", "float32", "float64"))
# Modes that json_label_dataset.to_rgb turns into RGB without losing the picture (16-bit and float ones clip).
IMAGE_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
MAX_REPORTED = 20


class DataFileError(ValueError):
    """Files of a dataset are unreadable or do not fit the rest of it."""


def format_problems(problems, limit: int = MAX_REPORTED) -> str:
    """One 'path: message' line per problem (the first `limit`, then a count of the rest)."""
    lines = [f"  {path}: {message}" for path, message in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def problem(path, error) -> tuple:
    """(path, message of `error` without a leading mention of `path`)."""
    return path, str(error).removeprefix(str(path)).lstrip(": ")


def _describe(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _odd_ones(values: dict, describe, kind: str) -> list:
    """Problems for the paths whose value differs from the most common one in `values` {path: value}."""
    if not values:
        return []
    common, count = Counter(values.values()).most_common(1)[0]
    return [(path, f"{describe(value)}, but {count} of {len(values)} {kind} have {describe(common)}")
            for path, value in values.items() if value != common]


def common_value(values):
    """The most common of `values` (the first seen among equals), or None when there are none."""
    return Counter(values).most_common(1)[0][0] if values else None


def npy_header_problems(paths, ndim: int, kind: str, squeeze_batch: bool = False):
    """(problems, {path: shape}) from the .npy headers of `paths`: a float dtype, `ndim` dims, complete data,
    and one shape for all. With squeeze_batch a leading batch dim of 1 is dropped first."""
    problems, shapes = [], {}
    for path in paths:
        try:
            shape, dtype, missing = read_npy_header(path)
        except FileReadError as e:
            problems.append(problem(path, e))
            continue
        except OSError as e:
            problems.append((path, f"cannot be read: {e.strerror or e}"))
            continue
        if squeeze_batch and len(shape) == ndim + 1 and shape[0] == 1:
            shape = shape[1:]
        if dtype not in FLOAT_DTYPES:
            problems.append((path, f"dtype {dtype}, expected float16, float32 or float64"))
        elif len(shape) != ndim:
            problems.append((path, f"shape {_describe(shape)}, expected {ndim} dimensions"))
        elif missing:
            problems.append((path, f"truncated: {missing} bytes of array data missing"))
        else:
            shapes[path] = shape
    problems += _odd_ones(shapes, lambda s: f"shape {_describe(s)}", kind)
    return problems, shapes


def image_header_problems(paths):
    """(problems, {path: (width, height)}) from the image headers of `paths` (no decoding): each opens, has a
    mode that converts to RGB, and all have one size."""
    problems, sizes = [], {}
    for path in paths:
        try:
            with PIL.Image.open(path) as img:
                size, mode, image_format = img.size, img.mode, img.format
        except PIL.UnidentifiedImageError:
            problems.append((path, "not a readable image (unknown format or corrupt header)"))
            continue
        except (OSError, SyntaxError, ValueError) as e:
            problems.append((path, f"not a readable image: {e}"))
            continue
        if mode not in IMAGE_MODES:
            problems.append((path, f"{image_format} image of mode {mode}, which does not convert to 8-bit RGB"))
        else:
            sizes[path] = size
    problems += _odd_ones(sizes, lambda s: f"size {s[0]}x{s[1]}", "images")
    return problems, sizes


def npy_content_problems(paths):
    """Problems found by loading each of `paths` fully: unreadable data, NaN or infinite values."""
    problems = []
    for path in paths:
        try:
            array = load_npy(path)
        except (FileReadError, UnsafeFileError) as e:
            problems.append(problem(path, e))
            continue
        except OSError as e:
            problems.append((path, f"cannot be read: {e.strerror or e}"))
            continue
        bad = np.count_nonzero(~np.isfinite(array))
        if bad:
            problems.append((path, f"{bad} of {array.size} values are NaN or infinite"))
    return problems


def image_content_problems(paths):
    """Problems found by decoding each image of `paths` fully."""
    problems = []
    for path in paths:
        try:
            with PIL.Image.open(path) as img:
                img.load()
        except (OSError, SyntaxError, ValueError) as e:
            problems.append((path, f"does not decode: {e}"))
    return problems
