"""Shared fixtures: the seeded toy LM and a tiny CNN factory (tests/factories.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # tests/factories.py is a `module:factory` target
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama_ref() -> str:
    """The built-in toy LM (trained once, then cached), warmed up once per session."""
    from edgeq.models import load_model

    load_model("tiny-llama")
    return "tiny-llama"
