"""The main job end to end on built-in defaults (`make demo` / `edgeq demo`).

Quantize the bundled LM to INT8 and INT4, export every variant to ONNX and TFLite, evaluate the
exported files in their runtimes, profile them on a local agent, store everything in a results
database and write the report. Each step is the same library call the CLI commands make.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .console import size_text

# (name, recipe or None for FP32, ONNX variant, TFLite variant or None)
# w8a8 quantizes the FC2 input per token at run time, which full-integer TFLite cannot express
# (its int8 variant needs static activations everywhere: recipe w8a8-static, SmolLM2 +6% with SmoothQuant 0.8).
VARIANTS = (
    ("fp32", None, "fp32", "fp32"),
    ("w8", "w8", "dynamic-int8", "dynamic-int8"),
    ("w8a8", "w8a8", "int8", None),
    ("w4-g64", "w4-g64", "weight-only", None),  # full-range INT4 (16 levels): ONNX Runtime's grid
    ("w4-litert", "w4-g64-litert", None, "int4"),  # LiteRT's absmax/7 grid; SmolLM2 widths (576) need blocks of 64
)


@dataclass
class DemoRow:
    variant: str
    fmt: str
    path: str
    size_mb: float
    exact: bool | None
    top1_parity: float | None
    ppl: float | None = None
    p50_ms: float | None = None
    decode_ms: float | None = None  # one token: ONNX's FILE.decode.onnx, TFLite's `decode` signature
    decode_path: str | None = None
    status: str = ""
    notes: list = field(default_factory=list)


def run_demo(model: str, out: Path, formats=("onnx", "tflite"), eval_windows: int = 8, calib_samples: int = 16,
             runs: int = 50, seq_len: int = 128, say: Callable[[str], None] = print, progress=None) -> tuple[list[DemoRow], Path]:
    from .agent.host import profile_local, summary_table
    from .evaluate import evaluate
    from .export import export
    from .models import load_model
    from .models.inputs import calibration_batches
    from .quantize.ptq import quantize_model
    from .recipe import load_recipe
    from .report import write_report
    from .store import record_eval_result

    out.mkdir(parents=True, exist_ok=True)
    db = out / "results.sqlite"
    rows: list[DemoRow] = []
    tflite_options = None
    for name, recipe_name, onnx_variant, tflite_variant in VARIANTS:
        source = model
        if recipe_name:
            qdir = out / f"{name}.q"
            if not (qdir / "quant.json").is_file():
                start = time.perf_counter()
                recipe = load_recipe(recipe_name)
                bundle = load_model(model)
                batches = None
                if recipe.needs_calibration:
                    recipe = recipe.calibrated(calib_samples)
                    batches = calibration_batches(bundle, None, calib_samples, recipe.calibration.seq_len)
                quantize_model(bundle, recipe, batches, progress=progress).save(qdir, overwrite=True)
                say(f"quantized {model} with {recipe_name} in {time.perf_counter() - start:.0f} s -> {qdir}")
            source = str(qdir)
        for fmt, variant in (("onnx", onnx_variant), ("tflite", tflite_variant)):
            if fmt not in formats or variant is None:
                continue
            path = out / f"{name}.{fmt}"
            start = time.perf_counter()
            if fmt == "tflite" and tflite_options is None:
                tflite_options = _tflite_options(model, seq_len)
            options = tflite_options if fmt == "tflite" else {}
            meta = export(source, fmt, path, variant=variant, **options)
            parity = meta.get("parity") or {}
            top1 = parity.get("top1_agree")
            say(f"exported {path.name} ({size_text(meta['size_bytes'], 1)}, exact={meta['exact']}, "
                f"top1 parity {'n/a' if top1 is None else f'{top1:.4f}'}) in {time.perf_counter() - start:.0f} s")
            result = evaluate(str(path), count=eval_windows, seq_len=seq_len)
            record_eval_result(db, result)
            rows.append(DemoRow(name, fmt, str(path), meta["size_bytes"] / 1e6, meta["exact"], parity.get("top1_agree"),
                                ppl=result["metrics"].get("ppl"), decode_path=_decode_file(path, meta)))
            say(f"evaluated {path.name}: ppl {result['metrics'].get('ppl'):.3f} on {eval_windows} windows of {seq_len} tokens")
    # one sequence length everywhere: TFLite graphs are fixed-length, and latencies should compare
    summaries = profile_local([r.path for r in rows], db=db, runs=runs, dims={"sequence": seq_len})
    # one decode step after seq_len tokens: ONNX's decode graph with seq_len past positions, TFLite's decode
    # signature holding seq_len cache slots of the 2 * seq_len it declares (the slot count is the runtime's choice)
    onnx_steps = [r.decode_path for r in rows if r.decode_path and r.fmt == "onnx"]
    tflite_steps = [r.decode_path for r in rows if r.decode_path and r.fmt == "tflite"]
    decode = (profile_local(onnx_steps, db=db, runs=runs, dims={"sequence": seq_len}) if onnx_steps else []) + (
        profile_local(tflite_steps, db=db, runs=runs, signature="decode", dims={"slots": seq_len}) if tflite_steps else [])
    say(summary_table(summaries + decode))
    for r in rows:
        r.p50_ms, r.status = _p50(summaries, r.path), next((s["status"] for s in summaries if s["artifact"] == r.path), "")
        r.decode_ms = _p50(decode, r.decode_path) if r.decode_path else None
    report = write_report(db, out / "report.html")
    return rows, report


def _tflite_options(model: str, seq_len: int) -> dict:
    """TFLite graphs have a fixed length, and a decode signature a cache of fixed size: 2 * seq_len slots,
    so the step its FILE.json names (the middle slot) comes after seq_len tokens, as the ONNX step's does."""
    from .export.tflite_decode import unsupported_reason
    from .models import load_model

    bundle = load_model(model)
    decodes = bundle.kind == "causal-lm" and unsupported_reason(bundle.module, 2 * seq_len) is None
    return {"seq_len": seq_len, "cache_len": 2 * seq_len if decodes else 0}


