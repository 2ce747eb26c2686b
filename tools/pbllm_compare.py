"""PB-LLM PTQ: salient fractions 10/20/30%, PB-GPTQ vs partial binarization without error feedback (RTN),
Hessian vs magnitude salient criterion; plus FP and plain binary (1-bit per-channel RTN) references.

Writes benchmarks/pbllm_compare.json and .md. Example (the committed numbers):
    .venv/bin/python tools/pbllm_compare.py --model tiny-llama --calib-samples 16 --seq-len 128 --eval-windows 16
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    import torch

    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.quantize.qat_loop import eval_loss
    from edgeq.recipe import QuantRecipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--criteria", nargs="+", default=["hessian", "magnitude"], choices=["hessian", "magnitude"])
    ap.add_argument("--fold-norms", choices=["true", "false"], default="false",
                    help="fold norm gains into the weights first (false: as the pb-llm preset; runs before 2026-12-05 folded)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "pbllm_compare"))
    ap.add_argument("--render", default=None, help="only re-render OUT.md from OUT.json")
    a = ap.parse_args()
    if a.render:
        Path(a.render + ".md").write_text(markdown(json.loads(Path(a.render + ".json").read_text())))
        return
    torch.set_num_threads(1)
    t0 = time.time()
    bundle = load_model(a.model)
    calib = calibration_batches(bundle, "enwiki", a.calib_samples, a.seq_len)
    loss = lambda m: eval_loss(m, bundle.tokenizer, "enwiki", a.seq_len, a.eval_windows)
    rows = [{"variant": "fp32", "ppl": math.exp(loss(bundle.module))}]

    def run(name, rules, pbllm=None, **extra):
        recipe = QuantRecipe.from_dict({"name": name, "rules": [{"match": "lm_head$", "skip": True}] + rules,
                                        "fold_norms": a.fold_norms == "true", **({"pbllm": pbllm} if pbllm else {})})
        qm = quantize_model(load_model(a.model), recipe, calib)
        s = qm.summary()
        rec = next((l.get(l["method"]) for l in s["layers"] if isinstance(l.get(l["method"]), dict)), None)
        r = {"variant": name, "ppl": math.exp(loss(qm.model)), **extra,
             "bits_per_weight": None if rec is None else round(sum(l[l["method"]]["bits_per_weight"] * l["params"] for l in s["layers"]) / s["quantized_params"], 4),
             "bits_per_weight_no_mask": None if rec is None else round(sum(l[l["method"]]["bits_per_weight_no_mask"] * l["params"] for l in s["layers"]) / s["quantized_params"], 4)}
        rows.append(r)
        print(json.dumps(r), flush=True)

    run("binary-rtn (1-bit per-channel, alpha = mean abs w)", [{"match": ".*", "weight": {"bits": 1, "granularity": "channel"}}])
    w8 = {"bits": 8, "symmetric": True, "granularity": "channel"}
    for f in a.fractions:
        for method in ("pb-llm", "pb-llm-rtn"):
            for crit in a.criteria:
                run(f"{method} f={f} {crit}", [{"match": ".*", "weight": w8, "method": method}],
                    {"salient_fraction": f, "criterion": crit}, fraction=f, method=method, criterion=crit)
    out = {"command": " ".join([Path(sys.executable).name, "tools/pbllm_compare.py"] + sys.argv[1:]), "model": a.model,
           "scale_note": f"{a.model} ({sum(p.numel() for p in bundle.module.parameters()) / 1e6:.2f}M params) on 2 shared CPU "
                         "cores; all Linear layers but lm_head; PTQ only",
           "fold_norms": a.fold_norms == "true", "calib_samples": a.calib_samples, "seq_len": a.seq_len, "eval_windows": a.eval_windows,
           "wall_seconds": round(time.time() - t0, 1), "rows": rows}
    Path(a.out + ".json").write_text(json.dumps(out, indent=2) + "\n")
    Path(a.out + ".md").write_text(markdown(out))


def markdown(out: dict) -> str:
    """The Markdown table of a run's JSON (also: `python tools/pbllm_compare.py --render OUT`)."""
    lines = [f"# PB-LLM PTQ on {out['model']}", "", f"Command: `{out['command']}`", "", out["scale_note"] + ".",
             f"Calibration {out['calib_samples']} x {out['seq_len']} tokens; perplexity on {out['eval_windows']} disjoint evaluation windows; "
             f"norm gains {'folded into the weights' if out.get('fold_norms', True) else 'unfolded'}.",
             "bits/weight counts the mask as a dense 1-bit bitmap plus per-row alpha (fp32) and k (int8); the file stores INT8 rows."
             + (f" {out['note']}" if out.get("note") else ""), "",
             "| variant | ppl | bits/weight (mask incl.) | bits/weight (no mask) |", "|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['variant']} | {r['ppl']:.3f} | {r.get('bits_per_weight') or ''} | {r.get('bits_per_weight_no_mask') or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
