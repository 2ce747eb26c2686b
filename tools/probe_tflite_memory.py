"""Probe: resident memory and decode latency of TFLite files in LiteRT, by API: the Interpreter against CompiledModel
with and without XNNPACK's weight cache. Not a test.

    .venv/bin/python tools/probe_tflite_memory.py --out benchmarks/tflite_memory_smollm2 /tmp/edgeq-bench-tflite/*-decode.tflite

XNNPACK packs every weight it runs into its own layout. The Interpreter (ai_edge_litert.interpreter: what edgeq's
TfliteRunner and DecodeSession load files with, and the board agent by default) applies the delegate to each
signature's subgraph on its own, so a file whose prefill and decode signatures share one copy of each weight in the
flatbuffer holds one packed copy per signature in memory. CompiledModel (ai_edge_litert.compiled_model, LiteRT's
newer API) takes an XNNPACK weight cache path; `:memory:` keeps the cache in anonymous memory, and a packed weight
is looked up by the buffer it came from, so the subgraphs share it (the agent's `weight_cache`, `edgeq profile
--weight-cache`).

Memory: each (file, API) pair in its own fresh process, which imports numpy and LiteRT only: load, run each
signature once on zero inputs (token 0 at position 0; decode first), VmRSS after each, the peak (ru_maxrss) last.
Latency: the decode signature loaded both ways the agent loads it (`edgeq.agent.runtimes.load`, with and without
`weight_cache`) in one process, its inputs set once, the two called interleaved, median of --reps after warm-up; in
--rounds fresh processes with the load order alternated. Writes OUT.json and OUT.md (command at the top). Never
imported by edgeq.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from hostinfo import machine, write_result  # noqa: E402

from edgeq.export.tflite_runtime import arg_order, interpreter_class, runtime_version, signature_io  # noqa: E402
from edgeq.fileio import read_json  # noqa: E402

APIS = {
    "interpreter": "Interpreter: each signature's subgraph delegated on its own (edgeq's runners; the agent by default)",
    "compiled": "CompiledModel, no weight cache",
    "compiled+cache": "CompiledModel, XNNPACK weight cache in memory (`:memory:`; the agent's weight_cache)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class InterpreterFile:
    """The file in one Interpreter, as edgeq's runners hold it: a signature's inputs set once in its own buffers."""

    def __init__(self, path: Path, threads: int):
        self.interpreter = interpreter_class()(model_path=str(path), num_threads=threads)

    def signatures(self) -> list[str]:
        return list(self.interpreter.get_signature_list())

    def input_shapes(self, name: str) -> list[list[int]]:
        details = self.interpreter.get_signature_runner(name).get_input_details()
        return [[int(x) for x in details[n]["shape"]] for n in sorted(details, key=arg_order)]

    def prepare(self, name: str):
        runner = self.interpreter.get_signature_runner(name)
        w, sg, inputs, _ = signature_io(runner)
        w.AllocateTensors(sg)
        for n, spec in runner.get_input_details().items():
            w.SetTensor(inputs[n], np.zeros(spec["shape"], dtype=spec["dtype"]), sg)
        return lambda: w.Invoke(sg)


class CompiledFile:
    """The file in LiteRT's CompiledModel on the CPU (XNNPACK), with `cache` as its XNNPACK weight cache path."""

    def __init__(self, path: Path, threads: int, cache: str):
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.options import CpuOptions, Options

        opts = Options(cpu_options=CpuOptions(num_threads=threads, xnnpack_weight_cache_path=cache))
        self.model = CompiledModel.from_file(str(path), options=opts)

    def signatures(self) -> list[str]:
        return list(self.model.get_signature_list())

    def input_shapes(self, name: str) -> list[list[int]]:
        details = self.model.get_input_tensor_details(name)
        return [list(details[n]["shape"]) for n in self.model.get_signature_list()[name]["inputs"]]

    def prepare(self, name: str):
        index = self.model.get_signature_index(name)
        details = self.model.get_input_tensor_details(name)
        inputs = self.model.create_input_buffers(index)
        for buf, n in zip(inputs, self.model.get_signature_list()[name]["inputs"]):
            buf.write(np.zeros(details[n]["shape"], dtype=details[n]["dtype"]))  # new buffers hold garbage
        outputs = self.model.create_output_buffers(index)
        return lambda: self.model.run_by_index(index, inputs, outputs)


