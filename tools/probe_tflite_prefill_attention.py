"""Probe: what repeating the keys and values for grouped-query attention cost a TFLite prefill. Not a test.

    .venv/bin/edgeq quantize smollm2-135m -r w4-g64-litert-emb4 -o Q
    .venv/bin/python tools/probe_tflite_prefill_attention.py --qdir Q --out benchmarks/tflite_prefill_attention_smollm2_zen4

Hugging Face's eager and sdpa attention repeat each key and value head for the query heads that share it
(`repeat_kv`); litert-torch renders that as two BROADCAST_TOs per layer, which XNNPACK has no kernel for, so LiteRT's
built-in kernel runs them between XNNPACK partitions (SmolLM2: 60 of them, 31 partitions). edgeq's exports now convert
with the grouped attention of `edgeq.models.hf.litert_attention` instead (the query heads of one kv head stacked along
the sequence axis: one batched matmul per kv head, no copies). For each --seq-len, QDIR is exported as fp32 and in its recipe's default
variant twice: as edgeq exports it, and with the repeating attention (its float graph cached apart). Reported: each
file's XNNPACK coverage of the prefill and its parity with the simulation (FILE.json), the fp32 twins' logits
against each other, and one prefill of seq_len tokens at 1 and 2 threads: in each of --rounds fresh processes (load
order rotated) the median of --reps interleaved calls; the table gives the median over processes and the paired
ratio. Writes OUT.json and OUT.md (command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
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

from edgeq.export.tflite_runtime import TfliteRunner, runtime_version  # noqa: E402
from edgeq.fileio import read_json  # noqa: E402

KINDS = ("grouped", "repeated")


@contextlib.contextmanager
def cached_under(cache: Path):
    """Graphs exported in the block are cached under `cache` (EDGEQ_CACHE), so that edgeq's own cache never mixes
    them with the graphs of the same model exported as edgeq exports it."""
    saved = os.environ.get("EDGEQ_CACHE")
    os.environ["EDGEQ_CACHE"] = str(cache)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("EDGEQ_CACHE")
        else:
            os.environ["EDGEQ_CACHE"] = saved


@contextlib.contextmanager
def hf_attention(exporter, name: str, cache: Path):
    """Exports in the block trace Hugging Face's own attention (the attention context `name` the `exporter` module
    applies is a no-op), caching their graphs under `cache` (`cached_under`)."""
    before = getattr(exporter, name)
    setattr(exporter, name, lambda model: contextlib.nullcontext())
    try:
        with cached_under(cache):
            yield
    finally:
        setattr(exporter, name, before)


def repeated_attention(work: Path):
    """Exports in the block convert with Hugging Face's own attention (repeat_kv)."""
    from edgeq.export import tflite_graph

    return hf_attention(tflite_graph, "litert_attention", work / "cache-repeated")


def export_pair(qdir: Path, work: Path, seq_len: int) -> dict[str, Path]:
    from edgeq.export import export

    files = {}
    for kind in KINDS:
        for variant in ("fp32", None):
            name = f"{'fp32' if variant else 'default'} {kind}"
            path = work / f"prefill-{seq_len}-{name.replace(' ', '-')}.tflite"
            if not path.exists():
                log(f"seq_len {seq_len}: export {name}")
                with repeated_attention(work) if kind == "repeated" else contextlib.nullcontext():
                    export(qdir, "tflite", path, variant=variant, seq_len=seq_len)
            files[name] = path
    return files


def prompt(seq_len: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(1, seq_len)).astype(np.int32)


