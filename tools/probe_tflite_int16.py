"""Probe: how much of full-integer TFLite's loss on an LM comes from its 8-bit activation grids. Not a test.

    .venv/bin/python tools/probe_tflite_int16.py --model smollm2-135m --out benchmarks/tflite_int16_probe_smollm2

One run, one QDIR of recipe w8a8-static (made here, or reused from --work), one labelled float graph:
- edgeq's `int8` variant (edgeq's int8 weights and static uint8 input grids; LiteRT requantizes every quantized
  layer's output to int8 on a grid ai-edge-quantizer calibrates);
- edgeq's `int16x8` variant (recipe w8a16-static: its own int8 weights and static int16 input grids, min/max
  calibrated by edgeq, no smoothing; outputs requantized to int16 on ai-edge-quantizer's grids), with RTN int8
  weights (the preset) and with GPTQ ones (tools/probe_tflite_w8a16-static-gptq.toml);
- the w8a8-static layers and int8 weights (edgeq's scales, read back exact) with 16-bit activations: TFLite's
  16x8 full-integer mode, input and output grids calibrated by ai-edge-quantizer (min/max over the same
  calibration inputs), not edgeq's: the probe that led to the int16x8 variant.
Quality: next-token top-1 agreement with the FP32 file over --windows evaluation windows of --seq-len tokens.
The last row is not an edgeq variant: its activation grids are not edgeq's. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_tflite import latency, make_qdir  # noqa: E402

from edgeq.export import export  # noqa: E402
from edgeq.export import tflite_quant  # noqa: E402
from edgeq.export.tflite_check import read_back  # noqa: E402
from edgeq.export.tflite_flatbuffer import read_model  # noqa: E402
from edgeq.export.tflite_graph import float_graph, layer_ops  # noqa: E402
from edgeq.export.batchnorm import rendered_scale  # noqa: E402
from edgeq.export.tflite_runtime import TfliteRunner  # noqa: E402
from edgeq.fileio import write_json_atomic, write_text_atomic  # noqa: E402


def int16_activations(qm, seq_len: int, calib: list[dict]) -> tuple[bytes, dict]:
    """edgeq's layers and int8 weights with 16-bit symmetric activations calibrated by ai-edge-quantizer."""
    from ai_edge_quantizer import quantizer

    layers, model = qm.layers(), qm.bundle.module.eval()
    buf, ops, _, _ = float_graph(qm.bundle, model, seq_len, cache_len=0)
    recipe = tflite_quant.recipe(layers, ops, static=True)
    for entry in recipe:
        entry["op_config"]["activation_tensor_config"] = {"num_bits": 16, "symmetric": True, "granularity": "TENSORWISE", "dtype": "INT"}
    qt = quantizer.Quantizer(bytearray(buf))
    qt.load_quantization_recipe(recipe)
    qsvs = dict(qt.calibrate({"serving_default": calib}, num_threads=2))
    scales = {n: rendered_scale(m) for n, m in layers.items()}
    qsvs.update(tflite_quant.weight_overrides(layer_ops(read_model(buf), layers), layers, ops, scales))
    out = bytes(qt.quantize(qsvs, enable_progress_report=False).quantized_model)
    check = read_back(out, {n: m for n, m in layers.items()}, scales)
    weights_exact = all(v["ints"] and v["scales"] for v in check["layers"].values())
    return out, {"weights_exact": weights_exact}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edgeq-bench-tflite")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20, help="latency: interleaved calls per file at 1 thread (0: none)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from edgeq.data import lm_windows
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.qmodel import load_quantized

    qdir, _ = make_qdir(args.model, "w8a8-static", work)
    qm = load_quantized(qdir)
    fp32 = work / f"{args.model}-fp32-s{args.seq_len}.tflite"
    export(args.model, "tflite", fp32, variant="fp32", seq_len=args.seq_len, cache_len=0)
    windows = lm_windows(qm.bundle.tokenizer, "enwiki", "evaluation", args.seq_len, args.windows)
    reference = TfliteRunner(fp32, threads=2)
    ref_top1 = [reference(w[None].astype(np.int64))[0][0].argmax(-1) for w in windows]

    def top1(buf_or_path) -> float:
        r = TfliteRunner(buf_or_path, threads=2)
        return float(np.mean([np.mean(r(w[None].astype(np.int64))[0][0].argmax(-1) == t) for w, t in zip(windows, ref_top1)]))

    rows = {}
    t0 = time.perf_counter()
    int8 = work / f"{args.model}-edgeq-int8-s{args.seq_len}.tflite"
    meta = export(qdir, "tflite", int8, variant="int8", seq_len=args.seq_len, cache_len=0, calib_samples=args.calib_samples)
    rows["edgeq int8 (w8a8-static: int8 activations, int8 outputs)"] = {"top1_agree_fp32": top1(int8), "exact": meta["exact"],
                                                                          "seconds": round(time.perf_counter() - t0, 1)}
    int16_files = []
    for recipe_name, label in (("w8a16-static", "w8a16-static: edgeq's int8 weights (RTN) and int16 input grids, int16 outputs"),
                               (str(ROOT / "tools" / "probe_tflite_w8a16-static-gptq.toml"), "the same with GPTQ int8 weights")):
        t0 = time.perf_counter()
        qdir16, _ = make_qdir(args.model, recipe_name, work)
        int16 = work / f"{args.model}-edgeq-int16x8-{Path(recipe_name).stem}-s{args.seq_len}.tflite"
        meta = export(qdir16, "tflite", int16, variant="int16x8", seq_len=args.seq_len, cache_len=0, calib_samples=args.calib_samples)
        rows[f"edgeq int16x8 ({label})"] = {"top1_agree_fp32": top1(int16), "exact": meta["exact"],
                                            "seconds": round(time.perf_counter() - t0, 1)}
        int16_files.append(int16)
    t0 = time.perf_counter()
    calib = [{"args_0": x[0].numpy().astype(np.int32)}
             for x in calibration_batches(qm.bundle, None, args.calib_samples, args.seq_len, batch_size=1)]
    buf, info = int16_activations(qm, args.seq_len, calib)
    aeq16 = "edgeq int8 weights, 16-bit activations (16x8, grids calibrated by ai-edge-quantizer)"
    rows[aeq16] = {"top1_agree_fp32": top1(buf), "weights_exact": info["weights_exact"], "seconds": round(time.perf_counter() - t0, 1)}
    if args.reps:
        files = dict(zip(["fp32", *rows], [fp32, int8, *int16_files, buf]))
        timed = latency(files, [windows[0][None].astype(np.int64)], threads=1, reps=args.reps)
        rows = {"fp32 (litert-torch)": {"top1_agree_fp32": 1.0, "exact": None}, **rows}
        for name, t in zip(rows, timed.values()):
            rows[name]["prefill_ms_1t"] = round(t["median_ms"], 2)
    result = {"command": " ".join([".venv/bin/python tools/probe_tflite_int16.py"] + sys.argv[1:]), "model": args.model,
              "seq_len": args.seq_len, "windows": args.windows, "calib_samples": args.calib_samples,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    out = Path(args.out)
    write_json_atomic(Path(f"{out}.json"), result)
    lines = [f"# Full-integer TFLite on {args.model}: 8-bit vs 16-bit activations (probe)", "", "```", result["command"], "```", "",
             f"Next-token top-1 agreement with the FP32 file, {args.windows} evaluation windows of {args.seq_len} tokens; "
             f"{args.calib_samples} calibration inputs. The last row is not an edgeq variant: its activation grids are "
             "ai-edge-quantizer's, not edgeq's (see the tool's docstring).", "",
             f"Latency: one {args.seq_len}-token prefill, LiteRT 1 thread (XNNPACK delegate applied; it takes no int16 ops), "
             f"files interleaved, median of {args.reps}.", "",
             "| file | top-1 vs fp32 | weights exact | prefill ms 1t |", "|---|---|---|---|"]
    for name, r in rows.items():
        ms = r.get("prefill_ms_1t")
        lines.append(f"| {name} | {r['top1_agree_fp32']:.4f} | {r.get('exact', r.get('weights_exact'))} | {'-' if ms is None else ms} |")
    write_text_atomic(Path(f"{out}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