def memory(path: Path, api: str, threads: int) -> dict:
    """In the calling (fresh) process: load `path` with `api` and run each signature once, reading VmRSS as it goes."""
    out = {"rss_start_mb": round(rss_mb(), 1)}
    t0 = time.perf_counter()
    held = InterpreterFile(path, threads) if api == "interpreter" else CompiledFile(path, threads, ":memory:" if api == "compiled+cache" else "")
    out["load_s"] = round(time.perf_counter() - t0, 3)
    out["rss_loaded_mb"] = round(rss_mb(), 1)
    for name in sorted(held.signatures(), key=lambda s: s != "decode"):  # decode first: the step a generation loop repeats
        call = held.prepare(name)
        t0 = time.perf_counter()
        call()
        out[f"first_run_s_{name}"] = round(time.perf_counter() - t0, 3)
        out[f"rss_after_{name}_mb"] = round(rss_mb(), 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if "decode" in held.signatures():
        out["cache_slots"] = held.input_shapes("decode")[3][1]  # after input_ids, input_pos, mask: keys [kv_heads, slots, head_dim]
    return out


def latency(path: Path, order: list[bool], threads: int, reps: int) -> dict[str, float]:
    """In the calling (fresh) process: the decode signature loaded as the agent loads it, without and with the weight
    cache (in `order`), called interleaved; median ms of each."""
    from bench_tflite import interleaved

    from edgeq.agent.runtimes import load

    calls = {}
    for weight_cache in order:
        model = load(path, threads, "decode", weight_cache=weight_cache)
        model.prepare({s["name"]: np.zeros(s["shape"], dtype=s["dtype"]) for s in model.signature()})
        calls["compiled+cache" if weight_cache else "interpreter"] = model.run
    return {k: v["median_ms"] for k, v in interleaved(calls, reps).items()}


def fresh(fn, *args):
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=4, help="fresh processes for the latency, the load order alternated")
    ap.add_argument("--made-by", default="", help="how the files were made (recorded in OUT.md)")
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/probe_tflite_memory.py"] + sys.argv[1:])
    rows = {}
    for path in args.files:
        meta = path.with_name(path.name + ".json")
        meta = read_json(meta) if meta.is_file() else {}
        row = {"size_mb": round(path.stat().st_size / 1e6, 1), "variant": meta.get("variant"), "recipe": meta.get("recipe")}
        for api in APIS:
            log(f"{path.name}: memory, {api}")
            row[api] = fresh(memory, path, api, args.threads)
        rows[path.name] = row
        if not row["interpreter"].get("cache_slots"):
            continue  # no decode signature to time
        log(f"{path.name}: decode latency, {args.rounds} rounds")
        rounds = [fresh(latency, path, [r % 2 == 1, r % 2 == 0], args.threads, args.reps) for r in range(args.rounds)]
        row["decode_ms"] = {k: {"median": round(statistics.median(r[k] for r in rounds), 3),
                                "rounds": [round(r[k], 3) for r in rounds]} for k in rounds[0]}
    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "runtime": runtime_version(), "threads": args.threads, "reps": args.reps, "rounds": args.rounds, "made_by": args.made_by,
              "apis": APIS, "rows": rows}
    write_result(args.out, result, markdown(result))


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Resident memory and decode latency of TFLite files in LiteRT by API ({result['runtime']}, XNNPACK)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']} on {m.get('cpu', '?')} ({m['cores']} cores). Files: {result['made_by'] or 'as given'} "
             "(variant / recipe from each FILE.json; none beside ai-edge-quantizer's files). Memory: each file and API in a "
             "fresh process (numpy and LiteRT imported, no torch): load, run each signature once on zero inputs (decode "
             "first), VmRSS after each; peak is ru_maxrss. APIs:", ""]
    lines += [f"- {k}: {v}" for k, v in result["apis"].items()]
    lines += ["", "| file | variant / recipe | MB on disk | cache slots | API | load s | RSS before load MB | RSS loaded MB | RSS after decode MB | "
              "RSS after all signatures MB | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        for api in result["apis"]:
            r = row[api]
            last = [k for k in r if k.startswith("rss_after_")][-1]
            made = " / ".join(x for x in (row.get("variant"), row.get("recipe")) if x) or "-"
            lines.append(f"| {name} | {made} | {row['size_mb']} | {r.get('cache_slots', '-')} | {api} | {r['load_s']} | "
                         f"{r['rss_start_mb']:.0f} | {r['rss_loaded_mb']:.0f} | {r.get('rss_after_decode_mb', float('nan')):.0f} | "
                         f"{r[last]:.0f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", f"Decode step latency at {result['threads']} thread(s), loaded as the agent loads it (edgeq.agent.runtimes.load, "
              "inputs set once, each call invokes and reads the outputs), without and with weight_cache interleaved in one "
              f"process, median of {result['reps']} calls; median over {result['rounds']} fresh processes (load order "
              "alternated), each process's median listed.", "",
              "| file | interpreter ms | compiled+cache ms | compiled+cache / interpreter | interpreter per process | compiled+cache per process |",
              "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        if "decode_ms" not in row:
            continue
        d = row["decode_ms"]
        a, b = d["interpreter"], d["compiled+cache"]
        lines.append(f"| {name} | {a['median']:.2f} | {b['median']:.2f} | {b['median'] / a['median']:.3f} | "
                     f"{' / '.join(f'{x:.2f}' for x in a['rounds'])} | {' / '.join(f'{x:.2f}' for x in b['rounds'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
