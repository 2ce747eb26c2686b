"""Renderings of a quantized model (or a float model) as deployable files.

`export(source, fmt, out, variant=None, **options)` loads the source (a quantized-model directory
or a model reference for FP32), calls the registered exporter for `fmt`, and returns the metadata
it wrote to `OUT.json`. Exporters register with `@register_exporter("onnx")`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import EdgeqError, choice_error

# fmt -> (exporter, file suffix)
EXPORTERS: dict[str, tuple[Callable, str]] = {}


def register_exporter(fmt: str, suffix: str):
    def register(fn):
        EXPORTERS[fmt] = (fn, suffix)
        return fn

    return register


def _load_exporters() -> None:
    import importlib

    for module in ("onnx", "tflite"):
        try:
            importlib.import_module(f"edgeq.export.{module}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("edgeq.export"):
                continue  # that exporter is not part of this install
            raise


def export(source: str | Path, fmt: str, out: str | Path, variant: str | None = None, **options) -> dict:
    """Export `source` (QDIR or model reference) to `out`; returns the written metadata."""
    from ..quantize.qmodel import is_qdir, load_quantized
    from ..models import load_model

    _load_exporters()
    if fmt not in EXPORTERS:
        raise choice_error("format", fmt, sorted(EXPORTERS))
    fn, suffix = EXPORTERS[fmt]
    out = Path(out)
    if out.suffix != suffix:
        raise EdgeqError(f"output: {str(out)!r} should end in {suffix} for format {fmt}")
    if is_qdir(source):
        qm, bundle = load_quantized(source), None
    else:
        qm, bundle = None, load_model(str(source))
    return fn(qm=qm, bundle=bundle, source=str(source), out=out, variant=variant, **options)
