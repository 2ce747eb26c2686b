"""Probe: what the decode step's SLICE of size -1 cost, against the STRIDED_SLICE edgeq now writes. Not a test.

    .venv/bin/python tools/probe_tflite_partitions.py --file fp32=FP32.tflite --file int4=INT4.tflite --out OUT

Each --file is an edgeq export with a decode signature whose slot count is the runtime's choice, made since
2026-12-03 (`tflite_decode.dynamic_slots` writes the slice of the cached slots' probabilities as a STRIDED_SLICE to
the end of every axis). Its twin is the same file with that op put back as the SLICE of size -1 that files made before
2026-12-03 hold. For each pair: the XNNPACK coverage of the decode signature (`tflite_runtime.xnnpack_coverage`:
partitions, ops left to LiteRT's built-in kernels), the logits of a few steps at the declared and at a resized slot
count (must be the same), and one step holding --slots slots at position slots / 2 with the caches in the
interpreter's buffers (tflite_runtime.DecodeSession), at 1 and 2 threads: in each of --rounds fresh processes (load
order rotated) the median of --reps interleaved calls; the table gives the median over processes. Writes OUT.json
and OUT.md (command at the top). Never imported by edgeq.
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

from hostinfo import machine, write_result  # noqa: E402
from probe_tflite_fusion import time_rows  # noqa: E402

from edgeq.export.tflite_flatbuffer import inline_buffers, op_names, read_model, schema, write_model  # noqa: E402
from edgeq.export.tflite_runtime import DecodeSession, runtime_version, xnnpack_coverage  # noqa: E402
from edgeq.fileio import write_bytes_atomic  # noqa: E402


def as_before(buf: bytes) -> bytes:
    """`buf` with each STRIDED_SLICE `dynamic_slots` wrote (its end is the tensor edgeq/slots_end) put back as the SLICE
    of size -1 of files made before 2026-12-03."""
    s = schema()
    model_t = read_model(buf)
    inline_buffers(model_t, buf)
    codes = op_names(model_t)
    done = 0
    for sg in model_t.subgraphs:
        ends = {i for i, t in enumerate(sg.tensors) if t.name == b"edgeq/slots_end"}
        for op in sg.operators:
            if codes[op.opcodeIndex] != "STRIDED_SLICE" or int(op.inputs[2]) not in ends:
                continue
            rank = int(sg.tensors[op.inputs[1]].shape[0])
            size = s.BufferT()
            size.data = np.frombuffer(np.full(rank, -1, dtype=np.int32).tobytes(), dtype=np.uint8)
            model_t.buffers.append(size)
            t = s.TensorT()
            t.shape, t.type, t.buffer, t.name = (np.array([rank], dtype=np.int32), s.TensorType.INT32,
                                                 len(model_t.buffers) - 1, b"edgeq/slots_to_the_end")
            sg.tensors.append(t)
            op.opcodeIndex = codes.index("SLICE")
            op.inputs = np.array([op.inputs[0], op.inputs[1], len(sg.tensors) - 1], dtype=np.int32)
            op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.SliceOptions, s.SliceOptionsT()
            done += 1
    if not done:
        raise SystemExit("probe_tflite_partitions: no STRIDED_SLICE of dynamic_slots found (export the file with this commit's edgeq)")
    return write_model(model_t)


TOKENS = [1, 52, 33, 200, 17, 9, 30, 12]  # within any vocabulary of 256 or more


def logits(path: str, slots: int | None) -> np.ndarray:
    session = DecodeSession(path, slots=slots)
    session.reset()
    return np.stack([session.step(t, i) for i, t in enumerate(TOKENS)])


def made_by(path: str) -> dict:
    """Where an edgeq export came from (its FILE.json)."""
    from edgeq.fileio import read_json

    meta = read_json(Path(f"{path}.json"))
    return {"path": path, "variant": meta["variant"], "model": meta["source"]["model"],
            "recipe": meta["recipe"], "sha256": meta["sha256"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", action="append", required=True, metavar="NAME=PATH", help="an edgeq .tflite with a decode signature")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-probe-partitions")
    ap.add_argument("--slots", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_tflite_partitions.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files, rows, checks = {}, {}, {}
    for item in args.file:
        name, _, path = item.partition("=")
        before = work / f"{name}-slice.tflite"
        write_bytes_atomic(before, as_before(Path(path).read_bytes()))
        for kind, p in (("strided_slice", path), ("slice", str(before))):
            files[f"{name} {kind}"] = p
            rows[f"{name} {kind}"] = {"xnnpack": xnnpack_coverage(Path(p).read_bytes(), "decode")}
        checks[name] = {f"{slots} slots": float(np.max(np.abs(logits(path, slots) - logits(str(before), slots))))
                        for slots in (None, *args.slots)}
    for slots in args.slots:
        for threads in (1, 2):
            time_rows(rows, files, slots, threads, args.reps, args.rounds)
    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "runtime": runtime_version(), "reps": args.reps, "rounds": args.rounds, "slots": args.slots,
              "files": {name: made_by(path) for name, _, path in (item.partition("=") for item in args.file)}, "rows": rows,
              "logits_max_abs": checks}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    slots = result["slots"]
    head = [f"{s} slots {t}t ms" for s in slots for t in (1, 2)]
    lines = ["# The decode step's slot slice: SLICE of size -1 against STRIDED_SLICE (probe)", "", "```", result["command"],
             "```", "",
             f"Created {result['created']} on {result['machine']['cpu']} ({', '.join(result['machine']['isa'])}; "
             f"{result['machine']['cores']} cores, shared), "
             f"{result['runtime']}, XNNPACK. One decode step holding the slots at position slots / 2, caches in the "
             f"interpreter's buffers; median over {result['rounds']} fresh processes of each one's median of "
             f"{result['reps']} interleaved calls.", "",
             "| file | XNNPACK partitions | left to built-in kernels | " + " | ".join(head) + " |", "|---" * (3 + len(head)) + "|"]
    for name, r in result["rows"].items():
        builtin = ", ".join(f"{op} {n}" for op, n in r["xnnpack"]["builtin"].items())
        lines.append(f"| {name} | {r['xnnpack']['partitions']} | {builtin} | "
                     + " | ".join(f"{r[f'ms_{s}_{t}t']:.2f}" for s in slots for t in (1, 2)) + " |")
    lines += ["", "Files: " + "; ".join(f"{n}: `edgeq export` {f['variant']} of {f['model']}"
                                     + (f" quantized with `{f['recipe']}`" if f["recipe"] else "") for n, f in result["files"].items()),
              "", "STRIDED_SLICE over SLICE step time (lower is faster):", ""]
    for name in result["files"]:
        new, old = result["rows"][f"{name} strided_slice"], result["rows"][f"{name} slice"]
        lines.append(f"- {name}: " + ", ".join(f"{s} slots {t}t {new[f'ms_{s}_{t}t'] / old[f'ms_{s}_{t}t']:.3f}"
                                              for s in slots for t in (1, 2)))
    lines += ["", "Logits of the first steps, STRIDED_SLICE against SLICE (max abs; None: the declared slots): "
              + "; ".join(f"{n}: " + ", ".join(f"{k} {v:.3g}" for k, v in c.items()) for n, c in result["logits_max_abs"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
