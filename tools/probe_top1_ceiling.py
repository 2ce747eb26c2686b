"""Probe: how close to FP32 next-token top-1 agreement any INT8-weight rendering of an LM can get. Not a test.

    .venv/bin/python tools/probe_top1_ceiling.py --model smollm2-135m --out benchmarks/top1_ceiling_smollm2

Issue 3 asks full-integer INT8 TFLite to agree with FP32 on >= 0.99 of next tokens on SmolLM2. This measures
the PyTorch simulation (edgeq's own forward, no file, no runtime) of recipes that quantize less and less:
INT8 weights with float activations everywhere, with the LM head kept float, the LM head alone, GPTQ instead
of RTN, and w8a8-static (the recipe the full-integer file renders). A file cannot agree with FP32 more than
the simulation of a recipe that quantizes a subset of what it quantizes does, up to the runtime's own error.
Also reported: FP32's margin between its two largest logits, the near-ties that any perturbation flips.
Quality on the evaluation windows bench_tflite uses (16 x 512 enwiki tokens): top-1 agreement with FP32 over
all positions and over the first 64 (tools/probe_tflite_int16.py's window length), and perplexity.
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeq.fileio import write_json_atomic, write_text_atomic  # noqa: E402

RECIPES = [
    ("w8a16", "INT8 per-channel RTN weights everywhere (LM head too), float activations (preset w8a16)"),
    (str(ROOT / "tools" / "probe_top1_head_float.toml"), "the same with the LM head float"),
    (str(ROOT / "tools" / "probe_top1_head_only.toml"), "only the LM head INT8 (per channel, RTN); everything else float"),
    (str(ROOT / "tools" / "probe_top1_head_float_gptq.toml"), "INT8 per-channel GPTQ weights, LM head float, float activations"),
    ("w8a8-static", "w8a8-static: what full-integer TFLite renders (static INT8 inputs on every layer, LM head float)"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from edgeq.data import lm_windows
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe

    torch.set_num_threads(args.threads)
    bundle = load_model(args.model)
    windows = torch.from_numpy(lm_windows(bundle.tokenizer, "enwiki", "evaluation", args.seq_len, args.windows)).long()

    def logits(module) -> torch.Tensor:
        with torch.no_grad():
            outs = [module(w[None]) for w in windows]
        return torch.cat([getattr(o, "logits", o) for o in outs]).float()

    reference = logits(bundle.module.eval())
    ref_top1 = reference.argmax(-1)
    top2 = reference.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]

    def quality(x: torch.Tensor) -> dict:
        agree = x.argmax(-1) == ref_top1
        nll = torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), windows[:, 1:].reshape(-1))
        return {"top1_agree_fp32": float(agree.float().mean()), "top1_agree_fp32_first64": float(agree[:, :64].float().mean()),
                "ppl": math.exp(float(nll)),
                # where the quantized model disagrees: FP32's margin there (near-ties or real changes of mind)
                "fp32_gap_median_where_disagree": float(gap[~agree].median()) if (~agree).any() else None}

    rows = [{"recipe": "fp32", "label": "FP32 (the reference)", **quality(reference), "seconds": 0.0}]
    for name, label in RECIPES:
        t0 = time.perf_counter()
        model = load_model(args.model)
        recipe = load_recipe(name)
        calib = calibration_batches(model, None, recipe.calibration.samples, recipe.calibration.seq_len) if recipe.needs_calibration else None
        qm = quantize_model(model, recipe, calib)
        rows.append({"recipe": Path(name).name, "label": label, **quality(logits(qm.bundle.module.eval())),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    quantiles = {f"q{int(q * 100):02d}": float(gap.quantile(q)) for q in (0.01, 0.05, 0.10, 0.25, 0.50)}
    result = {"command": " ".join([".venv/bin/python", "tools/probe_top1_ceiling.py"] + sys.argv[1:]), "model": args.model,
              "windows": f"lm_windows(tok, 'enwiki', 'evaluation', {args.seq_len}, {args.windows})", "torch": torch.__version__,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "fp32_top1_top2_logit_gap": quantiles, "rows": rows}
    write_json_atomic(Path(f"{args.out}.json"), result)
    lines = [f"# Next-token top-1 agreement with FP32 on {args.model}: how much INT8 weights alone cost (probe)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']}. PyTorch simulation of each recipe (edgeq's forward; no exported file, no runtime), "
             f"{args.windows} enwiki evaluation windows of {args.seq_len} tokens (bench_tflite's), top-1 agreement with the FP32 "
             "model over every position and over each window's first 64.", "",
             "| recipe | what is quantized | top-1 vs fp32 | first 64 | ppl | fp32 top1-top2 gap where they disagree (median) | s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        disagree = "-" if r["fp32_gap_median_where_disagree"] is None else f"{r['fp32_gap_median_where_disagree']:.3f}"
        lines.append(f"| {r['recipe']} | {r['label']} | {r['top1_agree_fp32']:.4f} | {r['top1_agree_fp32_first64']:.4f} | "
                     f"{r['ppl']:.3f} | {disagree} | {r['seconds']:.0f} |")
    lines += ["", "FP32's margin between its two largest logits, quantiles over all positions: "
              + ", ".join(f"{k} {v:.3f}" for k, v in quantiles.items()) + "."]
    write_text_atomic(Path(f"{args.out}.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
