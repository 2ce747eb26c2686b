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
DECODE_GRAPH = ".decode.onnx"  # an ONNX decoder LM export's one-token step: FILE.decode.onnx beside FILE.onnx


def decode_graph_name(out: Path) -> str:
    return f"{Path(out).stem}{DECODE_GRAPH}"


def companions(out: str | Path, fmt: str) -> list[Path]:
    """The files an export to `out` may write beside it: FILE.json, and for ONNX the decode graph and external data."""
    out = Path(out)
    names = [f"{out.name}.json"]
    if fmt == "onnx":
        names += [decode_graph_name(out), f"{out.name}.data", f"{decode_graph_name(out)}.data"]
    return [out.with_name(n) for n in names]


def prefill_of(path: Path) -> Path | None:
    """FILE.onnx, the prefill graph of an export's FILE.decode.onnx; None for any other name."""
    path = Path(path)
    return path.with_name(path.name[: -len(DECODE_GRAPH)] + ".onnx") if path.name.endswith(DECODE_GRAPH) else None


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


def export(source: str | Path, fmt: str, out: str | Path, variant: str | None = None, target: str | None = None,
           allow_fallback: bool = False, **options) -> dict:
    """Export `source` (QDIR or model reference) to `out`; returns the written metadata.

    With `target`, the recipe is checked against the board profile before converting and the
    written graph after; an unsupported op (or a fallback without `allow_fallback`) raises
    EdgeqError naming the nearest recipe that works, and no file is left behind. What was
    checked, and any allowed fallback, is recorded in FILE.json under `target` / `fallbacks`.
    """
    from ..quantize.qmodel import is_qdir, load_quantized
    from ..models import load_model

    _load_exporters()
    if fmt not in EXPORTERS:
        raise choice_error("format", fmt, sorted(EXPORTERS))
    fn, suffix = EXPORTERS[fmt]
    out = Path(out)
    if out.suffix != suffix:
        raise EdgeqError(f"output: {str(out)!r} should end in {suffix} for format {fmt}")
    if target:
        from ..targets import gate_export

        if fmt == "onnx" and "optimize" not in options and not _takes_int32_bias(target):
            options["optimize"] = False  # TensorRT: float biases, the graph as rendered (export_onnx's `optimize`)
        if is_qdir(source) and variant != "fp32":  # an fp32 file has no quantized layers: only the written file is gated
            level = options.get("accuracy_level", 0)  # None: not pinned, ONNX Runtime's default (4)
            gate_export(str(source), target, allow_fallback=allow_fallback, fmt=fmt,
                        accuracy_level=4 if level is None else level)
    if is_qdir(source):
        qm, bundle = load_quantized(source), None
    else:
        qm, bundle = None, load_model(str(source))
    meta = fn(qm=qm, bundle=bundle, source=str(source), out=out, variant=variant, **options)
    if target:
        meta = _gate_written(out, fmt, target, allow_fallback, meta)
    return meta


def _takes_int32_bias(target: str) -> bool:
    """Whether the target's ONNX runtime runs a static layer's int32 bias behind a DequantizeLinear, which edgeq's
    optimized ONNX export writes (TensorRT's parser refuses it)."""
    from ..targets import load_profile
    from ..targets.uses import OpUse

    bias = OpUse(op="DequantizeLinear", act="none", weight="int32", granularity="channel", node="bias")
    return load_profile(target).classify(bias, fmt="onnx").support != "unsupported"


def _gate_written(out: Path, fmt: str, target: str, allow_fallback: bool, meta: dict) -> dict:
    """Check the file as written; remove it (and its companions) if the board cannot run it."""
    from ..fileio import write_json_atomic
    from ..targets import gate_export

    meta_path = Path(str(out) + ".json")
    try:
        gate = gate_export(str(out), target, allow_fallback=allow_fallback, fmt=fmt)
    except Exception:
        for f in [out, meta_path] + [out.parent / c["name"] for c in meta.get("files", [])]:
            f.unlink(missing_ok=True)
        for extra in (meta.get("graph") or {}).values():
            if isinstance(extra, str) and extra != out.name:
                (out.parent / extra).unlink(missing_ok=True)
                Path(str(out.parent / extra) + ".json").unlink(missing_ok=True)
        raise
    meta.update(gate.to_metadata())
    write_json_atomic(meta_path, meta)
    return meta
