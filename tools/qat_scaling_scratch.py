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
the same tokens. That first protocol's deltas were within its noise (benchmarks/qat_scaling_v1_constant.md);
the measurement (benchmarks/qat_scaling.md) trains on batches of 2 windows (four times the optimizer
steps per token: the FP32 loss at 250K tokens 2.18 against 2.34 with batches of 8, three seeds
spread over 0.007 instead of 0.030), gives each size its own learning rate (`--lr-grid`: the best
for FP32 at D_max / 4; one rate for all made the 0.8M model's FP32 reference worse than the 0.2M
model and every QAT variant "better" than FP32), decays the learning rate to zero before every
checkpoint in a branch of the run (`--schedule wsd`), evaluates on 256 windows, and repeats every run
from several seeds (`--seeds`), each QAT run paired with the FP32 run of its seed. The fit uses the
W4A4 points: Huber loss on log delta, L-BFGS over (log k, gD, gG, gN) in log space
(tools/qat_scaling.fit). Per-layer input kurtosis of the FP32 models, the W4A16 / W16A4
decomposition and how much the 8-bit FC2 input reduces delta are recorded.

    .venv/bin/python tools/qat_scaling_scratch.py --jobs 2                # the first protocol
    .venv/bin/python tools/qat_scaling_scratch.py --sizes h64 h128 h208 --lr-grid 4e-3 2e-3 1e-3 5e-4 2.5e-4 \
        --checkpoints 3 --batch 2 --schedule wsd --seeds 3 --eval-windows 256 --jobs 2   # the measurement
    .venv/bin/python tools/qat_scaling_scratch.py --sizes h64 --tokens 4000000 --lr-grid 4e-3 2e-3 1e-3 5e-4 2.5e-4 \
        --checkpoints 5 --batch 2 --schedule wsd --seeds 2 --eval-windows 256 --jobs 2 \
        --out benchmarks/qat_scaling_h64_4M                                            # the 0.2M model to 4M tokens
    .venv/bin/python tools/qat_scaling_scratch.py --sizes h128 --tokens 2000000 --lr h128=5e-4 --checkpoints 4 \
        --batch 2 --schedule wsd --seeds 2 --eval-windows 256 --jobs 2 \
        --out benchmarks/qat_scaling_h128_2M                                           # the 0.8M model to 2M tokens

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
    """Linear warm-up, then constant (every checkpoint comparable; also the stable phase of "wsd", whose
    decays run in branches, see `decay_branch`) or cosine to zero at the last step (only the end is annealed)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return 1.0


def fork_steps(steps: int, count: int, decay_frac: float) -> dict[int, int]:
    """For the "wsd" schedule: {step where a decay branch leaves the stable run: the checkpoint it ends at}."""
    return {round((1 - decay_frac) * end): end for end in checkpoints(steps, count)}


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
    seed = job.get("seed", 0)
    # with --seeds every seed draws its own training windows and initialisation; a seed's FP32 and QAT runs share both
    windows = lm_windows(tok, "enwiki", "calibration", job["seq_len"], job["steps"] * job["batch"], seed=seed if job.get("vary_data") else 0)
    model = make_model(job["size"], seed=seed)
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
    schedule = job.get("schedule", "constant")
    rows = []

    def batch(step):
        return torch.from_numpy(np.ascontiguousarray(windows[step * job["batch"] : (step + 1) * job["batch"]]))

    def train_step(step, factor):
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * factor
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    def evaluate(end, train_loss):
        rows.append({"D": end * job["batch"] * job["seq_len"], "train_loss": train_loss,
                     "loss": eval_loss(model, tok, "enwiki", job["seq_len"], job["eval_windows"])})
        model.train()

    model.train()
    if schedule == "wsd":
        # warm-up, stable, and for every checkpoint D a branch that leaves the stable run at 0.8 D and decays the
        # learning rate linearly to zero at D on the batches the run would have seen next (warmup-stable-decay:
        # each D is evaluated annealed, as a cosine run to D would be, at ~1.15x the cost of one run to D_max).
        forks = fork_steps(job["steps"], job["checkpoints"], job["decay_frac"])
        for step in range(max(forks)):
            if step in forks:
                decay_branch(model, opt, train_step, evaluate, step, forks[step])
            train_step(step, lr_factor(step, job["steps"], warmup, schedule))
        # the last branch needs no copy: the run ends with it
        decay_branch(model, opt, train_step, evaluate, max(forks), forks[max(forks)], restore=False)
    else:
        marks = set(checkpoints(job["steps"], job["checkpoints"]))
        for step in range(job["steps"]):
            last = train_step(step, lr_factor(step, job["steps"], warmup, schedule))
            if step + 1 in marks:
                evaluate(step + 1, last)
    out = {"size": job["size"], "N": n_params, "variant": name, "group": group or "channel", "seed": seed,
           "log2G": round(effective_log2_group(make_model(job["size"], 0), group), 4), "checkpoints": rows,
           "seconds": round(time.time() - t0, 1)}
    if name == "FP32":
        model.eval()
        calib = [(torch.from_numpy(windows[i : i + 4]),) for i in range(0, 16, 4)]
        out["kurtosis"] = {n: v["kurtosis"] for n, v in input_kurtosis(model, calib).items() if not n.endswith("lm_head")}
    return out


def decay_branch(model, opt, train_step, evaluate, start: int, end: int, restore: bool = True) -> None:
    """Decay the learning rate linearly from the stable value to zero over steps [start, end), evaluate at
    `end`, then (with `restore`) put the model and optimizer back as they were at `start`."""
    import copy

    if restore:
        saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        saved_opt = copy.deepcopy(opt.state_dict())
    for step in range(start, end):
        last = train_step(step, (end - step) / (end - start))
    evaluate(end, last)
    if restore:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)


def job_key(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def run_all(jobs: list[dict], workers: int, train_missing: bool = True) -> list[dict]:
    """Every job's result, from the cache where a run already finished (with `train_missing` false, only those)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    done, todo = {}, []
    for job in jobs:
        path = CACHE / f"{job_key(job)}.json"
        if path.exists():
            done[job_key(job)] = json.loads(path.read_text())
        else:
            todo.append(job)
    print(f"{len(done)} runs cached, {len(todo)} to train" if train_missing else f"{len(done)} runs cached, {len(todo)} left out", flush=True)
    if not train_missing:
        return [done[job_key(job)] for job in jobs if job_key(job) in done]
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
    """Deltas per (size, variant, G, D) with their spread over seeds, the W4A4 fit, the error decomposition,
    the FC2 reduction and the kurtosis summary.

    A QAT run's delta is taken against the FP32 run of its own seed (same initialisation and batches); a
    point's delta is the mean over its seeds, and its standard error comes from the seed-to-seed spread
    pooled over the points of its model size (so two seeds still give the noise estimate many degrees of
    freedom). With one seed only, FP32 runs from other seeds (--noise-seed) give the old, coarser floor:
    their distance from the reference."""
    fp = {(r["size"], r.get("seed", 0), c["D"]): c["loss"] for r in runs if r["variant"] == "FP32" for c in r["checkpoints"]}
    qat_seeds = {r.get("seed", 0) for r in runs if r["variant"] != "FP32"}
    points: dict[tuple, dict[int, float]] = {}  # (size, variant, G, D) -> {seed: delta}
    meta = {}
    for r in runs:
        if r["variant"] == "FP32":
            continue
        for c in r["checkpoints"]:
            ref = (r["size"], r.get("seed", 0), c["D"])
            if ref not in fp:  # its seed's FP32 run has not finished (an interrupted sweep, --no-train)
                continue
            key = (r["size"], r["variant"], r["group"], c["D"])
            points.setdefault(key, {})[r.get("seed", 0)] = c["loss"] - fp[ref]
            meta[key] = {"N": r["N"], "log2G": r["log2G"]}
    results = []
    for (size, variant, group, D), by_seed in points.items():
        seeds = sorted(by_seed)
        results.append({"size": size, **meta[(size, variant, group, D)], "variant": variant, "group": group, "D": D,
                        "delta": _mean(by_seed.values()), "seeds": seeds, "seed_deltas": [by_seed[k] for k in seeds],
                        "fp_loss": _mean(fp[(size, k, D)] for k in seeds)})
    # the noise is pooled per model size (its variants x D points), as smaller models may scatter more
    pooled = {size: _pooled_sd([r["seed_deltas"] for r in results if r["size"] == size]) for size in {r["size"] for r in results}}
    for r in results:
        r["se"] = None if pooled[r["size"]] is None else pooled[r["size"]] / math.sqrt(len(r["seed_deltas"]))
    # FP32 seed-to-seed: every FP32 run against seed 0's at the same point
    noise = {f"{size}@D={D}/seed{k}": v - fp[(size, 0, D)] for (size, k, D), v in fp.items() if k != 0 and (size, 0, D) in fp}
    w4a4 = [r for r in results if r["variant"] == "W4A4"]
    pts = [r for r in w4a4 if r["delta"] > 0]
    law = fit(pts) if len(pts) >= 4 else None
    # the same fit on each seed's deltas alone: how far the exponents move with the seed
    per_seed = []
    for k in sorted(qat_seeds) if len(qat_seeds) > 1 else []:
        mine = [dict(r, delta=d) for r in w4a4 for seed, d in zip(r["seeds"], r["seed_deltas"]) if seed == k and d > 0]
        per_seed.append(fit(mine) if len(mine) >= 4 else None)
    # and on the points above two standard errors only: how much the exponents owe to points within the noise
    clear = [r for r in w4a4 if r["se"] is not None and r["delta"] > 2 * r["se"]]
    law_clear = fit(clear) if len(clear) >= 4 and len(clear) < len(pts) else None
    pick = {(r["size"], r["D"], r["variant"]): r for r in results if r["group"] == 128}
    fc2 = {}
    parts = ("W4A16", "W16A4", "W4A4", "W4A4-FC2A8")
    for size, D in sorted({(r["size"], r["D"]) for r in results}, key=lambda x: (list(SIZES).index(x[0]), x[1])):
        if any((size, D, v) not in pick for v in parts):
            continue
        d = {v: pick[(size, D, v)]["delta"] for v in parts}
        d["sum_of_parts"] = d["W4A16"] + d["W16A4"]
        # W4A4 minus W4A4-FC2A8 seed by seed (their FP32 reference cancels): what the 8-bit input saves, with its spread
        a4 = dict(zip(pick[(size, D, "W4A4")]["seeds"], pick[(size, D, "W4A4")]["seed_deltas"]))
        a8 = dict(zip(pick[(size, D, "W4A4-FC2A8")]["seeds"], pick[(size, D, "W4A4-FC2A8")]["seed_deltas"]))
        paired = [k for k in sorted(a4) if k in a8]
        saved = [a4[k] - a8[k] for k in paired]
        d["fc2_saving"] = _mean(saved)
        d["fc2_saving_seeds"] = saved
        # the reduction over the seeds both variants have (an interrupted sweep may lack some of one)
        base = _mean(a4[k] for k in paired)
        d["fc2_reduction"] = d["fc2_saving"] / base if base > 0 else None
        fc2[f"{size}@D={D}"] = d
    reductions = [v["fc2_reduction"] for v in fc2.values() if v["fc2_reduction"] is not None]
    for size in {k.split("@")[0] for k in fc2}:
        mine = [v for k, v in fc2.items() if k.startswith(size + "@")]
        saving_sd = _pooled_sd([v["fc2_saving_seeds"] for v in mine])
        for v in mine:
            v["fc2_saving_se"] = None if saving_sd is None else saving_sd / math.sqrt(len(v["fc2_saving_seeds"]))
    kurt = {r["size"]: r["kurtosis"] for r in runs if r["variant"] == "FP32" and not r.get("seed", 0)}
    kurt_summary = {s: {"down_proj_mean": _mean(v for n, v in k.items() if "down_proj" in n),
                        "others_mean": _mean(v for n, v in k.items() if "down_proj" not in n)} for s, k in kurt.items()}
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    scale = {"median_abs_w4a4_delta": med([abs(r["delta"]) for r in w4a4]), "median_abs_seed_noise": med([abs(v) for v in noise.values()]),
             "pooled_sd": {k: v for k, v in pooled.items() if v is not None} or None, "seeds": len(qat_seeds),
             "w4a4_points_above_2se": len(clear), "w4a4_points": len(w4a4)}
    return {"fit": law, "fit_per_seed": per_seed, "fit_above_2se": law_clear, "fit_dropped_nonpositive_points": len(w4a4) - len(pts), "fc2_8bit": fc2, "signal_vs_noise": scale,
            "fc2_reduction_median": med(reductions),
            "kurtosis": kurt, "kurtosis_summary": kurt_summary, "results": results, "fp32_seed_noise": noise,
            "fp_losses": {f"{s}@D={D}": _mean(v for (s2, k2, D2), v in fp.items() if (s2, D2) == (s, D) and k2 in qat_seeds) for (s, k, D) in fp if k == 0}}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def _pooled_sd(samples: list[list[float]]) -> float | None:
    """Standard deviation pooled over groups of repeated measurements (each group about its own mean)."""
    dof = sum(len(xs) - 1 for xs in samples)
    if not dof:
        return None
    return math.sqrt(sum(sum((x - _mean(xs)) ** 2 for x in xs) for xs in samples) / dof)


