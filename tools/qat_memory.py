"""Training memory and step time of full QAT (LSQ) vs LR-QAT vs scales-only on a real-size model (SmolLM2-135M).

A few steps only (no quality claim): each method in its own process, 1 torch thread.
`peak_rss_mb` is the whole process's high-water mark, set-up included (loading the fp32 model and
converting its layers); `train_peak_rss_mb` the high-water mark of the training steps alone: after
set-up, memory freed by it is handed back to the OS (glibc malloc_trim) and the kernel's mark is
reset (/proc/self/clear_refs 5), so it counts what training holds: the model as trained, gradients,
optimizer moments, activations. `qat_state_mb` is the stored tensors of the QAT layers plus
gradient and two AdamW moments per trainable value. Writes benchmarks/qat_memory.json and .md.
    .venv/bin/python tools/qat_memory.py --model smollm2-135m --steps 3 --batch 1 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_kb(key: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key + ":")).split()[1])


def _reset_peak() -> int:
    """Return freed heap to the OS and restart the kernel's RSS high-water mark; the RSS now, in KiB."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def one(cfg: dict) -> dict:
    import gc

    import torch

    from edgeq.quantize.qat_loop import QATConfig, build

    config = QATConfig(**cfg)
    prepared, opt, windows, _ = build(config)
    model = prepared.model
    model.train()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gc.collect()
    train_start_kb = _reset_peak()
    times = []
    for step in range(config.steps):
        t = time.perf_counter()
        ids = torch.from_numpy(windows[step * config.batch : (step + 1) * config.batch].copy())
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in prepared.trainable().values())
    stored = sum(t.numel() * t.element_size() for m in prepared.layers.values() for t in list(m.parameters()) + list(m.buffers()))
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train_peak_kb = _status_kb("VmHWM")
    return {"method": config.method, "rank": config.rank if config.method == "lr-qat" else None, "base_dtype": config.base_dtype,
            "trainable_params": trainable, "qat_state_mb": round((stored + 12 * trainable) / 2**20, 1),
            "peak_rss_mb": round(rss1 / 1024, 1), "rss_growth_mb": round((rss1 - rss0) / 1024, 1),
            "train_start_rss_mb": round(train_start_kb / 1024, 1), "train_peak_rss_mb": round(train_peak_kb / 1024, 1),
            "step_seconds_median": round(sorted(times)[len(times) // 2], 2), "steps": config.steps, "last_loss": round(loss.item(), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="w4a16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr-qat", nargs="+", default=["16:fp32", "16:q4.4"], metavar="RANK:BASE",
                    help="LR-QAT runs as rank:base_dtype (default 16:fp32 16:q4.4)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "qat_memory"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(json.loads(a.one))))
        return
    base = dict(model=a.model, recipe=a.recipe, steps=a.steps, batch=a.batch, seq_len=a.seq_len, eval_windows=0)
    lr_qat = [(int(r), b) for r, b in (x.split(":", 1) for x in a.lr_qat)]
    configs = ([dict(base, method="lsq", lr=1e-4)] + [dict(base, method="lr-qat", lr=1e-3, rank=r, base_dtype=b) for r, b in lr_qat]
               + [dict(base, method="scales", lr=1e-4)])
    runs, t0 = [], time.time()
    for cfg in configs:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"run failed: {cfg}")
        runs.append(json.loads(line[0][7:]))
        print(json.dumps(runs[-1]), flush=True)
    out = {"command": " ".join([Path(sys.executable).name, "tools/qat_memory.py"] + sys.argv[1:]), "model": a.model, "recipe": a.recipe,
           "scale_note": f"{a.steps} training steps of {a.batch} x {a.seq_len} tokens per method, 1 thread, 2 shared CPU cores "
                         "(other jobs running: step times are noisy); memory and speed only, no quality claim",
           "wall_seconds": round(time.time() - t0, 1), "runs": runs}
    Path(a.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# QAT training memory on {a.model} ({a.recipe})", "", f"Command: `{out['command']}`", "", out["scale_note"] + ".", "",
             "| method | rank | base dtype | trainable params | QAT-layer state MB | peak RSS MB (whole process) | "
             "training peak RSS MB | vs LSQ | step s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lsq = next((r for r in runs if r["method"] == "lsq"), None)
    for r in runs:
        ratio = f"{r['train_peak_rss_mb'] / lsq['train_peak_rss_mb']:.2f}" if lsq else "-"
        lines.append(f"| {r['method']} | {r['rank'] or ''} | {r['base_dtype'] if r['method'] == 'lr-qat' else ''} | {r['trainable_params']} | "
                     f"{r['qat_state_mb']} | {r['peak_rss_mb']} | {r['train_peak_rss_mb']} | {ratio} | {r['step_seconds_median']} |")
    lines += ["", "Training peak RSS: the high-water mark of the training steps alone (set-up memory freed first with malloc_trim, "
              "the mark reset with /proc/self/clear_refs), what the LR-QAT paper's memory comparison is about. The whole-process "
              "peak includes loading the fp32 model and converting its layers, which every method pays once.", "",
              "Every method runs as `edgeq qat` does: with glibc's mmap threshold fixed at 64 KiB (`return_freed_memory`), so "
              "freed per-layer temporaries go back to the OS. With glibc's default (a threshold that grows to the largest "
              "block freed) the same runs measured LSQ 5,837 MB, LR-QAT fp32 base 2,642 MB, Q4.4 base 2,476 MB and scales-only "
              "4,237 MB (2026-12-01, commit 8f514b6): freed temporaries stayed resident, hiding most of LR-QAT's saving."]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
