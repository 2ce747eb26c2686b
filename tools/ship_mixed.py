"""Ship the >= 80%-smaller SmolLM2 mixed-precision model: QDIR -> ONNX -> perplexity in ONNX Runtime.

The mixed-precision benchmark (tools/bench_mixed.py) found its >= 80% point with the tied
embedding rounded to int8 in the simulation only. This runs the same configuration through the
real pipeline (a quantized-model directory holding the int8 table once, shared by the tied head;
the ONNX file rendered from it; its perplexity measured in ONNX Runtime on the same 16 x 512
evaluation windows) and writes OUT.json / OUT.md.

    .venv/bin/python tools/ship_mixed.py --out benchmarks/mixed/ship_80
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgeq import data
from edgeq.evaluate import perplexity
from edgeq.export import export
from edgeq.export.onnx_runtime import OnnxRunner
from edgeq.fileio import write_json_atomic, write_text_atomic
from edgeq.models import load_model
from edgeq.models.inputs import calibration_batches
from edgeq.quantize.mixed import MixedOptions, auto_quantize




def onnx_ppl(path: Path, windows: np.ndarray) -> float:
    runner = OnnxRunner(path, threads=2)
    return perplexity(lambda ids: runner(ids)[0], windows)["ppl"]


def sim_ppl(model, windows: np.ndarray) -> float:
    with torch.no_grad():
        return perplexity(lambda ids: model(torch.from_numpy(ids)).logits.numpy(), windows)["ppl"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="benchmarks/mixed/ship_80")
    ap.add_argument("--work", default="/tmp/edgeq-ship-mixed")
    ap.add_argument("--budget", default="20%")
    ap.add_argument("--bits", default="2,3,4,5,6,8")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bundle = load_model(args.model)
    windows = data.lm_windows(bundle.tokenizer, "enwiki", "evaluation", args.seq_len, args.eval_windows)
    calib = calibration_batches(bundle, "enwiki", args.calib_windows, args.seq_len, batch_size=1)
    options = MixedOptions(symmetric=False, measure="model", embedding_bits=8)  # bench_mixed.py's formats
    bits = [int(b) for b in args.bits.split(",")]
    qm = auto_quantize(bundle, None, args.budget, calib, bits, options)
    quantize_s = time.time() - t0
    qdir = qm.save(work / "qdir", overwrite=True)
    summary = qm.summary()
    ppl_sim = sim_ppl(qm.model, windows)
    t1 = time.time()
    out = work / "mixed80.onnx"
    for old in work.glob("mixed80*"):
        old.unlink()
    meta = export(qdir, "onnx", out)
    export_s = time.time() - t1
    fp32 = work / "fp32.onnx"
    if not fp32.is_file():
        export(args.model, "onnx", fp32, decode=False)
    result = {
        "command": " ".join([".venv/bin/python tools/ship_mixed.py"] + sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model,
        "budget": args.budget, "bits": bits, "embedding": "int8 per row, tied head shares it",
        "eval": f"enwiki evaluation half, {args.eval_windows} x {args.seq_len} tokens (bench_mixed.py's windows)",
        "calibration": f"enwiki calibration half, {args.calib_windows} x {args.seq_len} tokens",
        "bytes_before": summary["bytes_before"], "bytes_after": summary["bytes_after"],
        "size_reduction": summary["size_reduction"],
        "bits_used": sorted({e["weight"]["bits"] for e in summary["layers"]}),
        "fold_norms": qm.recipe.fold_norms,
        "ppl_fp32_onnx": onnx_ppl(fp32, windows),
        "ppl_sim": ppl_sim,
        "ppl_onnx": onnx_ppl(out, windows),
        "onnx": {"exact": meta["exact"], "size_bytes": meta["size_bytes"], "files": [out.name] + [f["name"] for f in meta["files"]],
                 "parity": {k: meta["parity"][k] for k in ("max_abs", "cos_min", "top1_agree")}},
        "quantize_s": round(quantize_s, 1), "export_s": round(export_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["ppl_delta_vs_fp32"] = result["ppl_onnx"] / result["ppl_fp32_onnx"] - 1
    result["target_80pct_within_6pct"] = bool(result["size_reduction"] >= 0.80 and result["ppl_delta_vs_fp32"] <= 0.06)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stem.with_suffix(".json"), result)
    md = [f"# {args.model} mixed precision at {args.budget} of fp32, shipped as ONNX", "",
          f"Command: `{result['command']}` ({result['created']})", "",
          "| | value |", "|---|---|"]
    for k in ("budget", "bits", "embedding", "eval", "calibration", "bytes_before", "bytes_after", "size_reduction", "bits_used",
              "fold_norms", "ppl_fp32_onnx", "ppl_sim", "ppl_onnx", "ppl_delta_vs_fp32", "target_80pct_within_6pct", "quantize_s", "export_s",
              "peak_rss_mb"):
        md.append(f"| {k} | {result[k]} |")
    md.append(f"| onnx | {json.dumps(result['onnx'])} |")
    md += ["", "ONNX size counts the prefill graph, the decode graph and the external data they share (5- and 6-bit "
           "values in int8 containers); bytes_after is the quantized model (quant.json accounting: integers, scales, zero points, float tensors)."]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(md) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
