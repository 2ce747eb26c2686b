"""Probe: grouped-query attention in ONNX graphs, sdpa's against edgeq's grouped attention. Not a test.

    .venv/bin/edgeq quantize smollm2-135m -r w8 -o Q
    .venv/bin/python tools/probe_onnx_prefill_attention.py --qdir Q --out benchmarks/onnx_prefill_attention_smollm2_zen4

ONNX exports traced Hugging Face's sdpa attention: torch.onnx renders it with the key and value heads repeated for the
query heads that share them (Expand) and, after the softmax, `Where(IsNaN(p), 0, p)` for rows with nothing to attend
to (torch's "safe softmax"), an elementwise pass over every layer's [heads, tokens, tokens] scores. edgeq now traces
decoder LMs with `edgeq.models.hf.decoder_attention`: for grouped-query models `grouped_attention`, as it converts
TFLite files (eager attention with the query heads of one kv head stacked along the sequence axis). For QDIR, fp32 and its recipe's default variant are exported both ways (the
sdpa graphs cached apart). Reported: each file's ops of those kinds and its parity with the simulation (FILE.json);
the fp32 twins' logits against each other; the default twins' perplexity and top-1 agreement with the fp32 file on
--windows evaluation windows of 512 tokens; one prefill of each --seq-len tokens and one decode step after --past
tokens, at 1 and 2 threads: in each of --rounds fresh processes (load order rotated) the median of --reps
interleaved calls; the table gives the median over processes and the paired ratio. Writes OUT.json and OUT.md
(command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
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
from probe_tflite_prefill_attention import hf_attention  # noqa: E402

from edgeq.export.onnx_runtime import OnnxRunner  # noqa: E402
from edgeq.fileio import read_json  # noqa: E402

KINDS = ("grouped", "sdpa")
COUNTED = ("Expand", "Where", "IsNaN", "Softmax", "MatMul")


def sdpa_attention(work: Path):
    """Exports in the block trace Hugging Face's sdpa attention."""
    from edgeq.export import onnx as onnx_export

    return hf_attention(onnx_export, "decoder_attention", work / "cache-sdpa")


def export_pairs(model: str, qdir: Path, work: Path) -> dict[str, Path]:
    """fp32 from the model itself (an ONNX export of QDIR computes what its quantized model computes), the default
    variant from QDIR."""
    from edgeq.export import export

    files = {}
    for kind in KINDS:
        for fmt, source in (("fp32", model), ("default", qdir)):
            name = f"{fmt} {kind}"
            path = work / f"{name.replace(' ', '-')}.onnx"
            if not path.exists():
                log(f"export {name}")
                with sdpa_attention(work) if kind == "sdpa" else contextlib.nullcontext():
                    export(source, "onnx", path)
            files[name] = path
    return files


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts = collections.Counter(n.op_type for n in graph.node)
    return {op: counts.get(op, 0) for op in COUNTED}


def tokens(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(1, n)).astype(np.int64)


def timed_round(files: dict[str, str], seq_lens: list[int], past: int, threads: int, reps: int) -> dict[str, float]:
    """One fresh process: each file's prefills and its decode step after `past` tokens, interleaved; median ms."""
    calls = {}
    for name, path in files.items():
        prefill = OnnxRunner(path, threads=threads)
        for n in seq_lens:
            calls[f"{name} prefill {n}"] = functools.partial(prefill, tokens(n))
        decode = prefill.decode_runner()
        presents = prefill(tokens(past))[1:]
        calls[f"{name} decode {past}"] = functools.partial(decode, tokens(1), *presents)
    return {n: r["median_ms"] for n, r in interleaved(calls, reps).items()}


