"""Export SmolLM2-135M to ONNX (fp32, w8 dynamic, w8a8 static, w4-g128-rtn) and time a 64-token prefill.

Compares edgeq's dynamic-int8 file with ONNX Runtime's own `quantize_dynamic` run on edgeq's fp32
file (MatMul only, per-channel int8 weights: the same layers edgeq quantizes), one thread,
interleaved, median of N after warm-up. Writes benchmarks/onnx_smollm2.json and .md.

    .venv/bin/python tools/check_onnx_latency.py --work /tmp/edgeq-onnx-bench
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _latency(runners: dict, ids: np.ndarray, repeats: int, warmup: int) -> dict:
    for r in runners.values():
        for _ in range(warmup):
            r(ids)
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, r in runners.items():  # interleaved, so load from other jobs hits every file alike
            t = time.perf_counter()
            r(ids)
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3)} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default="/tmp/edgeq-onnx-bench", help="where the exported files go")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "onnx_smollm2"))
    ap.add_argument("--recipes", default="w8,w4-g128-rtn,w8a8")
    ap.add_argument("--decode", action="store_true", help="also export the KV-cache decode graphs")
    ap.add_argument("--reuse-fp32", action="store_true", help="keep WORK/fp32.onnx from an earlier run (its export takes longest)")
    ap.add_argument("--int8-weights", default="uint8", choices=("uint8", "int8"))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgeq.export.onnx import export_onnx
    from edgeq.export.onnx_runtime import OnnxRunner
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, files = [], {}

    def run_export(name, qm, bundle, quantize_s):
        out = work / f"{name}.onnx"
        t = time.perf_counter()
        meta = export_onnx(qm=qm, bundle=bundle, source=args.model, out=out, decode=args.decode,
                           int8_weights=args.int8_weights)
        export_s = time.perf_counter() - t
        files[name] = out
        rows.append({"tool": "edgeq", "variant": meta["variant"], "recipe": name, "quantize_s": round(quantize_s, 1),
                     "export_s": round(export_s, 1), "size_bytes": meta["size_bytes"], "exact": meta["exact"],
                     "parity": {k: meta["parity"].get(k) for k in ("max_abs", "cos_min", "top1_agree", "decode_vs_prefill_max_abs")},
                     "external_data": meta["external_data"], "int8_weights": meta.get("int8_weights"), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024})
        print(json.dumps(rows[-1]), flush=True)

    fp32_meta = work / "fp32.onnx.json"
    if args.reuse_fp32 and fp32_meta.is_file():
        meta = json.loads(fp32_meta.read_text())
        files["fp32"] = work / "fp32.onnx"
        rows.append({"tool": "edgeq", "variant": "fp32", "recipe": "fp32", "quantize_s": 0.0, "export_s": meta["export_s"],
                     "size_bytes": meta["size_bytes"], "exact": None, "external_data": meta["external_data"],
                     "parity": {k: meta["parity"].get(k) for k in ("max_abs", "cos_min", "top1_agree", "decode_vs_prefill_max_abs")},
                     "note": "from an earlier run of this script (--reuse-fp32)"})
    else:
        run_export("fp32", None, load_model(args.model), 0.0)
    for name in [r for r in args.recipes.split(",") if r]:
        bundle = load_model(args.model)
        recipe = load_recipe(name)
        t = time.perf_counter()
        calib = calibration_batches(bundle, "enwiki", 8, 512) if recipe.needs_calibration else None
        qm = quantize_model(bundle, recipe, calib)
        run_export(name, qm, bundle, time.perf_counter() - t)
        del qm, bundle

    # ONNX Runtime's own dynamic quantization of the same fp32 file, restricted to the layers edgeq quantizes
    ort_path = work / "ort_quantize_dynamic.onnx"
    t = time.perf_counter()
    quantize_dynamic(str(files["fp32"]), str(ort_path), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)
    ort_s = time.perf_counter() - t
    size = ort_path.stat().st_size + sum(p.stat().st_size for p in work.glob("ort_quantize_dynamic.onnx*.data"))
    rows.append({"tool": "onnxruntime", "variant": "quantize_dynamic (MatMul, per-channel QInt8)", "recipe": None,
                 "quantize_s": round(ort_s, 1), "export_s": None, "size_bytes": size})
    files["ort_quantize_dynamic"] = ort_path

    ids = np.asarray(load_model(args.model).tokenizer("The history of the city begins in the Middle Ages, when " * 8)["input_ids"][: args.tokens])[None]
    assert ids.shape[1] == args.tokens, ids.shape
    runners = {k: OnnxRunner(p, threads=1) for k, p in files.items()}
    lat = _latency(runners, ids, args.repeats, warmup=3)
    for row in rows:
        key = row["recipe"] or "ort_quantize_dynamic"
        if row["tool"] == "edgeq" and row["variant"] == "fp32":
            key = "fp32"
        row["prefill_64_ms_1thread"] = lat[key]["median_ms"]
    ours = lat["w8"]["median_ms"] if "w8" in lat else None
    theirs = lat["ort_quantize_dynamic"]["median_ms"]
    result = {"command": " ".join(["tools/check_onnx_latency.py", *sys.argv[1:]]), "model": args.model, "threads": 1,
              "tokens": args.tokens, "repeats": args.repeats, "rows": rows,
              "dynamic_int8_vs_ort_quantize_dynamic": round(ours / theirs, 4) if ours else None,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ONNX export of {args.model}: sizes, export time, {args.tokens}-token prefill latency (1 thread)", "",
             f"Command: `.venv/bin/python {result['command']}`  ", f"Created {result['created']}; median of {args.repeats} interleaved runs after 3 warm-ups.", "",
             "| tool | variant | recipe | quantize s | export s | size MB | exact | parity max_abs / cos_min / top1 | prefill ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("parity") or {}
        par = f"{p['max_abs']:.3g} / {p['cos_min']:.6f} / {p['top1_agree']:.3f}" if p else "-"
        lines.append(f"| {r['tool']} | {r['variant']} | {r['recipe'] or '-'} | {r['quantize_s']} | {r['export_s'] if r['export_s'] is not None else '-'} | "
                     f"{r['size_bytes'] / 1e6:.1f} | {r.get('exact', '-')} | {par} | {r['prefill_64_ms_1thread']} |")
    lines += ["", f"edgeq dynamic-int8 / ORT quantize_dynamic latency ratio: {result['dynamic_int8_vs_ort_quantize_dynamic']}",
              "", "The machine has 2 cores shared with other jobs; latencies are indicative, ratios from interleaved runs are the comparison."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
