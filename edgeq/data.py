"""Calibration and evaluation data, all offline.

Text: `enwiki` (gensim's bundled Wikipedia test dump, cleaned), `pydoc` (CPython's pydoc topics),
or a user's text file. Images: `images` (bundled photos with crops and flips) or a user's folder.
Language-model data is split by token position: the first half of the stream feeds calibration,
the second half evaluation, so calibration and evaluation windows never overlap.
"""

from __future__ import annotations

import bz2
import os
import re
from pathlib import Path

import numpy as np

from .cache import cache_dir
from .errors import EdgeqError
from .fileio import write_text_atomic

TEXT_SOURCES = ("enwiki", "pydoc")
IMAGE_SOURCES = ("images",)
ENWIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def load_text(source: str) -> str:
    """The text of a built-in corpus or a user's UTF-8 text file."""
    if source == "enwiki":
        return _enwiki()
    if source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))
    path = Path(source)
    if not path.is_file():
        raise EdgeqError(f"data: {source!r} is not a built-in corpus ({', '.join(TEXT_SOURCES)}) or an existing text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise EdgeqError(f"data: {source!r} is not UTF-8 text") from None
    if len(text.strip()) < 100:
        raise EdgeqError(f"data: {source!r} has too little text ({len(text)} characters) to calibrate or evaluate on")
    return text


def _enwiki() -> str:
    cached = cache_dir("data") / "enwiki.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = Path(os.path.dirname(gensim.__file__), "test", "test_data", ENWIKI_DUMP)
    if not dump.is_file():
        raise EdgeqError(f"data: enwiki needs gensim's test data ({dump} is missing; pip install gensim==4.4.0)")
    texts = []
    for _, text, _ in extract_pages(bz2.BZ2File(dump)):
        if text.lower().lstrip().startswith("#redirect"):
            continue
        clean = re.sub(r"'{2,}", "", filter_wiki(text))
        clean = re.sub(r"\n{3,}", "\n\n", clean).strip()
        if len(clean) > 500:
            texts.append(clean)
    out = "\n\n".join(texts)
    write_text_atomic(cached, out)
    return out


def token_stream(tokenizer, source: str) -> np.ndarray:
    """All token ids of a text source, cached per tokenizer for built-in corpora."""
    from .models.tokenizers import encode

    return np.asarray(encode(tokenizer, load_text(source)), dtype=np.int64)


def lm_windows(tokenizer, source: str, split: str, seq_len: int, count: int, seed: int = 0) -> np.ndarray:
    """Token windows [count, seq_len] from the calibration or evaluation half of a text.

    Evaluation windows are contiguous from the start of the second half (deterministic);
    calibration windows are drawn with `seed` from the first half.
    """
    if split not in ("calibration", "evaluation"):
        raise EdgeqError(f"split: {split!r} is not calibration or evaluation")
    ids = token_stream(tokenizer, source)
    half = len(ids) // 2
    region = ids[:half] if split == "calibration" else ids[half:]
    available = len(region) // seq_len
    if available < 1:
        raise EdgeqError(f"data: {source!r} has {len(region)} tokens in its {split} half, fewer than one window of {seq_len}")
    if split == "evaluation":
        count = min(count, available)
        return region[: count * seq_len].reshape(count, seq_len)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(region) - seq_len + 1, size=count)
    return np.stack([region[s : s + seq_len] for s in starts])


def sentences(source: str = "enwiki", count: int = 64, split: str = "evaluation", min_chars: int = 40) -> list[str]:
    """Sentences for encoder evaluation and calibration, from the given half of a corpus."""
    text = load_text(source)
    half = len(text) // 2
    region = text[:half] if split == "calibration" else text[half:]
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", region)]
    out = [s for s in parts if min_chars <= len(s) <= 400][:count]
    if not out:
        raise EdgeqError(f"data: no sentences found in {source!r}")
    return out


def npy_rows(source: str, split: str, count: int, shape: tuple[int | None, ...] | None = None,
             floating: bool = True) -> np.ndarray:
    """Up to `count` rows of a .npy array of model-ready inputs (never unpickled), from the given half: calibration
    reads the first half of the rows, evaluation the second, so they never overlap. `shape`: each row's (None: any
    size on that axis); `floating`: float rows (returned as float32), else integer ones."""
    try:
        arr = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty or truncated file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EdgeqError(f"data: cannot read {source!r} as a .npy array ({reason})") from None
    kind = np.floating if floating else np.integer
    fits = shape is None or arr.ndim == len(shape) + 1 and all(w in (None, n) for w, n in zip(shape, arr.shape[1:]))
    if not np.issubdtype(arr.dtype, kind) or not fits:
        want = f"[N, {', '.join('?' if n is None else str(n) for n in shape)}]" if shape is not None else "rows"
        raise EdgeqError(f"data: {source!r} holds {arr.dtype} {list(arr.shape)}; this model takes "
                         f"{'float' if floating else 'integer'} {want} (rows as the model takes them)")
    half = len(arr) // 2
    if half == 0:
        raise EdgeqError(f"data: {source!r} holds {len(arr)} row(s); calibration reads the first half and evaluation "
                         "the second, so it needs at least 2")
    rows = (arr[:half] if split == "calibration" else arr[half:])[:count]
    return np.ascontiguousarray(rows, dtype=np.float32 if floating else None)


def images(source: str = "images", count: int = 32, size: int = 224, split: str = "evaluation",
           mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """Float images [count, 3, size, size], normalised; bundled photos with crops and flips, or a folder."""
    photos = _bundled_photos() if source == "images" else _folder_photos(source)
    rng = np.random.default_rng(0 if split == "evaluation" else 1)
    out = []
    while len(out) < count:
        photo = photos[len(out) % len(photos)]
        h, w = photo.shape[:2]
        crop = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        patch = photo[y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        out.append(_resize(patch, size))
    arr = np.stack(out).astype(np.float32) / 255.0
    return ((arr - mean) / std).transpose(0, 3, 1, 2).copy()


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).convert("RGB").resize((size, size), Image.BILINEAR))


def _bundled_photos() -> list[np.ndarray]:
    from PIL import Image

    folder = Path(__file__).parent / "data"
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.jpg"))]
    if not photos:
        raise EdgeqError(f"data: no bundled photos in {folder}")
    return photos


def _folder_photos(source: str) -> list[np.ndarray]:
    from PIL import Image

    folder = Path(source)
    if not folder.is_dir():
        raise EdgeqError(f"data: {source!r} is not a built-in source ({', '.join(TEXT_SOURCES + IMAGE_SOURCES)}) or an image folder")
    photos = []
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"):
            try:
                photos.append(np.asarray(Image.open(p).convert("RGB")))
            except OSError:
                raise EdgeqError(f"data: {p} is not a readable image") from None
    if not photos:
        raise EdgeqError(f"data: image folder {source!r} has no .jpg/.png images")
    return photos
