"""Shared fixtures: one tiny model and one tiny synthetic world per test session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from common.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_world_dir(tmp_path_factory) -> Path:
    from common.tinyworld import generate

    out = tmp_path_factory.mktemp("tinyworld")
    generate(out, n_train=8, n_test=8, seed=0, frames=32, size=112, fps=8)
    return out