def _exponents(f: dict) -> str:
    """A fit's exponents and error in one line (gN absent for one-size sweeps)."""
    return ", ".join(f"{name} {f[name]:.3f}" for name in ("gD", "gG", "gN", "rmse_log") if f[name] is not None)


def render(out: dict) -> str:
    law = out["fit"]
    lines = ["# QAT scaling law from scratch", "", f"Command: `{out['command']}`", "", out["protocol"], "",
             f"Fit ({out['formula']}): " + (json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in law.items()}) if law else "too few positive points"),
             f"(W4A4 points with delta <= 0, left out of the log-space fit: {out['fit_dropped_nonpositive_points']})"]
    for k, f in enumerate(out.get("fit_per_seed") or []):
        lines.append(f"The same fit on seed {k}'s deltas alone: " + ("too few positive points" if f is None else _exponents(f)))
    if out.get("fit_above_2se"):
        f = out["fit_above_2se"]
        lines.append(f"The same fit on the {f['points']} W4A4 points more than two standard errors above zero: " + _exponents(f))
    lines.append("")
    if out.get("missing_runs"):
        lines += [f"**Interrupted sweep:** {len(out['missing_runs'])} runs had not finished and are left out (their points are "
                  "missing or have fewer seeds): " + ", ".join(out["missing_runs"]) + ".", ""]
    if out.get("lr_probe"):
        grid = list(next(iter(out["lr_probe"].values())))
        lines += ["Learning-rate grid: FP32 eval loss at D_max / 4 (seed 0), the chosen rate in bold:", "",
                  "| model | " + " | ".join(f"lr {g}" for g in grid) + " |", "|---|" + "---|" * len(grid)]
        for size, row in out["lr_probe"].items():
            lines.append(f"| {size} | " + " | ".join(f"**{v:.4f}**" if float(g) == out["learning_rates"][size] else f"{v:.4f}"
                                                      for g, v in row.items()) + " |")
        lines.append("")
    sn = out["signal_vs_noise"]
    pooled = sn.get("pooled_sd")
    if pooled is not None:
        above, total = sn["w4a4_points_above_2se"], sn["w4a4_points"]
        verdict = ("the W4A4 deltas stand above the noise" if above >= 0.75 * total else
                   "too few W4A4 deltas stand above the noise: the fit is NOT a measurement of the law")
        lines += [f"**Signal vs noise:** {sn['seeds']} seeds per point, each QAT run paired with the FP32 run of its seed. The "
                  "seed-to-seed standard deviation of a delta, pooled over each size's points: " + ", ".join(
                      f"{size} {sd:.4f}" for size, sd in sorted(pooled.items(), key=lambda x: list(SIZES).index(x[0])))
                  + f" nats (a point's standard error: that over sqrt({sn['seeds']})); median |W4A4 delta| "
                  f"{sn['median_abs_w4a4_delta']:.4f}; {above} of {total} W4A4 points lie more than two standard errors above zero: "
                  f"{verdict}.", ""]
    elif sn["median_abs_seed_noise"] is not None:
        verdict = ("the deltas are within the noise floor: the fit and the reductions below are NOT measurements of the law"
                   if sn["median_abs_seed_noise"] >= 0.5 * sn["median_abs_w4a4_delta"] else "the deltas stand above the noise floor")
        lines += [f"**Signal vs noise:** median |W4A4 delta| {sn['median_abs_w4a4_delta']:.4f} nats, median |FP32 seed-to-seed "
                  f"difference| {sn['median_abs_seed_noise']:.4f}: {verdict}.", ""]
    lines += [
             "FP32 eval loss (nats/byte) at each D" + (" (mean over seeds)" if pooled is not None else "") + ":", "",
             "| model | N (non-emb) | " + " | ".join(f"D={D}" for D in out["D"]) + " |", "|---|---|" + "---|" * len(out["D"])]
    for size in out["sizes"]:
        n = next((r["N"] for r in out["results"] if r["size"] == size), None)
        if n is None:  # nothing finished for it yet (--no-train)
            continue
        lines.append(f"| {size} | {n:,} | " + " | ".join(f"{out['fp_losses'][f'{size}@D={D}']:.4f}" if f"{size}@D={D}" in out["fp_losses"]
                                                     else "-" for D in out["D"]) + " |")
    if out["fp32_seed_noise"]:
        lines += ["", ("FP32 from another seed" + (" (its own initialisation and batches)" if pooled is not None else " (same batches)")
                       + " minus seed 0, at each D: ") + ", ".join(f"{k} {v:+.4f}" for k, v in out["fp32_seed_noise"].items())
                  + (". Deltas are taken within a seed, so this spread cancels out of them." if pooled is not None
                     else ". Deltas of this size are not measurements.")]
    se = " (mean over seeds +- standard error)" if pooled is not None else ""
    lines += ["", f"delta = eval loss(QAT) - eval loss(FP32) at the same tokens{se}:", "",
              "| model | variant | G | " + " | ".join(f"D={D}" for D in out["D"]) + " |", "|---|---|---|" + "---|" * len(out["D"])]
    by = {(r["size"], r["variant"], r["group"], r["D"]): r for r in out["results"]}

    def cell(r):
        if r is None:
            return "-"
        seeds = "" if len(r["seeds"]) == out["signal_vs_noise"]["seeds"] else f" ({len(r['seeds'])} seed)"
        return f"{r['delta']:+.4f}" + (f" +- {r['se']:.4f}" if r.get("se") is not None else "") + seeds

    for size in out["sizes"]:
        for name, _, _, g, _ in VARIANTS[1:]:
            g = g or "channel"
            lines.append(f"| {size} | {name} | {g} | " + " | ".join(cell(by.get((size, name, g, D))) for D in out["D"]) + " |")
    lines += ["", "Error decomposition and the 8-bit FC2 (down_proj) input, G = 128 (saving: W4A4 minus W4A4-FC2A8 seed by seed, "
              "mean" + (" +- standard error" if pooled is not None else "") + "):", "",
              "| point | W4A16 | W16A4 | sum | W4A4 | W4A4-FC2A8 | saving | FC2A8 reduction |", "|---|---|---|---|---|---|---|---|"]
    for k, v in out["fc2_8bit"].items():
        red = "n/a" if v["fc2_reduction"] is None else f"{100 * v['fc2_reduction']:.0f}%"
        saving = f"{v['fc2_saving']:+.4f}" + ("" if v["fc2_saving_se"] is None else f" +- {v['fc2_saving_se']:.4f}")
        lines.append(f"| {k} | {v['W4A16']:+.4f} | {v['W16A4']:+.4f} | {v['sum_of_parts']:+.4f} | {v['W4A4']:+.4f} | {v['W4A4-FC2A8']:+.4f} | "
                     f"{saving} | {red} |")
    med = out["fc2_reduction_median"]
    lines += ["", f"Median FC2A8 reduction over the points above: {'n/a' if med is None else f'{100 * med:.0f}%'} (the paper: 20-43%).", "",
              "Input kurtosis of the FP32 models after D_max (mean over layers): " + ", ".join(
                  f"{s}: down_proj {v['down_proj_mean']:.1f} vs others {v['others_mean']:.1f}" for s, v in out["kurtosis_summary"].items()),
              "", f"Training time {sum(r['seconds'] for r in out['runs']):,.0f} s over {len(out['runs'])} runs (two at a time; per run in "
              f"the JSON)" + (f", and {out['lr_probe_seconds']:,.0f} s for the learning-rate grid" if out.get("lr_probe") else "")
              + f"; this invocation {out['wall_seconds']:.0f} s (finished runs come from the cache"
              + ("; it trained nothing: `--no-train` re-rendered the cached runs" if out.get("rendered_from_cache") else "") + ")."]
    return "\n".join(lines) + "\n"


