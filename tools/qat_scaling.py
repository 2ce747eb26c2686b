"""A small QAT scaling-law sweep as QAT FINE-TUNING: delta = k * D^gD * (log2 G)^gG / N^gN.

The law measured from scratch, as the issue asks, is tools/qat_scaling_scratch.py (benchmarks/qat_scaling.*);
this sweep (benchmarks/qat_scaling_finetune*.md) starts QAT from an FP32-pretrained checkpoint instead, and
shares its model sizes, recipes and fit with that tool.

Protocol (reduced to what 2 shared CPU cores allow; see the JSON's `protocol`): byte-level
Llama-style models of three sizes are pretrained in FP32 from scratch on the enwiki calibration
half; then, from that checkpoint, each is trained further for D tokens either in FP32 (the
reference) or with LSQ fake quantization (W4A4 at G = 32 / 128 / per-channel; W4A16, W16A4 and
W4A4 with an 8-bit FC2 (down_proj) input at G = 128). delta = eval loss(QAT) - eval loss(FP) after
the same tokens, measured at D/2 and D. The fit uses the W4A4 points: Huber loss on log delta,
L-BFGS over (log k, gD, gG, gN). Per-layer input kurtosis of the FP models is recorded.

    .venv/bin/python tools/qat_scaling.py --pretrain-steps 150 --qat-steps 32 --batch 4 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# 4 layers each; non-embedding parameters 0.20M / 0.44M / 0.79M / 1.23M / 2.08M
SIZES = {"h64": dict(hidden_size=64, intermediate_size=192), "h96": dict(hidden_size=96, intermediate_size=288),
         "h128": dict(hidden_size=128, intermediate_size=384), "h160": dict(hidden_size=160, intermediate_size=480),
         "h208": dict(hidden_size=208, intermediate_size=624)}


def make_model(size: str, seed: int):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5, **SIZES[size])
    return transformers.LlamaForCausalLM(cfg)


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def recipe(w_bits, a_bits, group, fc2_bits=None, fold_norms=True):
    from edgeq.recipe import QuantRecipe

    def gran(g):
        return {"granularity": "channel"} if g is None else {"granularity": "group", "group_size": g}

    def rule(match, a):
        w = {"bits": 16} if w_bits is None else {"bits": w_bits, "symmetric": True, **gran(group)}
        act = {} if a is None else {"mode": "dynamic", "bits": a,
                                    **({"granularity": "token"} if group is None else {"granularity": "group", "group_size": group})}
        return {"match": match, "weight": w, "activation": act}

    rules = [{"match": "lm_head$", "skip": True}]
    if fc2_bits:
        rules.append(rule("down_proj$", fc2_bits))
    rules.append(rule(".*", a_bits))
    return QuantRecipe.from_dict({"name": "sweep", "rules": rules, "fold_norms": fold_norms})


def effective_log2_group(model, group) -> float:
    """Parameter-weighted mean of log2(min(G, in_features)) over the quantized linears (per-channel: G = in)."""
    import torch

    num, den = 0.0, 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"):
            g = m.in_features if group is None else min(group, m.in_features)
            num += math.log2(g) * m.weight.numel()
            den += m.weight.numel()
    return num / den


def run_steps(model, params, windows, start, steps, batch, lr_groups):
    import numpy as np
    import torch

    opt = torch.optim.AdamW(lr_groups, weight_decay=0.0)
    model.train()
    for step in range(start, start + steps):
        ids = torch.from_numpy(np.ascontiguousarray(windows[step * batch : (step + 1) * batch]))
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval()


def fit(points):
    """Huber fit of log delta = log k + gD log D + gG log log2G - gN log N with L-BFGS; returns params and errors.

    Points of one model size cannot separate k from N^gN: the N term is left out and gN is None."""
    import torch

    one_size = len({p["N"] for p in points}) == 1

    x = torch.tensor([[math.log(p["D"]), math.log(p["log2G"]), math.log(p["N"])] for p in points], dtype=torch.float64)
    y = torch.tensor([math.log(p["delta"]) for p in points], dtype=torch.float64)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, line_search_fn="strong_wolfe")

    def pred():
        return theta[0] + theta[1] * x[:, 0] + theta[2] * x[:, 1] - (0 if one_size else theta[3] * x[:, 2])

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.huber_loss(pred(), y, delta=1e-3, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        r = pred() - y
    theta = theta.detach()
    return {"k": math.exp(float(theta[0])), "gD": float(theta[1]), "gG": float(theta[2]), "gN": None if one_size else float(theta[3]),
            "rmse_log": float(r.pow(2).mean().sqrt()), "mean_abs_rel_error": float((r.exp() - 1).abs().mean()), "points": len(points)}


def main() -> None:
    import copy

    import torch

    from edgeq.data import lm_windows
    from edgeq.models import ModelBundle
    from edgeq.models.tokenizers import ByteTokenizer
    from edgeq.quantize.diagnostics import input_kurtosis
    from edgeq.quantize.qat import prepare_qat
    from edgeq.quantize.qat_loop import eval_loss, is_scale

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["h64", "h96", "h128"], choices=list(SIZES))
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--qat-steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "qat_scaling_finetune"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    tok = ByteTokenizer()
    total = a.pretrain_steps + a.qat_steps
    windows = lm_windows(tok, "enwiki", "calibration", a.seq_len, total * a.batch, seed=0)
    tokens_per_step = a.batch * a.seq_len
    half = a.qat_steps // 2
    variants = [("W4A4", 4, 4, 32, None), ("W4A4", 4, 4, 128, None), ("W4A4", 4, 4, None, None),
                ("W4A16", 4, None, 128, None), ("W16A4", None, 4, 128, None), ("W4A4-FC2A8", 4, 4, 128, 8)]
    results, kurt = [], {}
    for size in a.sizes:
        model = make_model(size, seed=0)
        N = non_embedding_params(model)
        opt_params = list(model.parameters())
        run_steps(model, opt_params, windows, 0, a.pretrain_steps, a.batch, [{"params": opt_params, "lr": a.lr}])
        base = copy.deepcopy(model.state_dict())
        calib = [(torch.from_numpy(windows[i : i + 4]),) for i in range(0, 16, 4)]
        kurt[size] = {n: v["kurtosis"] for n, v in input_kurtosis(model, calib).items() if not n.endswith("lm_head")}
        ev = lambda m: eval_loss(m, tok, "enwiki", a.seq_len, a.eval_windows)
        fp = {}
        ref = make_model(size, seed=0)
        ref.load_state_dict(base)
        # the reference trains what QAT trains (the quantized linears; embeddings, norms and lm_head stay frozen)
        ps = [p for n, p in ref.named_parameters() if n.endswith("_proj.weight")]
        run_steps(ref, ps, windows, a.pretrain_steps, half, a.batch, [{"params": ps, "lr": a.lr}])
        fp[half] = ev(ref)
        run_steps(ref, ps, windows, a.pretrain_steps + half, a.qat_steps - half, a.batch, [{"params": ps, "lr": a.lr}])
        fp[a.qat_steps] = ev(ref)
        fp_pre = ev(model)
        print(json.dumps({"size": size, "N": N, "fp_pretrained": fp_pre, "fp": fp, "seconds": round(time.time() - t0)}), flush=True)
        for name, wb, ab, g, fc2 in variants:
            m = make_model(size, seed=0)
            m.load_state_dict(base)
            bundle = ModelBundle(m, "causal-lm", f"sweep-{size}", tok)
            prep = prepare_qat(bundle, recipe(wb, ab, g, fc2), "lsq")
            tr = prep.trainable()
            groups = [{"params": [p for n, p in tr.items() if not is_scale(n)], "lr": a.lr}]
            groups += [{"params": [p], "lr": 1e-2 * float(p.detach().abs().mean())} for n, p in tr.items() if is_scale(n)]
            params = list(tr.values())
            start_loss = ev(m)
            log2g = effective_log2_group(make_model(size, 0), g)
            run_steps(m, params, windows, a.pretrain_steps, half, a.batch, [x for x in groups if x["params"]])
            l1 = ev(m)
            run_steps(m, params, windows, a.pretrain_steps + half, a.qat_steps - half, a.batch, [x for x in groups if x["params"]])
            l2 = ev(m)
            for steps, loss in ((half, l1), (a.qat_steps, l2)):
                r = {"size": size, "N": N, "variant": name, "group": g or "channel", "log2G": round(log2g, 4),
                     "D": steps * tokens_per_step, "loss": loss, "fp_loss": fp[steps], "delta": loss - fp[steps],
                     "ptq_start_loss": start_loss, "ptq_delta": start_loss - fp_pre}
                results.append(r)
                print(json.dumps(r), flush=True)
    pts = [r for r in results if r["variant"] == "W4A4" and r["delta"] > 0]
    dropped = sum(1 for r in results if r["variant"] == "W4A4" and r["delta"] <= 0)
    law = fit(pts) if len(pts) >= 4 else None
    fc2 = {}
    for size in a.sizes:
        for steps in (half, a.qat_steps):
            D = steps * tokens_per_step
            pick = lambda v: next(r["delta"] for r in results if r["size"] == size and r["variant"] == v and r["D"] == D and r["group"] == 128)
            d44, d8 = pick("W4A4"), pick("W4A4-FC2A8")
            fc2[f"{size}@D={D}"] = {"W4A4": d44, "W4A4-FC2A8": d8, "W4A16": pick("W4A16"), "W16A4": pick("W16A4"),
                                    "fc2_reduction": (1 - d8 / d44) if d44 > 0 else None}
    # the same decomposition before any QAT (RTN grid on the pretrained weights): no training noise in it
    ptq = {}
    for size in a.sizes:
        pick = lambda v, g=128: next(r["ptq_delta"] for r in results if r["size"] == size and r["variant"] == v and r["group"] == g)
        ptq[size] = {"W4A4-G32": pick("W4A4", 32), "W4A4-channel": pick("W4A4", "channel"), "W4A4": pick("W4A4"),
                     "W4A16": pick("W4A16"), "W16A4": pick("W16A4"), "W4A4-FC2A8": pick("W4A4-FC2A8")}
        ptq[size]["fc2_reduction"] = (1 - ptq[size]["W4A4-FC2A8"] / ptq[size]["W4A4"]) if ptq[size]["W4A4"] > 0 else None
    kurt_summary = {s: {"down_proj_mean": sum(v for n, v in k.items() if "down_proj" in n) / max(1, sum("down_proj" in n for n in k)),
                        "others_mean": sum(v for n, v in k.items() if "down_proj" not in n) / max(1, sum("down_proj" not in n for n in k))}
                    for s, k in kurt.items()}
    out = {
        "command": " ".join([Path(sys.executable).name, "tools/qat_scaling.py"] + sys.argv[1:]),
        "protocol": (f"REDUCED SWEEP on 2 shared CPU cores (1 thread): 3 byte-level Llama models (4 layers; hidden 64/96/128), "
                     f"FP32-pretrained from scratch for {a.pretrain_steps * tokens_per_step} tokens, then {a.qat_steps * tokens_per_step} "
                     "tokens of LSQ QAT (or FP32 for the reference) from that checkpoint; delta measured at D/2 and D. This is QAT "
                     "fine-tuning, not QAT from scratch, and D is 100x below the issue's 1M-10M tokens: treat the exponents as a "
                     "smoke test of the pipeline, not as a measurement of the law."),
        "eval_windows": a.eval_windows, "seq_len": a.seq_len,
        "fit": law, "fit_dropped_nonpositive_points": dropped, "formula": "delta = k * D^gD * (log2 G)^gG / N^gN (W4A4 points)",
        "fc2_8bit": fc2, "ptq_start_deltas": ptq, "kurtosis": kurt, "kurtosis_summary": kurt_summary, "results": results,
        "wall_seconds": round(time.time() - t0, 1),
    }
    Path(a.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    lines = ["# QAT scaling sweep (reduced)", "", f"Command: `{out['command']}`", "", out["protocol"], "",
             f"Fit ({out['formula']}): " + (json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in law.items()}) if law else "too few positive points"),
             f"(dropped {dropped} W4A4 points with delta <= 0)", "",
             "| model | N (non-emb) | variant | G | D tokens | loss | FP loss | delta |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['size']} | {r['N']} | {r['variant']} | {r['group']} | {r['D']} | {r['loss']:.4f} | {r['fp_loss']:.4f} | {r['delta']:+.4f} |")
    lines += ["", "8-bit FC2 input (G = 128):", "", "| point | W4A16 | W16A4 | W4A4 | W4A4-FC2A8 | reduction |", "|---|---|---|---|---|---|"]
    for k, v in fc2.items():
        red = "n/a" if v["fc2_reduction"] is None else f"{100 * v['fc2_reduction']:.0f}%"
        lines.append(f"| {k} | {v['W4A16']:+.4f} | {v['W16A4']:+.4f} | {v['W4A4']:+.4f} | {v['W4A4-FC2A8']:+.4f} | {red} |")
    lines += ["", "RTN start (before QAT, G = 128 unless named; no training noise): delta vs the pretrained FP model", "",
              "| model | W4A4 G32 | W4A4 G128 | W4A4 per-channel | W4A16 | W16A4 | W4A4-FC2A8 | FC2A8 reduction |", "|---|---|---|---|---|---|---|---|"]
    for size, v in ptq.items():
        red = "n/a" if v["fc2_reduction"] is None else f"{100 * v['fc2_reduction']:.0f}%"
        lines.append(f"| {size} | {v['W4A4-G32']:+.4f} | {v['W4A4']:+.4f} | {v['W4A4-channel']:+.4f} | {v['W4A16']:+.4f} | {v['W16A4']:+.4f} | "
                     f"{v['W4A4-FC2A8']:+.4f} | {red} |")
    lines += ["", "Input kurtosis (FP models, mean over layers): " + ", ".join(
        f"{s}: down_proj {v['down_proj_mean']:.1f} vs others {v['others_mean']:.1f}" for s, v in kurt_summary.items())]
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
