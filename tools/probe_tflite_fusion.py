"""Probe: does fusing the linear layers that read one input speed up a TFLite decode step? Not a test.

    .venv/bin/python tools/probe_tflite_fusion.py --out benchmarks/tflite_fusion_smollm2_zen4

SmolLM2-135M's `decode` signature (edgeq's tflite_decode.KVDecode, 30 blocks) converted twice with litert-torch from
the float model: with the Hugging Face layers as they are (7 FULLY_CONNECTED per block) and with q/k/v and gate/up
each one Linear of their weights stacked by output row, every member computing its rows of it (litert-torch merges
the identical calls into one op: 3 FULLY_CONNECTED per block). Each file as fp32 and with every FULLY_CONNECTED
quantized by ai-edge-quantizer to INT4 blockwise (blocks of 64, dynamic int8 activations, the format of edgeq's
w4-g64-litert; ai-edge-quantizer's grids on both, so only the graph differs). First the logits of a few steps, fused
against unfused. Then one step at position slots / 2 with the caches kept in the interpreter's buffers
(tflite_runtime.DecodeSession), at 1 and 2 threads: in each of --rounds fresh processes (load order rotated) the
median of --reps interleaved calls; the table gives the median over processes. Writes OUT.json and OUT.md (command
at the top). Never imported by edgeq. Its exports fuse the same layers only with `--fuse` (`edgeq.export.tflite_fuse`:
the quantized file's own ops stacked after the read-back names each layer; tools/bench_tflite_decode.py --fused times it).
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

from bench_tflite import fresh_process_rounds, interleaved, log  # noqa: E402
from hostinfo import machine, write_result  # noqa: E402

from edgeq.export.tflite_runtime import DecodeSession, runtime_version  # noqa: E402
from edgeq.fileio import atomic_path, write_bytes_atomic  # noqa: E402

TOKENS = [1, 520, 33, 4000, 17, 9, 300, 12]


def fuse(model) -> None:
    """Each block's q/k/v and gate/up projections (bias-free Linears reading one input) as one stacked Linear, in place."""
    import torch

    class Rows(torch.nn.Module):
        """Output rows start:stop of the fused Linear: what one of its members computes."""

        def __init__(self, fused: torch.nn.Linear, start: int, stop: int):
            super().__init__()
            self.fused, self.start, self.stop = fused, start, stop

        def forward(self, x):
            return self.fused(x)[..., self.start:self.stop]

    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            parts = [getattr(parent, n) for n in names]
            fused = torch.nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False)
            fused.weight = torch.nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
            start = 0
            for name, part in zip(names, parts):
                setattr(parent, name, Rows(fused, start, start + part.out_features))
                start += part.out_features


def decode_file(path: Path, slots: int, fused: bool) -> int:
    """The decode signature alone, fused or not; returns its FULLY_CONNECTED count."""
    import litert_torch
    import torch

    from edgeq.export.tflite_decode import KVDecode, example_inputs
    from edgeq.export.tflite_flatbuffer import op_names, read_model
    from edgeq.models import load_model

    model = load_model("smollm2-135m").module.eval()
    if fused:
        fuse(model)
    with torch.no_grad(), atomic_path(path) as tmp:
        litert_torch.signature("decode", KVDecode(model).eval(), example_inputs(model, slots)).convert().export(str(tmp))
    model_t = read_model(path.read_bytes())
    names = op_names(model_t)
    return sum(names[op.opcodeIndex] == "FULLY_CONNECTED" for op in model_t.subgraphs[0].operators)


def int4_file(fp32: Path, out: Path) -> None:
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe([{
        "regex": ".*", "operation": "FULLY_CONNECTED", "algorithm_key": "min_max_uniform_quantize",
        "op_config": {"weight_tensor_config": {"num_bits": 4, "symmetric": True, "granularity": "BLOCKWISE_64", "dtype": "INT"},
                      "compute_precision": "INTEGER", "explicit_dequantize": False}}])
    write_bytes_atomic(out, bytes(qt.quantize(None, enable_progress_report=False).quantized_model))


def logits(path: Path) -> np.ndarray:
    session = DecodeSession(path)
    session.reset()
    return np.stack([session.step(t, i) for i, t in enumerate(TOKENS)])