def learning_rates(specs: list[str], sizes: list[str]) -> dict[str, float]:
    """`--lr` values ("2e-3" for every size, or "h128=5e-4" for one) as {size: lr}."""
    default, per_size = None, {}
    for spec in specs:
        size, _, value = spec.rpartition("=")
        try:
            lr = float(value)
        except ValueError:
            raise SystemExit(f"--lr: {spec!r} is not LR or SIZE=LR") from None
        if size and size not in SIZES:
            raise SystemExit(f"--lr: unknown size {size!r} (sizes: {', '.join(SIZES)})")
        if size:
            per_size[size] = lr
        else:
            default = lr
    missing = [s for s in sizes if s not in per_size and default is None]
    if missing:
        raise SystemExit(f"--lr: no learning rate for {', '.join(missing)}")
    return {s: per_size.get(s, default) for s in sizes}


def lr_text(lrs: dict[str, float]) -> str:
    values = set(lrs.values())
    return f"{values.pop()}" if len(values) == 1 else ", ".join(f"{v} ({s})" for s, v in lrs.items())


def protocol(a, steps: int, D: list[int], lrs: dict[str, float]) -> str:
    """What was run, in a paragraph for the Markdown file."""
    seeds = (f"{a.seeds} seeds (each its own initialisation and training windows); every QAT run is paired with the FP32 run of its "
             "seed, and a point's delta is the mean over seeds with the standard error from their pooled spread (below)"
             if a.seeds > 1 else "One seed per run; the FP32 reference trained again from another seed gives the noise floor (below)")
    schedule = {
        "constant": f"then constant, so the checkpoints at D = {', '.join(f'{d:,}' for d in D)} are points of one run and compared at equal schedule",
        "cosine": f"then cosine to zero at D = {D[-1]:,} (annealed; evaluated there)",
        "wsd": (f"then constant, with the learning rate decayed linearly to zero over the last {a.decay_frac:.0%} of each D = "
                f"{', '.join(f'{d:,}' for d in D)} in a branch of the run (warmup-stable-decay), so every D is evaluated annealed"),
    }[a.schedule]
    return (f"From scratch on 2 shared CPU cores (one thread per run): {len(a.sizes)} byte-level Llama model{'s' if len(a.sizes) > 1 else ''} (4 layers, hidden "
            f"{'/'.join(str(SIZES[s]['hidden_size']) for s in a.sizes)}), each trained {len(VARIANTS)} times on {steps} batches of "
            f"{a.batch} x {a.seq_len} bytes (D_max = {steps * a.batch * a.seq_len:,} tokens) from the same seeded initialisation: FP32, "
            f"and LSQ QAT from step 0. AdamW, lr {lr_text(lrs)}"
            + (" (for each size the grid's best for FP32 at D_max / 4, below)" if a.lr_grid else "")
            + f", LSQ scales' rate 1% of their size; linear warmup over {a.warmup_frac:.0%} of the "
            f"steps, {schedule}; eval loss on {a.eval_windows} x {a.seq_len} bytes of the evaluation half. {span(D, a.sizes)} {seeds}.")


