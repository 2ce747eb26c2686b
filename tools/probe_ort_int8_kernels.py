"""Probe: ONNX Runtime's INT8 kernels for an LM, quantize_dynamic vs MatMulNBits with 8-bit weights. Not a test.

    .venv/bin/python tools/probe_ort_int8_kernels.py --model smollm2-135m --out benchmarks/ort_int8_kernels_probe_smollm2

One run on edgeq's FP32 ONNX export (prefill + KV-cache decode graphs), every file made from it by ONNX Runtime's
own quantizers: quantize_dynamic (per channel, uint8 weights: the file that computes correctly on AVX2 hosts
without VNNI) and MatMulNBitsQuantizer with bits=8, symmetric, accuracy_level=4 (its int8 compute path: MLAS
quantizes each row of the activations to int8 per block of the weight's block size) at blocks of 32 and 128.
Quality: perplexity on --windows enwiki evaluation windows of 512 tokens. Latency: bench_ptq's interleaved
64-token prefill and 1-token decode step (median of --reps after warm-up) at 1 and 2 threads.
This probes which ONNX Runtime kernel edgeq's INT8 rendering should target; none of these files is edgeq's.
Caveat: no ORT pre-processing here, so quantize_dynamic leaves the tied LM head float and its file is slow;
tools/bench_ptq.py (pre-processed, head quantized) is the comparison that counts.
Writes OUT.json and OUT.md.
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

from bench_ptq import latency, session  # noqa: E402

from edgeq.fileio import write_json_atomic, write_text_atomic  # noqa: E402


def make(work: Path, name: str, build) -> dict:
    """Both graphs of `name`, built from the FP32 pair by `build(src, dst)` unless already in `work`."""
    files = {}
    for role, stem in (("file", "fp32"), ("decode_file", "fp32.decode")):
        dst = work / f"{name}{'' if role == 'file' else '.decode'}.onnx"
        if not dst.exists():
            build(str(work / f"{stem}.onnx"), dst)
        files[role] = str(dst)
    return files


def dynamic_u8(src: str, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, str(dst), per_channel=True, weight_type=QuantType.QUInt8, use_external_data_format=True)


def matmul_nbits(block: int):
    def build(src: str, dst: Path) -> None:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb

        q = mnb.MatMulNBitsQuantizer(onnx.load(src), bits=8, block_size=block, is_symmetric=True, accuracy_level=4)
        q.process()
        onnx.save_model(q.model.model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{dst.name}.data")
    return build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/edgeq-probe-ort-int8")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from edgeq.data import lm_windows
    from edgeq.evaluate import perplexity
    from edgeq.export import export
    from edgeq.models import load_model

    if not (work / "fp32.onnx").exists():
        export(args.model, "onnx", work / "fp32.onnx", variant="fp32")
    rows = {"fp32 (edgeq export)": {"file": str(work / "fp32.onnx"), "decode_file": str(work / "fp32.decode.onnx")},
            "ORT quantize_dynamic u8": make(work, "ort-dyn-u8", dynamic_u8),
            "ORT MatMulNBits 8-bit block 32, accuracy_level 4": make(work, "mnb8-b32-acc4", matmul_nbits(32)),
            "ORT MatMulNBits 8-bit block 128, accuracy_level 4": make(work, "mnb8-b128-acc4", matmul_nbits(128))}
    bundle = load_model(args.model)
    windows = lm_windows(bundle.tokenizer, "enwiki", "evaluation", 512, args.windows)
    for row in rows.values():
        s = session(row["file"], 2, {})
        name = s.get_inputs()[0].name
        row["ppl"] = perplexity(lambda x: s.run([s.get_outputs()[0].name], {name: x})[0], windows)["ppl"]
    prompt = windows[:1, :64].astype(np.int64)
    for threads in (1, 2):
        for key, lat in latency(rows, list(rows), prompt, threads, args.reps, 3).items():
            if not key.startswith("_"):
                rows[key][f"{threads}t"] = {"prefill_ms": lat["prefill_ms"], "decode_ms": lat["decode_ms"], "n": lat["n"]}
    base = rows["ORT quantize_dynamic u8"]
    result = {"command": " ".join([".venv/bin/python tools/probe_ort_int8_kernels.py"] + sys.argv[1:]), "model": args.model,
              "windows": args.windows, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    write_json_atomic(Path(f"{args.out}.json"), result)
    lines = [f"# ONNX Runtime INT8 kernels on {args.model} (probe)", "", "```", result["command"], "```", "",
             f"Perplexity on {args.windows} x 512 enwiki evaluation windows; latency: 64-token prefill / 1-token decode, "
             f"interleaved, median of {args.reps}; ratios against quantize_dynamic u8 in the same run. None of these "
             "files is edgeq's: the probe asks which kernel edgeq's INT8 rendering should target.", "",
             "| file | ppl | prefill 1t ms | decode 1t ms | prefill 2t ms | decode 2t ms | ratio 1t (prefill / decode) | ratio 2t |",
             "|---|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        ratio = [f"{r[t]['prefill_ms'] / base[t]['prefill_ms']:.2f} / {r[t]['decode_ms'] / base[t]['decode_ms']:.2f}" for t in ("1t", "2t")]
        lines.append(f"| {key} | {r['ppl']:.3f} | {r['1t']['prefill_ms']:.1f} | {r['1t']['decode_ms']:.1f} | "
                     f"{r['2t']['prefill_ms']:.1f} | {r['2t']['decode_ms']:.1f} | {ratio[0]} | {ratio[1]} |")
    write_text_atomic(Path(f"{args.out}.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
