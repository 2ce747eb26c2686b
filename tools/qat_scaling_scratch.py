"""The QAT scaling law measured from scratch: delta = k * D^gD * (log2 G)^gG / N^gN.

Protocol (the issue's, at the scale 2 CPU cores allow; the JSON's `protocol` says what was run):
byte-level Llama-style models (4 layers; 0.2M-2M non-embedding parameters) are trained FROM
SCRATCH on the enwiki calibration half, every run from the same seeded initialisation and on the
same batches, either in FP32 (the reference) or with LSQ fake quantization of every linear but the
head from step 0 (W4A4 at G = 32 / 128 / per-channel; W4A16, W16A4 and W4A4 with an 8-bit FC2
(down_proj) input at G = 128). All parameters train (embeddings, norms, head, and the LSQ weight
scales); activations are quantized dynamically per group (per token for per-channel weights).
The learning rate warms up linearly and then stays constant, so every checkpoint D (D_max / 8,
/ 4, / 2, D_max) is a point of the same run: delta(N, D, G) = eval loss(QAT) - eval loss(FP32) at
the same tokens. The fit uses the W4A4 points: Huber loss on log delta, L-BFGS over
(log k, gD, gG, gN) in log space (tools/qat_scaling.fit). Per-layer input kurtosis of the FP32
models, and how much the 8-bit FC2 input reduces delta, are recorded.

    .venv/bin/python tools/qat_scaling_scratch.py --jobs 2

Finished runs are kept in ~/.cache/edgeq/qat_scaling/ (keyed by their settings), so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from qat_scaling import SIZES, effective_log2_group, fit, make_model, non_embedding_params, recipe  # noqa: E402

# (label, weight bits, activation bits, group (None = per channel / per token), FC2 input bits)
VARIANTS = [("FP32", None, None, 128, None), ("W4A4", 4, 4, 32, None), ("W4A4", 4, 4, 128, None), ("W4A4", 4, 4, None, None),
            ("W4A16", 4, None, 128, None), ("W16A4", None, 4, 128, None), ("W4A4-FC2A8", 4, 4, 128, 8)]
CACHE = Path(os.environ.get("EDGEQ_CACHE", Path.home() / ".cache" / "edgeq")) / "qat_scaling"


def checkpoints(steps: int, count: int) -> list[int]:
    """Step counts D_max / 2^(count-1), ..., D_max / 2, D_max."""
    return [steps >> k for k in reversed(range(count))]


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Linear warm-up, then constant (every checkpoint comparable) or cosine to zero at the last step (only the
    end is annealed, and so less noisy)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return 1.0


def train(job: dict) -> dict:
    """One run: train `job['size']` from scratch as `job['variant']`, evaluating at each checkpoint."""
    import numpy as np
    import torch

    from edgeq.data import lm_windows
    from edgeq.models import ModelBundle
    from edgeq.models.tokenizers import ByteTokenizer
    from edgeq.quantize.diagnostics import input_kurtosis
    from edgeq.quantize.qat import prepare_qat
    from edgeq.quantize.qat_loop import eval_loss, is_scale

    torch.set_num_threads(1)
    t0 = time.time()
    name, wb, ab, group, fc2 = job["variant"]
    tok = ByteTokenizer()
    windows = lm_windows(tok, "enwiki", "calibration", job["seq_len"], job["steps"] * job["batch"], seed=0)
    model = make_model(job["size"], seed=job.get("seed", 0))  # another seed only for the noise runs
    n_params = non_embedding_params(model)
    groups = [{"params": list(model.parameters()), "lr": job["lr"]}]
    if name != "FP32":
        prepared = prepare_qat(ModelBundle(model, "causal-lm", f"scratch-{job['size']}", tok),
                               recipe(wb, ab, group, fc2, fold_norms=False), "lsq")
        for p in model.parameters():  # from scratch everything trains, not only the quantized layers
            p.requires_grad_(True)
        scales = {id(p) for n, p in prepared.trainable().items() if is_scale(n)}
        groups = [{"params": [p for p in model.parameters() if id(p) not in scales], "lr": job["lr"]}]
        # LSQ scales move ~1% of their size per step at most, as in the QAT command
        groups += [{"params": [p], "lr": 1e-2 * float(p.detach().abs().mean())} for n, p in prepared.trainable().items() if is_scale(n)]
    for g in groups:
        g["initial_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warmup = max(1, int(job["warmup_frac"] * job["steps"]))
    marks = set(checkpoints(job["steps"], job["checkpoints"]))
    rows = []
    model.train()
    for step in range(job["steps"]):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor(step, job["steps"], warmup, job.get("schedule", "constant"))
        ids = torch.from_numpy(np.ascontiguousarray(windows[step * job["batch"] : (step + 1) * job["batch"]]))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step + 1 in marks:
            rows.append({"D": (step + 1) * job["batch"] * job["seq_len"], "loss": eval_loss(model, tok, "enwiki", job["seq_len"], job["eval_windows"]),
                         "train_loss": loss.item()})
            model.train()
    out = {"size": job["size"], "N": n_params, "variant": name, "group": group or "channel", "seed": job.get("seed", 0),
           "log2G": round(effective_log2_group(make_model(job["size"], 0), group), 4), "checkpoints": rows,
           "seconds": round(time.time() - t0, 1)}
    if name == "FP32":
        model.eval()
        calib = [(torch.from_numpy(windows[i : i + 4]),) for i in range(0, 16, 4)]
        out["kurtosis"] = {n: v["kurtosis"] for n, v in input_kurtosis(model, calib).items() if not n.endswith("lm_head")}
    return out


def job_key(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def run_all(jobs: list[dict], workers: int) -> list[dict]:
    """Every job's result, from the cache where a run already finished."""
    CACHE.mkdir(parents=True, exist_ok=True)
    done, todo = {}, []
    for job in jobs:
        path = CACHE / f"{job_key(job)}.json"
        if path.exists():
            done[job_key(job)] = json.loads(path.read_text())
        else:
            todo.append(job)
    print(f"{len(done)} runs cached, {len(todo)} to train", flush=True)
    failed = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(train, job): job for job in todo}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # the other runs go on; this one is reported and the sweep fails at the end
                failed.append(f"{job['size']} {job['variant'][0]} G={job['variant'][3]}: {type(exc).__name__}: {exc}")
                print("FAILED " + failed[-1], flush=True)
                continue
            path = CACHE / f"{job_key(job)}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res))
            tmp.replace(path)
            done[job_key(job)] = res
            print(json.dumps({k: res[k] for k in ("size", "variant", "group", "seconds")} | {"last": res["checkpoints"][-1]}), flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} runs failed (finished runs are cached; fix and re-run): {failed[0]}")
    return [done[job_key(job)] for job in jobs]


