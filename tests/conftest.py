"""Shared test helpers: repository on sys.path, reference fixtures, small threads."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

FIXTURES_DIR = Path(os.environ.get("OMEGADIT_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))

torch.set_num_threads(min(2, torch.get_num_threads()))


def fixture_path(name: str) -> Path:
    """Path of a reference fixture; fails under CI=true and skips elsewhere when it is missing."""
    path = FIXTURES_DIR / name
    if not path.exists():
        message = f"reference fixture {path} is missing (set OMEGADIT_FIXTURES or check out ../shared/fixtures)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
