"""Probe: how fast LiteRT's XNNPACK runs a one-token (M = 1) FULLY_CONNECTED by weight format, on this host. Not a test.

    .venv/bin/python tools/probe_tflite_int4_kernels.py --out benchmarks/tflite_int4_kernels

A decode step is a chain of matrix-vector products, so its speed is how fast the runtime's kernel for each weight
format streams the weights. One graph of --layers float Linear(--width, --width) layers in a chain (converted once
with litert-torch), quantized by ai-edge-quantizer into each format LiteRT's hybrid kernels take (int8 per channel;
int4 per channel; int4 blocks of 32, 64, 128, 256: activations quantized per row at run time); the weights are
random, so only the format matters, not whose integers they are. Each file runs one [1, width] input in LiteRT with
XNNPACK, at 1 and 2 threads, all files interleaved round-robin, median of --reps after warm-up. GB/s is the file's
size over the median time: how fast each format's kernel streams its weights, which bounds a decode step's time
from below (weights of the format / its rate). Writes OUT.json and OUT.md (command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_tflite import interleaved, log  # noqa: E402
from hostinfo import machine, write_result  # noqa: E402

from edgeq.export.tflite_runtime import TfliteRunner, runtime_version  # noqa: E402
from edgeq.fileio import atomic_path, write_bytes_atomic  # noqa: E402

FORMATS = {  # name -> (bits, ai-edge-quantizer granularity)
    "int8 per channel": (8, "CHANNELWISE"),
    "int4 per channel": (4, "CHANNELWISE"),
    "int4 blocks of 32": (4, "BLOCKWISE_32"),
    "int4 blocks of 64": (4, "BLOCKWISE_64"),
    "int4 blocks of 128": (4, "BLOCKWISE_128"),
    "int4 blocks of 256": (4, "BLOCKWISE_256"),
}


def float_file(path: Path, width: int, layers: int) -> None:
    import litert_torch
    import torch

    torch.manual_seed(0)
    chain = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(layers))).eval()
    with atomic_path(path) as tmp:
        litert_torch.convert(chain, (torch.zeros(1, width),)).export(str(tmp))


def quantized_file(fp32: Path, bits: int, granularity: str, out: Path) -> None:
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe([{
        "regex": ".*", "operation": "FULLY_CONNECTED", "algorithm_key": "min_max_uniform_quantize",
        "op_config": {"weight_tensor_config": {"num_bits": bits, "symmetric": True, "granularity": granularity, "dtype": "INT"},
                      "compute_precision": "INTEGER", "explicit_dequantize": False}}])
    write_bytes_atomic(out, bytes(qt.quantize(None, enable_progress_report=False).quantized_model))


def latency(files: dict[str, Path], width: int, threads: int, reps: int) -> dict[str, dict]:
    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    return interleaved({n: functools.partial(TfliteRunner(p, threads=threads), x) for n, p in files.items()}, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-probe-int4-kernels")
    ap.add_argument("--width", type=int, default=1536, help="input and output width of each layer (a multiple of 256)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_tflite_int4_kernels.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = {"fp32": work / f"fp32-{args.width}x{args.layers}.tflite"}
    log("fp32 chain: litert-torch conversion")
    float_file(files["fp32"], args.width, args.layers)
    for name, (bits, granularity) in FORMATS.items():
        log(name)
        files[name] = work / f"{granularity.lower()}-{bits}-{args.width}x{args.layers}.tflite"
        quantized_file(files["fp32"], bits, granularity, files[name])
    rows = {n: {"size_mb": round(p.stat().st_size / 1e6, 3)} for n, p in files.items()}
    for threads in (1, 2):
        log(f"latency, {threads} thread(s)")
        for n, lat in latency(files, args.width, threads, args.reps).items():
            rows[n][f"ms_{threads}t"] = round(lat["median_ms"], 4)
            rows[n][f"gb_s_{threads}t"] = round(rows[n]["size_mb"] / lat["median_ms"], 3)
    for r in rows.values():
        for t in (1, 2):
            r[f"speedup_vs_fp32_{t}t"] = round(rows["fp32"][f"ms_{t}t"] / r[f"ms_{t}t"], 3)
    result = {"command": command, "width": args.width, "layers": args.layers, "reps": args.reps,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(),
              "runtime": runtime_version(), "rows": rows}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    w, n = result["width"], result["layers"]
    lines = ["# One-token FULLY_CONNECTED in LiteRT/XNNPACK by weight format (probe)", "", "```", result["command"], "```", "",
             f"Created {result['created']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, shared), "
             f"{result['runtime']}. A chain of {n} Linear({w}, {w}) layers, one [1, {w}] input, XNNPACK; the files "
             f"interleaved, median of {result['reps']} calls. Quantized by ai-edge-quantizer (random weights: the format "
             "is what is measured). GB/s: file size over time.", "",
             "| weights | size MB | ms 1 thread | GB/s 1t | x fp32 1t | ms 2 threads | GB/s 2t | x fp32 2t |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['size_mb']} | {r['ms_1t']:.3f} | {r['gb_s_1t']:.2f} | {r['speedup_vs_fp32_1t']:.2f} | "
                     f"{r['ms_2t']:.3f} | {r['gb_s_2t']:.2f} | {r['speedup_vs_fp32_2t']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
