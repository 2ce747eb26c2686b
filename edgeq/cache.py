"""Where edgeq caches things it can rebuild (dequantized model copies, trained toy models, cleaned text)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """`$EDGEQ_CACHE` or the user cache dir, plus `parts`; created on demand."""
    root = os.environ.get("EDGEQ_CACHE")
    if not root:
        import platformdirs

        root = platformdirs.user_cache_dir("edgeq")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