def _decode_file(path: Path, meta: dict) -> str | None:
    """The file a decode step is timed from: FILE.decode.onnx beside an ONNX prefill graph, the TFLite file
    itself when it has a `decode` signature; None for models without one."""
    decode = (meta.get("graph") or {}).get("decode")  # ONNX: the decode graph's file name; TFLite: the signature
    if not decode:
        return None
    if meta.get("format") == "tflite":
        return str(path)
    return str(path.with_name(decode)) if path.with_name(decode).is_file() else None


def _p50(summaries: list[dict], path: str) -> float | None:
    s = next((s for s in summaries if s["artifact"] == path), {})
    return ((s.get("result") or {}).get("latency_ms") or {}).get("p50")


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[DemoRow]) -> str:
    fp32 = {r.fmt: r for r in rows if r.variant == "fp32"}
    lines = [f"{'variant':<9} {'format':<7} {'size MB':>8} {'reduction':>9} {'ppl':>8} {'Δppl':>7} {'exact':>6} "
             f"{'parity top1':>11} {'p50 ms':>8} {'speedup':>7} {'decode ms':>9} {'status':<8}"]
    for r in rows:
        base = fp32.get(r.fmt)
        red = f"{100 * (1 - r.size_mb / base.size_mb):.0f}%" if base else "-"
        dppl = f"{100 * (r.ppl / base.ppl - 1):+.1f}%" if base and r.ppl and base.ppl else "-"
        speed = f"{base.p50_ms / r.p50_ms:.2f}x" if base and base.p50_ms and r.p50_ms else "-"
        lines.append(f"{r.variant:<9} {r.fmt:<7} {r.size_mb:>8.1f} {red:>9} {_num(r.ppl, '.3f'):>8} {dppl:>7} "
                     f"{_num(r.exact, ''):>6} {_num(r.top1_parity, '.4f'):>11} "
                     f"{_num(r.p50_ms, '.2f'):>8} {speed:>7} {_num(r.decode_ms, '.2f'):>9} {r.status:<8}")
    return "\n".join(lines)
