"""Probe: an INT4 embedding table in ONNX, packed (GatherBlockQuantized + the tied head's MatMulNBits) against one
DequantizeLinear of the whole table on every run (edgeq's rendering before 2026-12-04). Not a test.

    .venv/bin/python tools/probe_onnx_packed_table.py --out benchmarks/onnx_packed_table_smollm2

One run: the QDIR of recipe w4-g64-litert-emb4 (INT4 table in blocks of 32, its tied head on it) exported twice,
as edgeq exports it now and with the packed rendering switched off (`onnx_quant.onnx_packed_table` patched to say
no); w4-g64-litert (a float table and head) beside them. One decode step (the `.decode.onnx` graph, --past cached
positions, batch 1) in ONNX Runtime: the files interleaved, median of --reps calls after warm-up, at 1 and 2
threads. The two renderings' logits on one evaluation window, and each file's parity against the simulation from
its FILE.json. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_tflite import make_qdir  # noqa: E402
from hostinfo import machine, md_table, write_result  # noqa: E402

from edgeq.export import export  # noqa: E402
from edgeq.export import onnx_quant  # noqa: E402
from edgeq.export.onnx_runtime import OnnxRunner  # noqa: E402


def decode_ms(files: dict[str, Path], past: int, threads: int, reps: int) -> dict[str, float]:
    """Median ms of one decode step per file, the files interleaved."""
    runners = {}
    for name, path in files.items():
        step = OnnxRunner(path, threads=threads).decode_runner()
        inputs = step.session.get_inputs()
        caches = [np.random.default_rng(0).standard_normal([past if d == "past_sequence" else d for d in i.shape])
                  .astype(np.float32) for i in inputs[1:]]
        runners[name] = (step, [np.array([[5]], dtype=np.int64), *caches])
    times = {name: [] for name in files}
    for _ in range(3):
        for step, feed in runners.values():
            step(*feed)
    for _ in range(reps):
        for name, (step, feed) in runners.items():
            t0 = time.perf_counter()
            step(*feed)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edgeq-bench-onnx-table")
    ap.add_argument("--past", type=int, default=128, help="cached positions the decode step attends to")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    emb4, _ = make_qdir(args.model, "w4-g64-litert-emb4", work)
    float_table, _ = make_qdir(args.model, "w4-g64-litert", work)
    files = {"packed": work / "emb4-packed.onnx", "dequantized table": work / "emb4-dq.onnx",
             "float table (w4-g64-litert)": work / "float-table.onnx"}
    metas = {}
    for name, path in files.items():
        for f in path.parent.glob(f"{path.stem}*"):
            f.unlink()
        if name == "dequantized table":
            packed = onnx_quant.onnx_packed_table
            onnx_quant.onnx_packed_table = lambda *a: False
            try:
                metas[name] = export(emb4, "onnx", path)
            finally:
                onnx_quant.onnx_packed_table = packed
        else:
            metas[name] = export(float_table if name.startswith("float") else emb4, "onnx", path)

    from edgeq.data import lm_windows
    from edgeq.models import load_model

    window = lm_windows(load_model(args.model).tokenizer, "enwiki", "evaluation", 512, 1)[0][None].astype(np.int64)
    logits = {name: OnnxRunner(files[name], threads=2)(window)[0] for name in ("packed", "dequantized table")}
    rows = {}
    for name, path in files.items():
        meta = metas[name]
        embed = next((e for e in meta["layers"] if e["layer"] == "model.embed_tokens" and e["graph"] == "prefill"), None)
        size = sum(p.stat().st_size for p in path.parent.glob(f"{path.stem}*") if p.suffix in (".onnx", ".data"))
        rows[name] = {"table_op": embed["op"] if embed else "Gather (float)", "exact": meta["exact"],
                      "size_mb": round(size / 1e6, 2), "runtime_min": meta["runtime_min"]["onnxruntime"],
                      "parity_cos_min": round(meta["parity"]["cos_min"], 6), "parity_top1": meta["parity"]["top1_agree"]}
    for threads in (1, 2):
        for name, ms in decode_ms(files, args.past, threads, args.reps).items():
            rows[name][f"decode_ms_{threads}t"] = ms
    diff = float(np.abs(logits["packed"] - logits["dequantized table"]).max())
    result = {"command": " ".join([".venv/bin/python tools/probe_onnx_packed_table.py"] + sys.argv[1:]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "model": args.model,
              "past": args.past, "reps": args.reps, "packed_vs_dequantized_max_abs": diff, "rows": rows}
    m = result["machine"]
    lines = [f"# An INT4 embedding table in ONNX on {args.model}: packed against dequantized on every run (probe)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']} on {m['cpu']} ({m['cores']} cores; {', '.join(m['isa'])}). One decode step "
             f"({args.past} cached positions, batch 1) in ONNX Runtime, the files interleaved, median of {args.reps} calls. "
             "Both emb4 files hold the same integers (read back exact); their logits on one evaluation window of 512 "
             f"tokens differ by at most {diff:.2e}. Parity: each file's FILE.json against the simulation.", ""]
    lines += md_table(["file", "table op", "exact", "size MB", "ORT at least", "parity cos_min", "parity top-1", "decode ms 1t",
                       "decode ms 2t"],
                      [[name, r["table_op"], r["exact"], r["size_mb"], r["runtime_min"], r["parity_cos_min"],
                        f"{r['parity_top1']:.4f}", r["decode_ms_1t"], r["decode_ms_2t"]] for name, r in rows.items()])
    write_result(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
