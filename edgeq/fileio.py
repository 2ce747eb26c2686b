"""Atomic file and directory writes and content hashes.

Nothing edgeq writes may ever be seen half-written: every file goes to a temporary name in the
same directory and is renamed into place; directories are built under a temporary name and
renamed at the end, and an existing target is only replaced once the new one is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgeqError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError that names no file (a write of a full disk through a file object: "File too large") names `path`,
    so its one-line message says which output failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with naming(path):
            yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def save_tensors(tensors: dict, path: str | os.PathLike) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are, which the CLI reports
    in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:  # "... I/O error: File too large (os error 27)", "IoError(Os { code: 28, ... })"
        code = re.search(r"(?:os error |Os \{ code: )(\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    os.chmod(path, 0o666 & ~current_umask())  # safetensors creates its files 0600; give them ordinary permissions


class UnreadableJSON(EdgeqError, ValueError):
    """A damaged JSON file (truncated, not UTF-8): one line naming it; a ValueError to callers that tolerate it."""


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        raise UnreadableJSON(f"{path}: not readable JSON ({exc})") from None


@contextlib.contextmanager
def damaged_fields(what: str, advice: str) -> Iterator[None]:
    """Reading fields of a JSON file edgeq wrote: a field missing or of the wrong type (the file was edited or
    damaged) is one line naming `what`, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise EdgeqError(f"{what} is damaged ({type(exc).__name__}: {exc}); {advice}") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; move it to `path` only when the block succeeds.

    An existing `path` is kept until the new directory is complete, then swapped out; without
    `overwrite` an existing non-empty `path` is an error raised before any work is done.
    """
    path = Path(os.path.abspath(path))  # `.` names the directory itself
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise EdgeqError(f"output: {path} already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