def timed_round(files: dict[str, str], seq_len: int, threads: int, reps: int) -> dict[str, float]:
    """One fresh process: each file's prefill of seq_len tokens, interleaved; median ms per file."""
    ids = prompt(seq_len)
    calls = {n: functools.partial(TfliteRunner(p, threads=threads), ids) for n, p in files.items()}
    return {n: r["median_ms"] for n, r in interleaved(calls, reps).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdir", required=True, help="a quantized decoder LM with grouped-query attention (edgeq quantize)")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-probe-prefill")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_tflite_prefill_attention.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows, checks, ratios = {}, {}, {}
    for seq_len in args.seq_len:
        files = export_pair(Path(args.qdir), work, seq_len)
        for name, path in files.items():
            meta = read_json(path.with_name(path.name + ".json"))
            parity = meta["parity"]
            rows[f"{seq_len} {name}"] = {
                "variant": meta["variant"], "size_mb": round(path.stat().st_size / 1e6, 2),
                "xnnpack": meta["graph"]["xnnpack"]["serving_default"],
                "parity": {k: parity[k] for k in ("max_abs", "cos_min", "top1_agree")}}
        ids = prompt(seq_len)
        a, b = (TfliteRunner(files[f"fp32 {k}"])(ids)[0] for k in KINDS)
        checks[f"{seq_len}"] = float(np.max(np.abs(a - b)))
        names = list(files)
        for threads in (1, 2):
            log(f"seq_len {seq_len}, {threads} thread(s): {args.rounds} fresh processes")
            per = fresh_process_rounds(timed_round, lambda order: ({n: str(files[n]) for n in order}, seq_len, threads, args.reps),
                                       names, args.rounds)
            for name in names:
                rows[f"{seq_len} {name}"][f"ms_{threads}t"] = round(statistics.median(p[name] for p in per), 2)
                rows[f"{seq_len} {name}"][f"per_process_{threads}t"] = [round(p[name], 2) for p in per]
            for fmt in ("fp32", "default"):
                paired = [p[f"{fmt} grouped"] / p[f"{fmt} repeated"] for p in per]
                ratios[f"{seq_len} {fmt} {threads}t"] = {"grouped_over_repeated": round(statistics.median(paired), 3),
                                                        "grouped_faster_in": sum(r < 1 for r in paired), "processes": len(paired)}
    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "runtime": runtime_version(), "qdir": args.qdir, "reps": args.reps, "rounds": args.rounds,
              "seq_len": args.seq_len, "rows": rows, "ratios": ratios, "fp32_grouped_vs_repeated_logits_max_abs": checks}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Grouped-query attention in a TFLite prefill: repeated keys and values against grouped queries (probe)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']} on {m['cpu']} ({', '.join(m['isa'])}; {m['cores']} cores, shared), "
             f"{result['runtime']}, XNNPACK. One prefill (`serving_default`) of seq_len tokens from {result['qdir']}: "
             f"median over {result['rounds']} fresh processes of each one's median of {result['reps']} interleaved calls. "
             "grouped: as edgeq exports it; repeated: Hugging Face's attention (`repeat_kv`, BROADCAST_TO). "
             "default: the recipe's default variant.", "",
             "| seq_len | file | variant | size MB | XNNPACK partitions | left to built-in kernels | parity cos_min | "
             "ms 1 thread | ms 2 threads |", "|---" * 9 + "|"]
    for name, r in result["rows"].items():
        seq_len, file = name.split(" ", 1)
        left = ", ".join(f"{k} {v}" for k, v in r["xnnpack"]["builtin"].items())
        lines.append(f"| {seq_len} | {file} | {r['variant']} | {r['size_mb']} | {r['xnnpack']['partitions']} | {left} | "
                     f"{r['parity']['cos_min']:.6f} | {r['ms_1t']:.2f} | {r['ms_2t']:.2f} |")
    lines += ["", "Grouped over repeated prefill time, paired within each process (median of the processes' ratios; how "
              "many processes ran the grouped file faster):", ""]
    lines += [f"- seq_len {k}: {v['grouped_over_repeated']} ({v['grouped_faster_in']} of {v['processes']})"
              for k, v in result["ratios"].items()]
    lines += ["", "fp32 logits, grouped against repeated file (max abs): "
              + ", ".join(f"seq_len {k}: {v:.3g}" for k, v in result["fp32_grouped_vs_repeated_logits_max_abs"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
