"""QAT comparison: RTN vs full QAT (LSQ) vs LR-QAT at several ranks vs scales-only, at W4 and W3.

Each configuration runs in its own process (so peak RSS is per run) with 1 torch thread.
Writes benchmarks/qat_compare.json and .md. Example (the committed numbers):
    .venv/bin/python tools/qat_compare.py --model tiny-llama --bits 4 3 --steps 60 --batch 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def recipe_text(bits: int, group: int | None = None) -> str:
    grid = f'granularity = "group", group_size = {group}' if group else 'granularity = "channel"'
    return f"""name = "w{bits}-{f'g{group}' if group else 'c'}"
[[rules]]
match = "lm_head$"
skip = true
[[rules]]
match = ".*"
weight = {{ bits = {bits}, symmetric = true, {grid} }}
"""


def one(args: dict) -> dict:
    from edgeq.quantize.qat_loop import QATConfig, train

    cfg = QATConfig(**args["config"])
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prepared, rec = train(cfg)
    layers = prepared.layers.values()
    trainable = sum(p.numel() for p in prepared.trainable().values())
    stored = sum(t.numel() * t.element_size() for m in layers for t in list(m.parameters()) + list(m.buffers()))
    # training state of the QAT layers: stored tensors + gradient and two AdamW moments per trainable value
    state_mb = (stored + 3 * 4 * trainable) / 2**20
    return {
        "method": cfg.method, "rank": cfg.rank if cfg.method == "lr-qat" else None, "bits": args["bits"],
        "base_dtype": cfg.base_dtype if cfg.method == "lr-qat" else None,
        "eval_loss_rtn": rec["eval_loss_start"], "eval_loss": rec["eval_loss_end"],
        "ppl_rtn": math.exp(rec["eval_loss_start"]), "ppl": math.exp(rec["eval_loss_end"]),
        "trainable_params": trainable, "qat_state_mb": round(state_mb, 3),
        "peak_rss_mb": rec["peak_rss_mb"], "rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024, 1),
        "step_seconds": rec["step_seconds"], "steps": rec["steps_done"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--methods", nargs="+", default=["lsq", "scales", "lr-qat"], choices=["lsq", "scales", "lr-qat"])
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--group", type=int, default=None, help="weight groups of this size (default: one scale per output channel)")
    ap.add_argument("--base-dtype", default="fp32", choices=["fp32", "bf16", "q4.4", "int"], help="LR-QAT's frozen base Phi0")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "qat_compare"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (step times are then measured side by side)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", default=None, help="only re-render OUT.md from OUT.json")
    a = ap.parse_args()
    if a.render:
        Path(a.render + ".md").write_text(markdown(json.loads(Path(a.render + ".json").read_text())))
        return
    if a.one:
        print("RESULT " + json.dumps(one(json.loads(a.one))))
        return
    runs, t0 = [], time.time()
    rdir = Path("/tmp/edgeq-qat-compare")
    rdir.mkdir(exist_ok=True)
    all_jobs = []
    for bits in a.bits:
        rpath = rdir / f"w{bits}{f'g{a.group}' if a.group else 'c'}.toml"
        rpath.write_text(recipe_text(bits, a.group))
        base = dict(model=a.model, recipe=str(rpath), steps=a.steps, batch=a.batch, seq_len=a.seq_len, eval_windows=a.eval_windows)
        configs = [dict(base, method=m, lr=1e-4) for m in ("lsq", "scales") if m in a.methods]
        configs += [dict(base, method="lr-qat", lr=1e-3, rank=r, base_dtype=a.base_dtype) for r in a.ranks if "lr-qat" in a.methods]
        all_jobs += [(cfg, bits) for cfg in configs]
    # up to --jobs runs at once (each 1 torch thread): on 2 cores two runs take the time of one
    for i in range(0, len(all_jobs), a.jobs):
        procs = [(cfg, subprocess.Popen([sys.executable, __file__, "--one", json.dumps({"config": cfg, "bits": bits})],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
                 for cfg, bits in all_jobs[i:i + a.jobs]]
        for cfg, proc in procs:
            stdout, stderr = proc.communicate()
            line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
            if not line:
                print(stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"run failed: {cfg}")
            r = json.loads(line[0][7:])
            runs.append(r)
            print(json.dumps(r), flush=True)
    out = {"command": " ".join([Path(sys.executable).name, "tools/qat_compare.py"] + sys.argv[1:]), "model": a.model,
           "group": a.group,
           "scale_note": f"{a.model} on a 2-core CPU, 1 torch thread per run; "
                         f"{f'groups of {a.group}' if a.group else 'per-channel'} symmetric weights, float "
                         "activations; eval = next-token loss on evaluation windows disjoint from training",
           "jobs": a.jobs, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len, "eval_windows": a.eval_windows,
           "wall_seconds": round(time.time() - t0, 1), "runs": runs}
    Path(a.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    Path(a.out + ".md").write_text(markdown(out))


def _base(run: dict) -> str:
    """` (q4.4 base)` for an LR-QAT run whose frozen base is not fp32, else nothing."""
    return f" ({run['base_dtype']} base)" if run.get("base_dtype") not in (None, "fp32") else ""


def markdown(out: dict) -> str:
    """The Markdown table of a run's JSON (also: `python tools/qat_compare.py --render OUT` re-renders OUT.md)."""
    runs, n = out["runs"], out["seq_len"]
    lines = [f"# QAT comparison on {out['model']}", "", f"Command: `{out['command']}`", "", out["scale_note"] + ".",
             f"{out['steps']} steps x {out['batch']} x {n} tokens; eval {out['eval_windows']} windows of {n}. "
             f"Wall time {out['wall_seconds']} s." + (f" {out['note']}" if out.get("note") else ""), "",
             "| bits | method | rank | ppl RTN start | ppl after | trainable params | QAT-layer state MB | peak RSS MB | step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        method = r["method"] + _base(r)
        lines.append(f"| W{r['bits']} | {method} | {r['rank'] or ''} | {r['ppl_rtn']:.4f} | {r['ppl']:.4f} | {r['trainable_params']} | "
                     f"{r['qat_state_mb']} | {r['peak_rss_mb']} | {r['step_seconds']} |")
    lines += ["", "## LR-QAT against full QAT (target: ppl within 2% of LSQ's)", ""]
    for r in (r for r in runs if r["method"] == "lr-qat"):
        lsq = next((x for x in runs if x["method"] == "lsq" and x["bits"] == r["bits"]), None)
        if lsq:
            ratio = r["ppl"] / lsq["ppl"]
            verdict = ("no comparison: full QAT did not improve on its RTN start" if lsq["ppl"] >= lsq["ppl_rtn"]
                       else "met" if ratio <= 1.02 else "NOT met")
            lines.append(f"- W{r['bits']} rank {r['rank']}{_base(r)}: ppl {r['ppl']:.3f} vs LSQ {lsq['ppl']:.3f} = {ratio:.4f}x "
                         f"({verdict}); whole-process peak RSS {r['peak_rss_mb'] / lsq['peak_rss_mb']:.2f}x LSQ's")
    tiny = out["model"] == "tiny-llama"
    lines += ["", ("Peak RSS is dominated by the Python/transformers runtime at this model size; the " if tiny else "The ")
              + "QAT-layer state column (stored tensors of the QAT layers + gradient and two AdamW moments per trainable "
              "value) is the memory that scales with the model; tools/qat_memory.py measures the training phase's own peak."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
