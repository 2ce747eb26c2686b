"""Benchmark: one-token decode steps of TFLite files (the `decode` signature), edgeq vs ai-edge-quantizer. Not a test.

    .venv/bin/python tools/bench_tflite_decode.py --model smollm2-135m --out benchmarks/tflite_decode_smollm2

One run, the same cache length for every file:
- fp32: `edgeq export MODEL --format tflite` (litert-torch; prefill + decode signatures).
- edgeq: the QDIRs of recipes w8 (dynamic-int8), w4-g64-litert and w4-g64-litert-emb4 (int4), made here with
  the presets' calibration (or reused from --work, as bench_tflite.py makes them), exported with their decode signature.
- ai-edge-quantizer: `dynamic_wi8_afp32` and `dynamic_wi4b32_afp32` applied to the fp32 file (both signatures).
- With --fused: fp32 and each edgeq file also exported with `fuse=True` (CLI --fuse: a layer's query/key/value and gate/up
  projections one FULLY_CONNECTED each, `edgeq.export.tflite_fuse`), each paired with its unfused twin per process.
Quality of the decode signature: each file's next-token top-1 agreement with the fp32 file's decode signature over
--tokens steps of an evaluation window, fed token by token from empty caches, and (edgeq files) the export's own
`parity.decode` against the PyTorch simulation. Latency: one decode step at position cache_len / 2 (every step
attends over all cache_len slots, masked: the position does not change the work) with the caches that window
left, in LiteRT with XNNPACK at 1 and 2 threads, files interleaved round-robin, median of --reps after 3 warm-up
calls. A step is what a generation loop pays with the caches kept in the interpreter's input buffers
(`tflite_runtime.DecodeSession`): set the token and position, invoke, read the logits, write the token's key and
value rows into the cache buffers in place. The signature returns only those rows, so no cache is copied.
With --slots N ...: the same step with each file's session holding N cache slots (the slot count is the runtime's
choice: `tflite_decode.dynamic_slots`), at position N / 2, as a loop that grows its cache with the context would
run its early tokens. Writes OUT.json and OUT.md (command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_tflite import fresh_process_rounds, interleaved, log, make_qdir  # noqa: E402
from hostinfo import machine, write_result  # noqa: E402

from edgeq.export import export  # noqa: E402
from edgeq.export.tflite_runtime import DecodeSession  # noqa: E402

EDGEQ = {"w8": "dynamic-int8", "w4-g64-litert": "int4", "w4-g64-litert-emb4": "int4"}
AEQ = ("dynamic_wi8_afp32", "dynamic_wi4b32_afp32")


def aeq_quantize(fp32: Path, recipe_name: str, out: Path) -> float:
    from ai_edge_quantizer import quantizer, recipe

    t0 = time.perf_counter()
    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(getattr(recipe, recipe_name)())
    out.write_bytes(bytes(qt.quantize(None, enable_progress_report=False).quantized_model))
    return time.perf_counter() - t0


def latency(files: dict[str, Path], pos: int, ids: np.ndarray, threads: int, reps: int, slots: int | None = None) -> dict[str, dict]:
    """One decode step at slot `pos` after real caches of the first `pos` tokens, as a generation loop runs it:
    the caches stay in the interpreter's buffers, the step's new key/value rows are written in place
    (DecodeSession, holding `slots` cache slots: default the file's declared count); each timed call sets the token,
    position and mask, invokes, reads the logits and writes the rows. Files are loaded in the order given."""
    calls = {}
    for n, p in files.items():
        session = DecodeSession(p, threads=threads, slots=slots)
        session.reset()
        for i in range(pos):  # real caches for the timed step
            session.step(int(ids[0, i]), i)
        calls[n] = functools.partial(session.step, int(ids[0, pos]), pos)
    return interleaved(calls, reps)


def latency_rounds(files: dict[str, Path], pos: int, ids: np.ndarray, threads: int, reps: int, rounds: int,
                   slots: int | None = None) -> dict[str, dict]:
    """`latency` in `rounds` fresh processes with the load order rotated (`fresh_process_rounds`; within one process
    the fp32 file measured 48-51 ms loaded first against 45-46 ms loaded last), and per file the median of the
    processes' medians, each kept in `rounds_ms`."""
    per_round = fresh_process_rounds(latency, lambda order: ({n: files[n] for n in order}, pos, ids, threads, reps, slots),
                                     list(files), rounds)
    out = {}
    for n in files:
        medians = [res[n]["median_ms"] for res in per_round]
        out[n] = {"median_ms": statistics.median(medians), "rounds_ms": [round(m, 3) for m in medians],
                  "n": per_round[0][n]["n"], "rounds": rounds}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-bench-tflite", help="QDIRs and .tflite files")
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps compared with the fp32 file")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per thread count, the load order rotated")
    ap.add_argument("--recipes", nargs="+", default=list(EDGEQ), choices=list(EDGEQ))
    ap.add_argument("--fused", action="store_true",
                    help="also time fp32 and the edgeq files exported with --fuse (q/k/v and gate/up one FULLY_CONNECTED each)")
    ap.add_argument("--slots", type=int, nargs="*", default=[],
                    help="also time each file's step holding this many cache slots (the slot count is the runtime's choice), at slots / 2")
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/bench_tflite_decode.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from edgeq.data import lm_windows
    from edgeq.models import load_model

    bundle = load_model(args.model)
    ids = lm_windows(bundle.tokenizer, "enwiki", "evaluation", args.cache_len, 1)[:1].astype(np.int64)
    rows: dict[str, dict] = {}
    files: dict[str, Path] = {}
    fp32 = work / f"{args.model}-fp32-decode.tflite"
    log("fp32: litert-torch conversion (prefill + decode)")
    fusions = (False, True) if args.fused else (False,)
    for fuse in fusions:
        path = work / f"{args.model}-fp32-decode-fused.tflite" if fuse else fp32
        meta = export(args.model, "tflite", path, variant="fp32", cache_len=args.cache_len, fuse=fuse)
        files["fp32 fused" if fuse else "fp32"] = path
        rows["fp32 fused" if fuse else "fp32"] = {"tool": "litert-torch", "variant": "fp32", "fused": fuse,
                                                  "convert_s": meta["timing_s"]["convert"], "parity_decode": meta["parity"]["decode"]}
    for recipe_name in args.recipes:
        variant = EDGEQ[recipe_name]
        qdir, _ = make_qdir(args.model, recipe_name, work)
        for fuse in fusions:
            name = f"edgeq {variant} ({recipe_name})" + (" fused" if fuse else "")
            log(name)
            path = work / f"{args.model}-edgeq-{recipe_name}-decode{'-fused' if fuse else ''}.tflite"
            meta = export(qdir, "tflite", path, variant=variant, cache_len=args.cache_len, fuse=fuse)
            files[name] = path
            rows[name] = {"tool": "edgeq", "variant": variant, "recipe": recipe_name, "fused": fuse, "exact": meta["exact"],
                          "convert_s": meta["timing_s"]["convert"], "quantize_s": meta["timing_s"]["quantize"],
                          "parity_decode": meta["parity"]["decode"]}
    for recipe_name in AEQ:
        name = f"aeq {recipe_name}"
        log(name)
        path = work / f"{args.model}-aeq-{recipe_name}-decode.tflite"
        files[name] = path
        rows[name] = {"tool": "ai-edge-quantizer", "variant": recipe_name, "quantize_s": round(aeq_quantize(fp32, recipe_name, path), 2)}

    log(f"decode quality: {args.tokens} steps against the fp32 file")
    n = min(args.tokens, ids.shape[1])
    ref = None
    for name, path in files.items():
        session = DecodeSession(path, threads=2)
        session.reset()
        top1 = np.array([session.step(int(ids[0, i]), i).argmax() for i in range(n)])
        ref = top1 if ref is None else ref
        rows[name]["size_mb"] = round(path.stat().st_size / 1e6, 2)
        rows[name]["decode_top1_agree_fp32"] = float(np.mean(top1 == ref))
        rows[name]["file"] = str(path)
    for threads in (1, 2):
        log(f"latency, {threads} thread(s), {args.rounds} rounds of {args.reps} reps interleaved over {len(files)} files")
        for name, lat in latency_rounds(files, args.cache_len // 2, ids, threads, args.reps, args.rounds).items():
            rows[name][f"decode_{threads}t"] = lat
        for slots in args.slots:
            log(f"latency, {threads} thread(s), {slots} slots held")
            for name, lat in latency_rounds(files, slots // 2, ids, threads, args.reps, args.rounds, slots).items():
                rows[name].setdefault("by_slots", {})[f"{slots}_{threads}t"] = lat
    result = {"command": command, "model": args.model, "cache_len": args.cache_len, "slots": args.slots, "tokens": n,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(),
              "rows": rows, "targets": targets(rows)}
    write_result(args.out, result, markdown(result))


def targets(rows: dict) -> dict:
    """INT4 against fp32 at the declared cache slots (the target's measure), and at each --slots count held; a fused
    file (--fused) against the fused fp32 file."""
    out = {}
    for name, r in rows.items():
        if r["tool"] == "edgeq" and r["variant"] == "int4":
            fp32, tag = (rows["fp32 fused"], f"{r['recipe']}, fused") if r.get("fused") else (rows["fp32"], r["recipe"])
            for t in (1, 2):
                speedup = fp32[f"decode_{t}t"]["median_ms"] / r[f"decode_{t}t"]["median_ms"]
                out[f"int4_decode_speedup_vs_fp32_{t}t ({tag})"] = {"value": round(speedup, 2), "target": ">= 5", "met": speedup >= 5}
                for key, lat in (r.get("by_slots") or {}).items():
                    if key.endswith(f"_{t}t"):
                        speedup = fp32["by_slots"][key]["median_ms"] / lat["median_ms"]
                        out[f"int4_decode_speedup_vs_fp32_{t}t_{key.split('_')[0]}_slots ({tag})"] = {
                            "value": round(speedup, 2), "target": ">= 5", "met": speedup >= 5}
    return out


def markdown(result: dict) -> str:
    first = next(iter(result["rows"].values()))
    lines = [f"# TFLite decode step on {result['model']}: edgeq vs ai-edge-quantizer", "", "```", result["command"], "```", "",
             f"Created {result['created']} on {result['machine'].get('cpu', '?')} ({result['machine']['cores']} cores, shared). One decode step (the `decode` signature, "
             f"{result['cache_len']} cache slots, caches kept in the interpreter's buffers, the step's key/value rows written in place: tflite_runtime.DecodeSession) in LiteRT with XNNPACK: in each of "
             f"{first['decode_1t'].get('rounds', 1)} fresh processes (load order rotated) the median of {first['decode_1t']['n']} "
             "interleaved calls after warm-up; the table gives the median over processes, the spread lists each process's "
             "median. Top-1: "
             f"{result['tokens']} decode steps of an evaluation window from empty caches against the fp32 file's.", "",
             "| file | exact | decode top1 vs fp32 | parity.decode cos_min (vs simulation) | size MB | ms 1 thread | ms 2 threads | 1 thread per process | 2 threads per process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        par = r.get("parity_decode") or {}
        lines.append(f"| {name} | {r.get('exact', '-')} | {r['decode_top1_agree_fp32']:.4f} | "
                     f"{par.get('cos_min', float('nan')):.6f} | {r['size_mb']} | {r['decode_1t']['median_ms']:.2f} | "
                     f"{r['decode_2t']['median_ms']:.2f} | {spread(r['decode_1t'])} | {spread(r['decode_2t'])} |")
    if result.get("slots"):
        keys = [f"{n}_{t}t" for n in result["slots"] for t in (1, 2)]
        lines += ["", "The same step holding fewer cache slots (DecodeSession(slots=N): the slot count is the runtime's choice), "
                      "at position N / 2, ms (median over processes):", "",
                  "| file | " + " | ".join(f"{k.split('_')[0]} slots, {k.split('_')[1][0]} thread(s)" for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for name, r in result["rows"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r['by_slots'][k]['median_ms']:.2f}" for k in keys) + " |")
    pairs = [(name, name.removesuffix(" fused")) for name, r in result["rows"].items() if r.get("fused")]
    if pairs:
        lines += ["", "Fused over unfused step time, paired within each process (the median of the processes' ratios; "
                      "how many processes ran the fused file faster):", "",
                  "| file | " + " | ".join(paired_keys(result)) + " |", "|---|" + "---|" * len(paired_keys(result))]
        for fused, plain in pairs:
            cells = []
            for key in paired_keys(result).values():
                a, b = lat_of(result["rows"][fused], key), lat_of(result["rows"][plain], key)
                ratios = [x / y for x, y in zip(a["rounds_ms"], b["rounds_ms"])]
                cells.append(f"{statistics.median(ratios):.3f} ({sum(x < 1 for x in ratios)} of {len(ratios)})")
            lines.append(f"| {plain} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""] + [f"- {k}: {json.dumps(v)}" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def paired_keys(result: dict) -> dict[str, str]:
    """Column label -> where a row keeps that latency (`decode_1t`, or `by_slots:64_1t` for a --slots count)."""
    out = {f"{result['cache_len']} slots, {t} thread(s)": f"decode_{t}t" for t in (1, 2)}
    out.update({f"{n} slots, {t} thread(s)": f"by_slots:{n}_{t}t" for n in result.get("slots") or [] for t in (1, 2)})
    return out


def lat_of(row: dict, key: str) -> dict:
    return row["by_slots"][key.removeprefix("by_slots:")] if key.startswith("by_slots:") else row[key]


def spread(lat: dict) -> str:
    return " / ".join(f"{m:.2f}" for m in lat.get("rounds_ms", []))


if __name__ == "__main__":
    main()
