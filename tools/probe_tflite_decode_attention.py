"""Probe: what a decode step's attention over the KV cache costs in LiteRT on this host, by cache slots. Not a test.

    .venv/bin/python tools/probe_tflite_decode_attention.py --out benchmarks/tflite_decode_attention_zen4

An INT4 decode step shrinks the weights' bytes, not the caches': every step reads all cache slots of every layer in
float32, whatever the weights' format. This graph holds only that part of SmolLM2's step (30 layers, 3 kv heads of
64, 3 query heads per kv head, one token): per layer scores = q @ K^T + mask, softmax, q += p @ V^T, with the
caches as inputs in the layouts edgeq's decode signature uses (keys [kv_heads, slots, head_dim], values
[kv_heads, head_dim, slots]). Random data: only the shapes matter. The caches are set once and stay in the
interpreter's input buffers (as tflite_runtime.DecodeSession keeps them), so a call is invoke() alone. XNNPACK and,
for comparison, LiteRT's built-in kernels, at 1 and 2 threads, all files interleaved, median of --reps. Writes
OUT.json and OUT.md (command at the top). Never imported by edgeq.
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

from edgeq.export.tflite_runtime import TfliteRunner, runtime_version, signature_io  # noqa: E402
from edgeq.fileio import atomic_path  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM, LAYERS = 3, 3, 64, 30  # SmolLM2-135M


def example(slots: int, seed: int = 0) -> list[np.ndarray]:
    """q [kv_heads, group, head_dim], mask [1, 1, slots], then per layer keys and values."""
    rng = np.random.default_rng(seed)
    caches = []
    for _ in range(LAYERS):
        caches += [rng.standard_normal((KV_HEADS, slots, HEAD_DIM)), rng.standard_normal((KV_HEADS, HEAD_DIM, slots))]
    return [a.astype(np.float32) for a in [rng.standard_normal((KV_HEADS, GROUP, HEAD_DIM)), np.zeros((1, 1, slots))] + caches]


def attention_file(path: Path, slots: int) -> None:
    import litert_torch
    import torch

    class Attention(torch.nn.Module):
        def forward(self, q, mask, *cache):
            for i in range(LAYERS):
                p = torch.softmax(torch.bmm(q, cache[2 * i].transpose(1, 2)) + mask, dim=-1)
                q = q + torch.bmm(p, cache[2 * i + 1].transpose(1, 2))
            return q

    inputs = tuple(torch.from_numpy(a) for a in example(slots))
    with atomic_path(path) as tmp:
        litert_torch.convert(Attention().eval(), inputs).export(str(tmp))


def resident(path: Path, slots: int, threads: int, xnnpack: bool):
    """The file's signature with every input set once in the interpreter's own buffers (as DecodeSession keeps
    its caches); the call to time is the invoke alone."""
    runner = TfliteRunner(path, threads=threads, xnnpack=xnnpack)
    io = signature_io(runner.runner)
    if io is None:
        raise SystemExit("this LiteRT runtime's signature runner has no interpreter wrapper to keep inputs resident")
    wrapper, subgraph, inputs, _ = io
    wrapper.AllocateTensors(subgraph)
    for name, spec, feed in zip(runner.input_names, runner.inputs, example(slots), strict=True):
        if tuple(spec["shape"]) != feed.shape:
            raise SystemExit(f"{path}: input {name} is {tuple(spec['shape'])}, the example's {feed.shape}")
        wrapper.SetTensor(inputs[name], feed, subgraph)
    return functools.partial(wrapper.Invoke, subgraph)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-probe-decode-attention")
    ap.add_argument("--slots", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_tflite_decode_attention.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for slots in args.slots:
        log(f"{slots} slots: litert-torch conversion")
        files[slots] = work / f"attention-{slots}.tflite"
        attention_file(files[slots], slots)
    rows = {s: {"cache_mb": round(2 * LAYERS * KV_HEADS * HEAD_DIM * s * 4 / 1e6, 2)} for s in args.slots}
    for xnnpack in (True, False):
        kernels = "xnnpack" if xnnpack else "builtin"
        for threads in (1, 2):
            log(f"latency, {kernels}, {threads} thread(s)")
            calls = {s: resident(p, s, threads, xnnpack) for s, p in files.items()}
            for s, lat in interleaved(calls, args.reps).items():
                rows[s][f"{kernels}_ms_{threads}t"] = round(lat["median_ms"], 4)
    result = {"command": command, "reps": args.reps, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "runtime": runtime_version(),
              "shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "group": GROUP, "head_dim": HEAD_DIM},
              "rows": {str(s): r for s, r in rows.items()}}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    lines = ["# A decode step's attention over the KV cache in LiteRT, by cache slots (probe)", "", "```", result["command"], "```", "",
             f"Created {result['created']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, shared), "
             f"{result['runtime']}. Attention only: {LAYERS} layers, {KV_HEADS} kv heads x {GROUP} query heads of "
             f"{HEAD_DIM}, one token, float32 caches set once and kept in the interpreter's input buffers; invoke() "
             f"timed, the files interleaved, median of {result['reps']} calls. cache MB: what a step reads of the caches.", "",
             "| slots | cache MB | XNNPACK ms 1t | XNNPACK ms 2t | built-in ms 1t | built-in ms 2t |",
             "|---|---|---|---|---|---|"]
    timed = ("xnnpack_ms_1t", "xnnpack_ms_2t", "builtin_ms_1t", "builtin_ms_2t")
    lines += [" | ".join(["", s, str(r["cache_mb"]), *(f"{r[k]:.3f}" for k in timed), ""]).strip()
              for s, r in result["rows"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
