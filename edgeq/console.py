"""What edgeq, and the converters it drives, print to the terminal while they work."""

from __future__ import annotations

import os
import sys


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