def analyse(runs: list[dict]) -> dict:
    """Deltas per (size, variant, G, D), the W4A4 fit, the FC2 reduction and the kurtosis summary."""
    fp = {(r["size"], c["D"]): c["loss"] for r in runs if r["variant"] == "FP32" and not r.get("seed") for c in r["checkpoints"]}
    # the noise floor: FP32 from another initialisation (same data order) minus the reference
    noise = {f"{r['size']}@D={c['D']}": c["loss"] - fp[(r["size"], c["D"])] for r in runs if r.get("seed") for c in r["checkpoints"]}
    results = [{"size": r["size"], "N": r["N"], "variant": r["variant"], "group": r["group"], "log2G": r["log2G"], "D": c["D"],
                "loss": c["loss"], "fp_loss": fp[(r["size"], c["D"])], "delta": c["loss"] - fp[(r["size"], c["D"])]}
               for r in runs if r["variant"] != "FP32" for c in r["checkpoints"]]
    w4a4 = [r for r in results if r["variant"] == "W4A4"]
    pts = [r for r in w4a4 if r["delta"] > 0]
    law = fit(pts) if len(pts) >= 4 else None
    pick = {(r["size"], r["D"], r["variant"]): r["delta"] for r in results if r["group"] == 128}
    fc2 = {}
    for size, D in sorted({(r["size"], r["D"]) for r in results}, key=lambda x: (list(SIZES).index(x[0]), x[1])):
        d = {v: pick[(size, D, v)] for v in ("W4A16", "W16A4", "W4A4", "W4A4-FC2A8")}
        d["fc2_reduction"] = (1 - d["W4A4-FC2A8"] / d["W4A4"]) if d["W4A4"] > 0 else None
        d["sum_of_parts"] = d["W4A16"] + d["W16A4"]
        fc2[f"{size}@D={D}"] = d
    reductions = [v["fc2_reduction"] for v in fc2.values() if v["fc2_reduction"] is not None]
    kurt = {r["size"]: r["kurtosis"] for r in runs if r["variant"] == "FP32" and not r.get("seed")}
    kurt_summary = {s: {"down_proj_mean": _mean(v for n, v in k.items() if "down_proj" in n),
                        "others_mean": _mean(v for n, v in k.items() if "down_proj" not in n)} for s, k in kurt.items()}
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    scale = {"median_abs_w4a4_delta": med([abs(r["delta"]) for r in w4a4]), "median_abs_seed_noise": med([abs(v) for v in noise.values()])}
    return {"fit": law, "fit_dropped_nonpositive_points": len(w4a4) - len(pts), "fc2_8bit": fc2, "signal_vs_noise": scale,
            "fc2_reduction_median": med(reductions),
            "kurtosis": kurt, "kurtosis_summary": kurt_summary, "results": results, "fp32_seed_noise": noise,
            "fp_losses": {f"{s}@D={D}": v for (s, D), v in fp.items()}}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def render(out: dict) -> str:
    law = out["fit"]
    lines = ["# QAT scaling law from scratch", "", f"Command: `{out['command']}`", "", out["protocol"], "",
             f"Fit ({out['formula']}): " + (json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in law.items()}) if law else "too few positive points"),
             f"(W4A4 points with delta <= 0, left out of the log-space fit: {out['fit_dropped_nonpositive_points']})", ""]
    sn = out["signal_vs_noise"]
    if sn["median_abs_seed_noise"] is not None:
        verdict = ("the deltas are within the noise floor: the fit and the reductions below are NOT measurements of the law"
                   if sn["median_abs_seed_noise"] >= 0.5 * sn["median_abs_w4a4_delta"] else "the deltas stand above the noise floor")
        lines += [f"**Signal vs noise:** median |W4A4 delta| {sn['median_abs_w4a4_delta']:.4f} nats, median |FP32 seed-to-seed "
                  f"difference| {sn['median_abs_seed_noise']:.4f}: {verdict}.", ""]
    lines += [
             "FP32 eval loss (nats/byte) at each D:", "", "| model | N (non-emb) | " + " | ".join(f"D={D}" for D in out["D"]) + " |",
             "|---|---|" + "---|" * len(out["D"])]
    for size in out["sizes"]:
        n = next(r["N"] for r in out["results"] if r["size"] == size)
        lines.append(f"| {size} | {n:,} | " + " | ".join(f"{out['fp_losses'][f'{size}@D={D}']:.4f}" for D in out["D"]) + " |")
    if out["fp32_seed_noise"]:
        lines += ["", "Noise floor: FP32 trained from another seed (same batches) minus the reference, at each D: " + ", ".join(
            f"{k} {v:+.4f}" for k, v in out["fp32_seed_noise"].items()) + ". Deltas of this size are not measurements."]
    lines += ["", "delta = eval loss(QAT) - eval loss(FP32) at the same tokens:", "",
              "| model | variant | G | " + " | ".join(f"D={D}" for D in out["D"]) + " |", "|---|---|---|" + "---|" * len(out["D"])]
    by = {(r["size"], r["variant"], r["group"], r["D"]): r["delta"] for r in out["results"]}
    for size in out["sizes"]:
        for name, _, _, g, _ in VARIANTS[1:]:
            g = g or "channel"
            lines.append(f"| {size} | {name} | {g} | " + " | ".join(f"{by[(size, name, g, D)]:+.4f}" for D in out["D"]) + " |")
    lines += ["", "Error decomposition and the 8-bit FC2 (down_proj) input, G = 128:", "",
              "| point | W4A16 | W16A4 | sum | W4A4 | W4A4-FC2A8 | FC2A8 reduction |", "|---|---|---|---|---|---|---|"]
    for k, v in out["fc2_8bit"].items():
        red = "n/a" if v["fc2_reduction"] is None else f"{100 * v['fc2_reduction']:.0f}%"
        lines.append(f"| {k} | {v['W4A16']:+.4f} | {v['W16A4']:+.4f} | {v['sum_of_parts']:+.4f} | {v['W4A4']:+.4f} | {v['W4A4-FC2A8']:+.4f} | {red} |")
    med = out["fc2_reduction_median"]
    lines += ["", f"Median FC2A8 reduction over the points above: {'n/a' if med is None else f'{100 * med:.0f}%'} (the paper: 20-43%).", "",
              "Input kurtosis of the FP32 models after D_max (mean over layers): " + ", ".join(
                  f"{s}: down_proj {v['down_proj_mean']:.1f} vs others {v['others_mean']:.1f}" for s, v in out["kurtosis_summary"].items()),
              "", f"Training time {sum(r['seconds'] for r in out['runs']):,.0f} s over {len(out['runs'])} runs (two at a time; per run in "
              f"the JSON); this invocation {out['wall_seconds']:.0f} s (finished runs come from the cache)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["h64", "h96", "h128", "h208"], choices=list(SIZES))
    ap.add_argument("--tokens", type=int, default=1_000_000, help="D_max: training tokens of every run")
    ap.add_argument("--checkpoints", type=int, default=4, help="evaluate at D_max / 2^k for k < this")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                    help="lr after warm-up: constant (checkpoints comparable) or cosine to zero at D_max (use --checkpoints 1)")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    ap.add_argument("--noise-seed", type=int, default=1, help="also train FP32 from this seed per size (the noise floor; 0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "qat_scaling"))
    a = ap.parse_args()
    t0 = time.time()
    steps = a.tokens // (a.batch * a.seq_len)
    base = {"steps": steps, "batch": a.batch, "seq_len": a.seq_len, "lr": a.lr, "warmup_frac": a.warmup_frac,
            "eval_windows": a.eval_windows, "checkpoints": a.checkpoints}
    if a.schedule != "constant":
        base["schedule"] = a.schedule  # (absent for constant: the cached runs' keys stay valid)
    jobs = [dict(base, size=s, variant=list(v)) for s in a.sizes for v in VARIANTS]
    if a.noise_seed:
        jobs += [dict(base, size=s, variant=list(VARIANTS[0]), seed=a.noise_seed) for s in a.sizes]
    # the largest runs first, so the last ones to finish are short
    jobs.sort(key=lambda j: -SIZES[j["size"]]["hidden_size"] * (2 if j["variant"][0] != "FP32" else 1))
    runs = run_all(jobs, a.jobs)
    D = [s * a.batch * a.seq_len for s in checkpoints(steps, a.checkpoints)]
    out = {"command": " ".join([".venv/bin/python", "tools/qat_scaling_scratch.py"] + sys.argv[1:]),
           "protocol": (f"From scratch on 2 shared CPU cores (one thread per run): {len(a.sizes)} byte-level Llama models (4 layers, hidden "
                        f"{'/'.join(str(SIZES[s]['hidden_size']) for s in a.sizes)}), each trained {len(VARIANTS)} times from the same seeded "
                        f"initialisation on the same {steps} batches of {a.batch} x {a.seq_len} bytes (D_max = {steps * a.batch * a.seq_len:,} "
                        f"tokens): FP32, and LSQ QAT from step 0. AdamW lr {a.lr} (LSQ scales 1% of their size), linear warmup over "
                        f"{a.warmup_frac:.0%} of the steps, "
                        + (f"then constant, so the checkpoints at D = {', '.join(f'{d:,}' for d in D)} are points of one run and compared at "
                           "equal schedule" if a.schedule == "constant" else f"then cosine to zero at D = {D[-1]:,} (annealed; evaluated there)")
                        + f"; eval loss on {a.eval_windows} x {a.seq_len} bytes of the evaluation half. "
                        "D spans the bottom of the issue's 1M-10M range and below; N is 0.2M-2M non-embedding parameters as the issue asks. "
                        "One seed per run; the FP32 reference trained again from another seed gives the noise floor (below)."),
           "formula": "delta = k * D^gD * (log2 G)^gG / N^gN (W4A4 points)", "sizes": a.sizes, "D": D,
           "runs": [{**{k: r[k] for k in ("size", "N", "variant", "group", "seconds")}, "seed": r.get("seed", 0)} for r in runs],
           **analyse(runs), "wall_seconds": round(time.time() - t0, 1)}
    for suffix, text in ((".json", json.dumps(out, indent=2) + "\n"), (".md", render(out))):
        tmp = Path(a.out + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(a.out + suffix)


if __name__ == "__main__":
    main()