def timed_round(files: dict[str, str], slots: int, threads: int, reps: int) -> dict[str, float]:
    """One fresh process: each file's step holding `slots` cache slots at position slots / 2, interleaved; median ms
    per file."""
    calls = {}
    for name, path in files.items():
        session = DecodeSession(path, threads=threads, slots=slots)
        session.reset()
        for i in range(slots // 2):
            session.step(i + 1, i)
        calls[name] = (lambda s=session: s.step(7, slots // 2))
    return {n: r["median_ms"] for n, r in interleaved(calls, reps).items()}


def time_rows(rows: dict[str, dict], files: dict[str, str], slots: int, threads: int, reps: int, rounds: int) -> None:
    """`timed_round` in `rounds` fresh processes; each file's row gets the median over processes (ms_{slots}_{threads}t)
    and each process's median (per_process_...)."""
    log(f"{slots} slots, {threads} thread(s): {rounds} fresh processes")
    names = list(files)
    per = fresh_process_rounds(timed_round, lambda order: ({n: files[n] for n in order}, slots, threads, reps), names, rounds)
    for name in names:
        rows[name][f"ms_{slots}_{threads}t"] = round(statistics.median(p[name] for p in per), 3)
        rows[name][f"per_process_{slots}_{threads}t"] = [round(p[name], 3) for p in per]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-probe-fusion")
    ap.add_argument("--slots", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_tflite_fusion.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, checks = {}, {}
    for slots in args.slots:
        files = {}
        for fused in (False, True):
            kind = "fused" if fused else "unfused"
            log(f"{slots} slots, {kind}: litert-torch conversion, ai-edge-quantizer INT4")
            fp32 = work / f"decode-{slots}-{kind}-fp32.tflite"
            fcs = decode_file(fp32, slots, fused)
            int4_file(fp32, work / f"decode-{slots}-{kind}-int4.tflite")
            for fmt in ("fp32", "int4"):
                files[f"{kind} {fmt}"] = str(work / f"decode-{slots}-{kind}-{fmt}.tflite")
                rows.setdefault(f"{kind} {fmt}", {"fully_connected": fcs})
                rows[f"{kind} {fmt}"]["size_mb"] = round(Path(files[f"{kind} {fmt}"]).stat().st_size / 1e6, 2)
        for fmt in ("fp32", "int4"):
            a, b = logits(Path(files[f"unfused {fmt}"])), logits(Path(files[f"fused {fmt}"]))
            checks[f"{fmt} {slots} slots"] = float(np.max(np.abs(a - b)))
        for threads in (1, 2):
            time_rows(rows, files, slots, threads, args.reps, args.rounds)
    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "runtime": runtime_version(), "reps": args.reps, "rounds": args.rounds, "slots": args.slots, "rows": rows,
              "fused_vs_unfused_logits_max_abs": checks}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    slots = result["slots"]
    head = [f"{s} slots {t}t ms" for s in slots for t in (1, 2)]
    lines = ["# Fused linear layers in SmolLM2's TFLite decode step (probe)", "", "```", result["command"], "```", "",
             f"Created {result['created']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, shared), "
             f"{result['runtime']}, XNNPACK. One decode step at position slots / 2, caches in the interpreter's buffers; "
             f"median over {result['rounds']} fresh processes of each one's median of {result['reps']} interleaved calls. "
             "int4: ai-edge-quantizer, every FULLY_CONNECTED blockwise INT4 (blocks of 64), dynamic int8 activations.", "",
             "| file | FULLY_CONNECTED | size MB | " + " | ".join(head) + " |", "|---" * (3 + len(head)) + "|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['fully_connected']} | {r['size_mb']} | "
                     + " | ".join(f"{r[f'ms_{s}_{t}t']:.2f}" for s in slots for t in (1, 2)) + " |")
    lines += ["", "Fused over unfused step time (lower is faster), and INT4 over fp32 speed-up of each graph:", ""]
    for s in slots:
        for t in (1, 2):
            key = f"ms_{s}_{t}t"
            r = result["rows"]
            lines.append(f"- {s} slots, {t} thread(s): fp32 {r['fused fp32'][key] / r['unfused fp32'][key]:.3f}, "
                         f"int4 {r['fused int4'][key] / r['unfused int4'][key]:.3f}; INT4 vs fp32 "
                         f"{r['unfused fp32'][key] / r['unfused int4'][key]:.2f}x unfused, "
                         f"{r['fused fp32'][key] / r['fused int4'][key]:.2f}x fused")
    lines += ["", "Logits of the first steps, fused against unfused (max abs): "
              + ", ".join(f"{k}: {v:.3g}" for k, v in result["fused_vs_unfused_logits_max_abs"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
