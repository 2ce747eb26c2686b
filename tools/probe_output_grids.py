"""Probe: what full-integer TFLite's output grids cost an LM, layer type by layer type. Not a test.

    .venv/bin/python tools/probe_output_grids.py --qdir QDIR_w8a8-static QDIR_w8a8-static-fc2a16 --out benchmarks/output_grids_smollm2

A full-integer TFLite file requantizes every quantized layer's output to a per-tensor grid (int8, int16 in 16x8
layers) that ai-edge-quantizer calibrates by min/max at export; edgeq's simulation keeps those outputs float.
This adds that step to the simulation: each selected layer's output is fake-quantized on an asymmetric int8
grid (zero point - 128, as LiteRT holds it) from the min/max of its outputs over the inputs the export
calibrates on (8 calibration inputs of --calib-len tokens), and measures next-token top-1 agreement with the
FP32 model and perplexity on enwiki evaluation windows, for each QDIR and each set of layers (a regex on the
layer name; the 16-bit layers of a QDIR are left float, their int16 output grids being ~256x finer).
Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeq.fileio import write_json_atomic, write_text_atomic  # noqa: E402
from hostinfo import machine  # noqa: E402

SETS = [("none", "^$"), ("every layer", "."), ("down_proj only", r"mlp\.down_proj$"),
        ("all but down_proj", r"^(?!.*mlp\.down_proj$)"), ("gate_proj and up_proj", r"mlp\.(gate|up)_proj$"),
        ("q_proj, k_proj, v_proj, o_proj", r"self_attn\.")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdir", nargs="+", required=True, help="quantized-model directories with static activations")
    ap.add_argument("--out", required=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-len", type=int, default=512, help="tokens per calibration input (the export's --seq-len)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-calibration", nargs="+", default=["minmax"],
                    help="how each output grid's range is chosen: minmax (what the export does), mse, or percentile:P "
                         "(both ends clipped at the P-th percentile of a sample of the outputs); one row per choice and set")
    ap.add_argument("--sets", nargs="+", help="labels of the layer sets to measure (default all)")
    args = ap.parse_args()

    import torch

    from edgeq.data import lm_windows
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.qmodel import load_quantized

    torch.set_num_threads(args.threads)
    rows = []
    reference = windows = None
    for qdir in args.qdir:
        qm = load_quantized(qdir)
        bundle, model, layers = qm.bundle, qm.bundle.module.eval(), qm.layers()
        if reference is None:
            windows = torch.from_numpy(lm_windows(bundle.tokenizer, "enwiki", "evaluation", args.seq_len, args.windows)).long()
            fp32 = load_model(bundle.reference).module.eval()
            with torch.no_grad():
                reference = torch.cat([fp32(w[None]).logits for w in windows]).float().argmax(-1)
            del fp32
        observers = _output_observers(model, layers, calibration_batches(bundle, None, 8, args.calib_len, batch_size=1))
        for (label, pattern), how in ((s, h) for s in SETS if not args.sets or s[0] in args.sets for h in args.output_calibration):
            if label == "none" and how != args.output_calibration[0]:
                continue
            chosen = [n for n, m in layers.items() if re.search(pattern, n) and m.decision.activation.bits == 8]
            t0 = time.perf_counter()
            hooks = [layers[n].register_forward_hook(_fake_quant_output(*_grid(observers[n], how))) for n in chosen]
            with torch.no_grad():
                logits = torch.cat([model(w[None]).logits for w in windows]).float()
            for h in hooks:
                h.remove()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
            rows.append({"qdir": str(qdir), "recipe": qm.recipe.name, "outputs_on_int8": label, "pattern": pattern, "output_calibration": how,
                         "layers": len(chosen), "top1_agree_fp32": float((logits.argmax(-1) == reference).float().mean()),
                         "ppl": math.exp(float(nll)), "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    result = {"command": shlex.join([".venv/bin/python", "tools/probe_output_grids.py"] + sys.argv[1:]), "machine": machine(),
              "windows": f"lm_windows(tok, 'enwiki', 'evaluation', {args.seq_len}, {args.windows})",
              "calibration": f"calibration_batches(bundle, None, 8, {args.calib_len}): each layer's outputs (row's output_calibration)",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    write_json_atomic(Path(f"{args.out}.json"), result)
    lines = ["# What full-integer TFLite's int8 output grids cost (PyTorch simulation, probe)", "", "```", result["command"], "```", "",
             f"Created {result['created']}. Each listed layer's output fake-quantized on an int8 grid from its "
             f"outputs over 8 calibration inputs of {args.calib_len} tokens (what the export calibrates on); "
             f"{args.windows} enwiki evaluation windows of {args.seq_len} tokens; top-1 agreement with the FP32 model.", "",
             "Output calibration: minmax is what the export does; percentile:P clips both ends at the P-th percentile of a "
             "sample of the outputs (edgeq's ActObserver), mse picks the clipping with the least squared error on it.", "",
             "| recipe | outputs on int8 grids | output calibration | layers | top-1 vs fp32 | ppl |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['outputs_on_int8']} | {r.get('output_calibration', 'minmax')} | {r['layers']} | "
              f"{r['top1_agree_fp32']:.4f} | {r['ppl']:.3f} |" for r in rows]
    write_text_atomic(Path(f"{args.out}.md"), "\n".join(lines) + "\n")


def _output_observers(model, layers: dict, batches) -> dict:
    """An ActObserver (ranges and a sample) of each layer's outputs over `batches`."""
    import torch

    from edgeq.quantize.observers import ActObserver

    observers = {n: ActObserver() for n in layers}
    hooks = [m.register_forward_hook(lambda module, inputs, out, obs=observers[n]: obs.observe(out)) for n, m in layers.items()]
    with torch.no_grad():
        for batch in batches:
            model(*batch)
    for h in hooks:
        h.remove()
    return observers


def _grid(obs, how: str):
    """LiteRT's asymmetric int8 output grid (edgeq's uint8 grid, scale (hi - lo) / 255: the same real grid as int8 with
    zero point - 128) from the observer's min/max (what the export calibrates), percentile or MSE choice."""
    if how.startswith("percentile:"):
        return obs.qparams("percentile", 8, False, float(how.split(":", 1)[1]))
    return obs.qparams(how, 8, False)


def _fake_quant_output(scale, zero):
    from edgeq.quantize.primitives import fake_quant_act

    def hook(module, inputs, out):
        return fake_quant_act(out, scale, zero)
    return hook

if __name__ == "__main__":
    main()
