"""PB-LLM QAT on a real model: where it starts matters. `edgeq qat --method pb-llm` from PB-GPTQ's integers
(`[pbllm] qat_init = "gptq"`, the default) against the same QAT from the float weights binarized as they are
(`"float"`, the paper's start), same salient fraction, steps, data and evaluation windows. Not a test.

    .venv/bin/python tools/pbllm_qat.py --model smollm2-135m --fraction 0.3 --steps 30 --out benchmarks/pbllm_qat_smollm2

Each run: `edgeq.quantize.qat_loop.train` (QAT with the Hessian salient criterion, 16 calibration windows for the
Hessians, AdamW with cosine decay); eval loss on --eval-windows windows of --seq-len tokens before and after. First,
the PTQ reference: `quantize_model` with the same recipe and calibration windows at QAT's thread count, evaluated on
the same windows, where a "gptq" start has to begin (the gap is written out). Writes OUT.json and OUT.md with the
command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeq.fileio import write_json_atomic, write_text_atomic  # noqa: E402

RECIPE = """description = "PB-LLM QAT comparison (tools/pbllm_qat.py)"
fold_norms = {fold}
[[rules]]
match = "lm_head$"
skip = true
[[rules]]
match = ".*"
method = "pb-llm"
weight = {{ bits = 8, symmetric = true, granularity = "channel" }}
[pbllm]
salient_fraction = {fraction}
criterion = "hessian"
qat_init = "{init}"
"""


def ptq_reference(a) -> dict:
    """`edgeq quantize` with the same recipe (PB-GPTQ), calibration windows and evaluation windows as the QAT runs:
    the point a "gptq" start must begin at."""
    import torch

    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.quantize.qat_loop import QATConfig, eval_loss
    from edgeq.recipe import load_recipe

    # the QAT runs' thread count: the float reduction order of Hessians and activations decides close rounding calls
    torch.set_num_threads(QATConfig(model=a.model, recipe="pb-llm").threads)
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "pbllm.toml"
        recipe.write_text(RECIPE.format(fraction=a.fraction, init="gptq", fold=a.fold_norms))
        bundle = load_model(a.model)
        t0 = time.perf_counter()
        qm = quantize_model(bundle, load_recipe(str(recipe)), calibration_batches(bundle, "enwiki", 16, a.seq_len))
        seconds = round(time.perf_counter() - t0, 1)
        loss = eval_loss(qm.model, bundle.tokenizer, "enwiki", a.seq_len, a.eval_windows)
    return {"eval_loss": loss, "ppl": math.exp(loss), "quantize_seconds": seconds}


def main() -> None:
    from edgeq.quantize.qat_loop import QATConfig, train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--fold-norms", choices=["true", "false"], default="false",
                    help="fold norm gains into the weights first (false: as the pb-llm preset; runs before 2026-12-05 folded)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = {"ptq": ptq_reference(a)}
    print(json.dumps({"ptq": rows["ptq"]}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for init in ("float", "gptq"):
            recipe = Path(tmp) / f"pbllm-{init}.toml"
            recipe.write_text(RECIPE.format(fraction=a.fraction, init=init, fold=a.fold_norms))
            t0 = time.perf_counter()
            cfg = QATConfig(model=a.model, recipe=str(recipe), method="pb-llm", steps=a.steps, batch=a.batch, seq_len=a.seq_len,
                            eval_windows=a.eval_windows, lr=a.lr, calib_samples=16)
            _, record = train(cfg)
            rows[init] = {k: record[k] for k in ("eval_loss_start", "eval_loss_end", "step_seconds", "peak_rss_mb", "trainable_params")}
            rows[init].update(ppl_start=math.exp(record["eval_loss_start"]), ppl_end=math.exp(record["eval_loss_end"]),
                              train_loss_first_last=[record["train_loss"][0], record["train_loss"][-1]],
                              seconds=round(time.perf_counter() - t0, 1))
            print(json.dumps({init: rows[init]}), flush=True)
    out = {"command": " ".join([".venv/bin/python tools/pbllm_qat.py"] + sys.argv[1:]), "model": a.model,
           "salient_fraction": a.fraction, "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len,
           "eval_windows": a.eval_windows, "lr": a.lr, "fold_norms": a.fold_norms == "true",
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    write_json_atomic(Path(a.out + ".json"), out)
    lines = [f"# PB-LLM QAT on {a.model}: start from the floats or from PB-GPTQ", "", "```", out["command"], "```", "",
             f"Salient fraction {a.fraction} (Hessian criterion), {a.steps} QAT steps of {a.batch} x {a.seq_len} enwiki tokens, "
             f"lr {a.lr} (cosine); perplexity on {a.eval_windows} evaluation windows of {a.seq_len} tokens before and after; "
             f"norm gains {'folded into the weights' if a.fold_norms == 'true' else 'unfolded'}.", "",
             "| start (qat_init) | ppl at start | ppl after QAT | s/step | peak RSS MB |", "|---|---|---|---|---|"]
    gap = rows["gptq"]["eval_loss_start"] - rows["ptq"]["eval_loss"]
    start = "begins exactly there" if gap == 0 else f"begins {gap:+.3g} nats away from it"
    lines.insert(-2, f"PTQ reference (`edgeq quantize`, the same PB-GPTQ recipe, calibration and evaluation windows): ppl "
                     f"{rows['ptq']['ppl']:.2f} ({rows['ptq']['quantize_seconds']} s). The `gptq` start {start}.\n")
    for init, r in ((k, v) for k, v in rows.items() if k != "ptq"):
        lines.append(f"| {init} | {r['ppl_start']:.2f} | {r['ppl_end']:.2f} | {r['step_seconds']} | {r['peak_rss_mb']:,.0f} |")
    write_text_atomic(Path(a.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