def quality(files: dict[str, Path], windows: np.ndarray) -> dict[str, dict]:
    """ppl of each default file over the windows and its next-token top-1 agreement with the fp32 (grouped) file."""
    ref = OnnxRunner(files["fp32 grouped"])
    ref_top1 = [ref(w[None, :])[0][0].argmax(-1) for w in windows]
    out = {}
    for kind in KINDS:
        runner = OnnxRunner(files[f"default {kind}"])
        nll, agree, count = 0.0, 0, 0
        for w, want in zip(windows, ref_top1):
            logits = runner(w[None, :])[0][0].astype(np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
            agree += int((logits.argmax(-1) == want).sum())
            count += len(w)
        out[f"default {kind}"] = {"ppl": float(np.exp(nll / (count - len(windows)))), "top1_agree_fp32": agree / count}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdir", required=True, help="a quantized decoder LM with grouped-query attention (edgeq quantize)")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-probe-onnx-attention")
    ap.add_argument("--model", default="smollm2-135m", help="the QDIR's model (the fp32 files; its tokenizer makes the windows)")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--past", type=int, default=255)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_onnx_prefill_attention.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = export_pairs(args.model, Path(args.qdir), work)
    rows = {}
    for name, path in files.items():
        meta = read_json(path.with_name(path.name + ".json"))
        rows[name] = {"variant": meta["variant"], "ops_prefill": op_counts(path),
                      "parity": {k: meta["parity"][k] for k in ("max_abs", "cos_min", "top1_agree")}}
    ids = tokens(max(args.seq_len))
    a, b = (OnnxRunner(files[f"fp32 {k}"])(ids)[0] for k in KINDS)
    fp32_max_abs = float(np.max(np.abs(a - b)))
    from edgeq import data
    from edgeq.models import load_model

    log("quality")
    windows = data.lm_windows(load_model(args.model).tokenizer, "enwiki", "evaluation", 512, args.windows)
    for name, q in quality(files, windows).items():
        rows[name].update(q)
    ratios, timings = {}, {}
    names = list(files)
    for threads in (1, 2):
        log(f"{threads} thread(s): {args.rounds} fresh processes")
        per = fresh_process_rounds(timed_round, lambda order: ({n: str(files[n]) for n in order}, args.seq_len, args.past,
                                                               threads, args.reps), names, args.rounds)
        for call in per[0]:
            timings[f"{call} {threads}t"] = {"ms": round(statistics.median(p[call] for p in per), 2),
                                             "per_process": [round(p[call], 2) for p in per]}
        for call in per[0]:
            if " grouped " not in call:
                continue
            paired = [p[call] / p[call.replace(" grouped ", " sdpa ")] for p in per]
            ratios[f"{call.replace(' grouped', '')} {threads}t"] = {
                "grouped_over_sdpa": round(statistics.median(paired), 3), "grouped_faster_in": sum(r < 1 for r in paired),
                "processes": len(paired)}
    import onnxruntime

    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "runtime": f"onnxruntime {onnxruntime.__version__}", "qdir": args.qdir, "reps": args.reps,
              "rounds": args.rounds, "seq_len": args.seq_len, "past": args.past, "windows": args.windows, "rows": rows,
              "timings": timings, "ratios": ratios, "fp32_grouped_vs_sdpa_logits_max_abs": fp32_max_abs}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Grouped-query attention in ONNX graphs: sdpa's against edgeq's grouped attention (probe)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']} on {m['cpu']} ({', '.join(m['isa'])}; {m['cores']} cores, shared), "
             f"{result['runtime']}, CPU execution provider. From {result['qdir']}: fp32 and the recipe's default variant, "
             "each traced with sdpa (as edgeq exported until now) and with grouped attention (as it exports now). "
             f"ppl / top-1: {result['windows']} evaluation windows of 512 tokens, top-1 against the fp32 grouped file.", "",
             "| file | variant | " + " | ".join(f"{op} ops" for op in COUNTED) + " | parity cos_min | ppl | top-1 vs fp32 |",
             "|---" * (len(COUNTED) + 5) + "|"]
    for name, r in result["rows"].items():
        ppl = f"{r['ppl']:.4f}" if "ppl" in r else "-"
        top1 = f"{r['top1_agree_fp32']:.4f}" if "top1_agree_fp32" in r else "-"
        lines.append(f"| {name} | {r['variant']} | " + " | ".join(str(r["ops_prefill"][op]) for op in COUNTED)
                     + f" | {r['parity']['cos_min']:.6f} | {ppl} | {top1} |")
    lines += ["", f"Median ms over {result['rounds']} fresh processes (each the median of {result['reps']} interleaved "
              f"calls); decode: one step after {result['past']} tokens:", "", "| call | threads | ms | per process |",
              "|---|---|---|---|"]
    for call, t in result["timings"].items():
        name, threads = call.rsplit(" ", 1)
        lines.append(f"| {name} | {threads[:-1]} | {t['ms']:.2f} | {' / '.join(str(x) for x in t['per_process'])} |")
    lines += ["", "Grouped over sdpa time, paired within each process (median of the processes' ratios; how many "
              "processes ran the grouped file faster):", ""]
    lines += [f"- {k}: {v['grouped_over_sdpa']} ({v['grouped_faster_in']} of {v['processes']})"
              for k, v in result["ratios"].items()]
    lines += ["", f"fp32 logits, grouped against sdpa file (max abs): {result['fp32_grouped_vs_sdpa_logits_max_abs']:.3g}",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