def span(D: list[int], sizes: list[str]) -> str:
    """Where the sweep's D and N sit against the issue's ranges (1M-10M tokens, 0.2M-2M parameters)."""
    inside = [d for d in D if 990_000 <= d <= 10_000_000]  # (whole batches: 1M tokens is 999,936 at 2 x 128)
    where = ("all inside" if len(inside) == len(D) else "none inside" if not inside else
             f"{', '.join(f'{d:,}' for d in inside)} inside, the rest outside")
    n = ("N is one model size, so this sweep measures gD and gG, not gN" if len(sizes) == 1
         else f"N takes {len(sizes)} values (non-embedding parameters in the tables below; the issue asks 0.2M-2M)")
    return f"D: {where} the issue's 1M-10M range; {n}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["h64", "h96", "h128", "h208"], choices=list(SIZES))
    ap.add_argument("--tokens", type=int, default=1_000_000, help="D_max: training tokens of every run")
    ap.add_argument("--checkpoints", type=int, default=4, help="evaluate at D_max / 2^k for k < this")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", nargs="+", default=["2e-3"], metavar="[SIZE=]LR",
                    help="AdamW learning rate: one for every size, or SIZE=LR per size (one LR alone is the default for the rest)")
    ap.add_argument("--lr-grid", nargs="+", type=float, metavar="LR",
                    help="instead of --lr: train FP32 (seed 0) to D_max / 4 at each of these learning rates and give every size "
                         "the one with the lowest eval loss (a bigger model wants a smaller rate)")
    ap.add_argument("--warmup-frac", type=float, default=0.05)
    ap.add_argument("--schedule", choices=["constant", "cosine", "wsd"], default="constant",
                    help="lr after warm-up: constant (checkpoints comparable), cosine to zero at D_max (use --checkpoints 1), "
                         "or wsd: constant with a linear decay to zero before every checkpoint, in a branch")
    ap.add_argument("--decay-frac", type=float, default=0.2, help="wsd: the decay's share of each checkpoint's steps")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train every variant from this many seeds (initialisation and training windows), pairing each QAT run "
                         "with the FP32 run of its seed; the deltas' standard errors come from their spread")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one thread each)")
    ap.add_argument("--no-train", action="store_true",
                    help="report the finished runs only (of an interrupted sweep); the output lists the runs left out")
    ap.add_argument("--noise-seed", type=int, default=1, help="also train FP32 from this seed per size (the noise floor; 0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "qat_scaling"))
    a = ap.parse_args()
    t0 = time.time()
    steps = a.tokens // (a.batch * a.seq_len)
    lrs = learning_rates(a.lr, a.sizes)
    base = {"steps": steps, "batch": a.batch, "seq_len": a.seq_len, "warmup_frac": a.warmup_frac,
            "eval_windows": a.eval_windows, "checkpoints": a.checkpoints}
    if a.schedule != "constant":
        base["schedule"] = a.schedule  # (absent for constant: the cached runs' keys stay valid)
    if a.schedule == "wsd":
        base["decay_frac"] = a.decay_frac
    lr_probe, probe_seconds = None, 0.0
    if a.lr_grid:
        probes = [dict(base, steps=steps // 4, checkpoints=1, size=s, lr=lr, variant=list(VARIANTS[0]), seed=0, vary_data=True)
                  for s in a.sizes for lr in a.lr_grid]
        lr_probe = {s: {} for s in a.sizes}
        for job, res in zip(probes, run_all(probes, a.jobs)):
            lr_probe[job["size"]][str(job["lr"])] = res["checkpoints"][-1]["loss"]
            probe_seconds += res["seconds"]
        lrs = {s: min(a.lr_grid, key=lambda lr: lr_probe[s][str(lr)]) for s in a.sizes}
        print(f"learning rates: {lrs}", flush=True)
    if a.seeds > 1:
        jobs = [dict(base, size=s, lr=lrs[s], variant=list(v), seed=k, vary_data=True) for k in range(a.seeds) for s in a.sizes for v in VARIANTS]
    else:
        jobs = [dict(base, size=s, lr=lrs[s], variant=list(v)) for s in a.sizes for v in VARIANTS]
    if a.noise_seed and a.seeds == 1:
        jobs += [dict(base, size=s, lr=lrs[s], variant=list(VARIANTS[0]), seed=a.noise_seed) for s in a.sizes]
    # the smallest model first (an interrupted sweep leaves whole sizes), each size's FP32 references (every delta needs them) first
    jobs.sort(key=lambda j: (SIZES[j["size"]]["hidden_size"], j["variant"][0] != "FP32"))
    runs = run_all(jobs, a.jobs, train_missing=not a.no_train)
    missing = [f"{j['size']} {j['variant'][0]} G={j['variant'][3] or 'channel'} seed {j.get('seed', 0)}" for j in jobs
               if not (CACHE / f"{job_key(j)}.json").is_file()]
    D = [s * a.batch * a.seq_len for s in checkpoints(steps, a.checkpoints)]
    # the command that trains and renders the sweep: a --no-train invocation only re-renders its cached runs
    out = {"command": " ".join([".venv/bin/python", "tools/qat_scaling_scratch.py"] + [x for x in sys.argv[1:] if x != "--no-train"]),
           "rendered_from_cache": a.no_train,
           "protocol": protocol(a, steps, D, lrs), "missing_runs": missing, "learning_rates": lrs, "lr_probe": lr_probe, "lr_probe_seconds": round(probe_seconds, 1),
           "formula": "delta = k * D^gD * (log2 G)^gG / N^gN (W4A4 points)", "sizes": a.sizes, "D": D,
           "runs": [{**{k: r[k] for k in ("size", "N", "variant", "group", "seconds")}, "seed": r.get("seed", 0)} for r in runs],
           **analyse(runs), "wall_seconds": round(time.time() - t0, 1)}
    for suffix, text in ((".json", json.dumps(out, indent=2) + "\n"), (".md", render(out))):
        tmp = Path(a.out + suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(a.out + suffix)


if __name__ == "__main__":
    main()
