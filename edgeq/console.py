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


def progress_shown() -> bool:
    """Progress bars are drawn on a terminal, or anywhere with EDGEQ_PROGRESS set; never into a log or a pipe."""
    return sys.stderr.isatty() or bool(os.environ.get("EDGEQ_PROGRESS"))


def quiet_converters() -> None:
    """Defaults for the CLI (a variable the user set wins; warnings and errors print either way): LiteRT's converter
    logs INFO lines on stderr ("Estimated count of arithmetic ops") only with TF_CPP_MIN_LOG_LEVEL=0, and litert-torch
    its conversion steps only with LITERT_TORCH_SHOW_PROGRESS=y: it prints them on stdout, where they broke the JSON
    of `edgeq export --format tflite --json` (stdout carries edgeq's results; its progress bars go to stderr)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")


def size_text(n: int | float, digits: int = 2) -> str:
    """A byte count in MB, as edgeq's tables give sizes, or in kB / B below a megabyte (a small CNN's 7.92 kB, not
    0.01 MB)."""
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"


def chatter_dropped() -> bool:
    """The CLI's default (`quiet_converters`), or wherever TF_CPP_MIN_LOG_LEVEL asks for less than INFO; a library
    caller who set nothing sees every line."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")


@contextlib.contextmanager
def native_chatter_dropped():
    """Run the block with file descriptor 2 in a temporary file, then write what it caught to stderr without the
    `NATIVE_CHATTER` lines. Everything else the block prints (warnings, errors, Python's own) comes out, after the
    block and in order; meant for short blocks (an import, a first interpreter) that draw no progress bar. A no-op
    when `chatter_dropped()` is false or descriptor 2 is closed."""
    if not chatter_dropped():
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(c in line for c in NATIVE_CHATTER)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
