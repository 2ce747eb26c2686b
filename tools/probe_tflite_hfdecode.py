"""Probe: what the generic decode step (HFDecode) costs against edgeq's Llama-family step (KVDecode). Not a test.

    .venv/bin/edgeq quantize smollm2-135m -r w4-g64-litert -o Q
    .venv/bin/python tools/probe_tflite_hfdecode.py --qdir Q --out benchmarks/tflite_hfdecode_smollm2_zen4

Decoders outside the Llama family get `tflite_hfdecode.HFDecode`: the model's own Hugging Face forward with edgeq's
attention over the caches. Llama-family models keep `KVDecode`, written for LiteRT (the attention scale carried by the
rotary tables, the rotation as one concatenation). To see what the generic step costs a family that has no tuned one,
QDIR (a Llama-family model) is exported twice in its recipe's default variant with a decode signature of --cache-len
slots: as edgeq exports it (KVDecode) and with HFDecode forced (its graph cached apart). Reported: each file's decode
parity (FILE.json), the two files' logits against each other over --tokens steps, and one decode step at position
--pos (real caches before it) at 1 and 2 threads: in each of --rounds fresh processes (load order rotated) the median
of --reps interleaved steps (`bench_tflite_decode.latency_rounds`); the ratio is paired within each process. Writes
OUT.json and OUT.md (command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_tflite import log  # noqa: E402
from bench_tflite_decode import latency_rounds  # noqa: E402
from hostinfo import machine, write_result  # noqa: E402
from probe_tflite_prefill_attention import cached_under  # noqa: E402

from edgeq.export.tflite_runtime import DecodeSession, runtime_version  # noqa: E402
from edgeq.fileio import read_json  # noqa: E402


@contextlib.contextmanager
def generic_step(work: Path):
    """Exports in the block get HFDecode whatever the model (`decode_module` given no family of its own), their float
    graphs cached under `work` so that edgeq's cache never mixes the two steps."""
    from edgeq.export import tflite_decode

    family = tflite_decode.FAMILY
    tflite_decode.FAMILY = ()
    try:
        with cached_under(work / "cache-hfdecode"):
            yield
    finally:
        tflite_decode.FAMILY = family


def export_pair(qdir: Path, work: Path, cache_len: int) -> dict[str, Path]:
    from edgeq.export import export

    files = {}
    for step in ("KVDecode", "HFDecode"):
        path = work / f"decode-{cache_len}-{step}.tflite"
        if not path.exists():
            log(f"export {step}")
            with generic_step(work) if step == "HFDecode" else contextlib.nullcontext():
                export(qdir, "tflite", path, cache_len=cache_len)
        files[step] = path
    return files


def steps(path: Path, ids: np.ndarray) -> np.ndarray:
    session = DecodeSession(path)
    session.reset()
    return np.stack([session.step(int(ids[0, i]), i) for i in range(ids.shape[1])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdir", required=True, help="a quantized Llama-family decoder LM (edgeq quantize)")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-probe-hfdecode")
    ap.add_argument("--cache-len", type=int, default=256)
    ap.add_argument("--pos", type=int, default=64, help="the timed step's position (real caches before it)")
    ap.add_argument("--tokens", type=int, default=32, help="steps whose logits the two files are compared on")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_tflite_hfdecode.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = export_pair(Path(args.qdir), work, args.cache_len)
    ids = np.random.default_rng(0).integers(0, 20000, size=(1, max(args.pos + 1, args.tokens))).astype(np.int32)
    rows = {}
    for name, path in files.items():
        meta = read_json(path.with_name(path.name + ".json"))
        decode = meta["parity"]["decode"]
        rows[name] = {"variant": meta["variant"], "exact": meta["exact"], "step": meta["graph"]["decode"]["step"],
                      "decode_cos_min": decode["cos_min"], "after_prefill_cos_min": decode["after_prefill"]["cos_min"],
                      "size_mb": round(path.stat().st_size / 1e6, 2)}
    a, b = (steps(files[n], ids[:, :args.tokens]) for n in files)
    logits_max_abs = float(np.max(np.abs(a - b)))
    ratios = {}
    for threads in (1, 2):
        log(f"{threads} thread(s): {args.rounds} fresh processes")
        timed = latency_rounds({n: str(p) for n, p in files.items()}, args.pos, ids, threads, args.reps, args.rounds)
        for name in files:
            rows[name][f"ms_{threads}t"] = round(timed[name]["median_ms"], 3)
            rows[name][f"rounds_ms_{threads}t"] = timed[name]["rounds_ms"]
        paired = [h / k for h, k in zip(timed["HFDecode"]["rounds_ms"], timed["KVDecode"]["rounds_ms"])]
        ratios[f"{threads}t"] = {"hfdecode_over_kvdecode": round(statistics.median(paired), 3),
                                 "per_process": [round(r, 3) for r in paired]}
    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "runtime": runtime_version(), "qdir": args.qdir, "cache_len": args.cache_len, "pos": args.pos,
              "reps": args.reps, "rounds": args.rounds, "rows": rows, "ratios": ratios,
              "logits_max_abs_between_files": logits_max_abs, "tokens_compared": args.tokens}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# The generic decode step (HFDecode) against edgeq's Llama-family step (KVDecode) in TFLite (probe)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']} on {m['cpu']} ({', '.join(m['isa'])}; {m['cores']} cores, shared), "
             f"{result['runtime']}, XNNPACK. One decode step at position {result['pos']} of {result['cache_len']} slots "
             f"(DecodeSession, real caches before it) from {result['qdir']}: median over {result['rounds']} fresh processes "
             f"of each one's median of {result['reps']} interleaved steps.", "",
             "| step | variant | exact | size MB | decode parity cos_min (empty cache / after prefill) | ms 1 thread | "
             "ms 2 threads |", "|---" * 7 + "|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['variant']} | {r['exact']} | {r['size_mb']} | {r['decode_cos_min']:.6f} / "
                     f"{r['after_prefill_cos_min']:.6f} | {r['ms_1t']:.3f} | {r['ms_2t']:.3f} |")
    lines += ["", "HFDecode over KVDecode step time, paired within each process (median; per process):", ""]
    lines += [f"- {k}: {v['hfdecode_over_kvdecode']} ({', '.join(map(str, v['per_process']))})" for k, v in result["ratios"].items()]
    lines += ["", f"The two files' logits over {result['tokens_compared']} steps from an empty cache, max abs: "
              f"{result['logits_max_abs_between_files']:.3g}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
