"""What edgeq, and the converters it drives, print to the terminal while they work."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

# What LiteRT's and TensorFlow's native code writes straight to file descriptor 2 at INFO level, where neither
# TF_CPP_MIN_LOG_LEVEL nor Python's logging and warnings filters reach: absl's notice before its logging is set up and
# the oneDNN line (both when litert-torch loads its converter), and XNNPACK's (the first interpreter in a process).
NATIVE_CHATTER = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.",
)
_cli = False  # set by `quiet_converters`: this process is the CLI's


def progress_shown() -> bool:
    """Progress bars are drawn on a terminal, or anywhere with EDGEQ_PROGRESS set; never into a log or a pipe."""
    return sys.stderr.isatty() or bool(os.environ.get("EDGEQ_PROGRESS"))


def quiet_converters() -> None:
    """Defaults for the CLI (a variable the user set wins; warnings and errors print either way): LiteRT's converter
    logs INFO lines on stderr ("Estimated count of arithmetic ops") only with TF_CPP_MIN_LOG_LEVEL=0, and litert-torch
    its conversion steps only with LITERT_TORCH_SHOW_PROGRESS=y: it prints them on stdout, where they broke the JSON
    of `edgeq export --format tflite --json` (stdout carries edgeq's results; its progress bars go to stderr). Native
    code's INFO lines that no variable governs are filtered in this process only (`native_chatter_dropped`)."""
    global _cli
    _cli = True
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")


def size_text(n: int | float, digits: int = 2) -> str:
    """A byte count in MB, as edgeq's tables give sizes, or in kB / B below a megabyte (a small CNN's 7.92 kB, not
    0.01 MB)."""
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"


def aligned(header: list[str], rows: list[list[str]], right: set[str] = frozenset()) -> list[str]:
    """A plain-text table: each column as wide as its widest cell (nothing cut), the columns named in `right`
    right-aligned (numbers), trailing spaces trimmed."""
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
    return [" ".join(cell.rjust(w) if h in right else cell.ljust(w) for h, cell, w in zip(header, row, widths)).rstrip()
            for row in [header, *rows]]


def chatter_dropped() -> bool:
    """In the CLI's process (`quiet_converters`, not the agent's job runners, which read LiteRT's lines, nor a library
    caller's) unless TF_CPP_MIN_LOG_LEVEL=0 asks for INFO lines."""
    return _cli and os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")


class CapturedFd2:
    """What the block wrote to file descriptor 2, where native code (C++ runtimes) logs, not to `sys.stderr`: `text`
    after the block. The block's output is held back; the caller decides what to pass on."""

    def __enter__(self) -> "CapturedFd2":
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> bool:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False


@contextlib.contextmanager
def native_chatter_dropped():
    """Run the block with descriptor 2 captured, then write what it caught to stderr without the `NATIVE_CHATTER`
    lines. Everything else the block prints (warnings, errors, Python's own) comes out, after the block and in order;
    meant for short blocks (an import, a first interpreter) that draw no progress bar. A no-op unless
    `chatter_dropped()`."""
    if not chatter_dropped():
        yield
        return
    with CapturedFd2() as caught:
        yield
    kept = [line for line in caught.text.splitlines(keepends=True) if not any(c in line for c in NATIVE_CHATTER)]
    if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()
