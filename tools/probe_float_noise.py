"""Probe: how far LiteRT's own float arithmetic moves a quantized layer's input, against the noise floor's model. Not a test.

    .venv/bin/python tools/probe_float_noise.py --qdir QDIR [QDIR ...] --out benchmarks/float_noise_X

A file's parity verdict sets it against the noise floor: the simulation against itself with every quantized layer's
input x perturbed to x * (1 + 1e-6 N(0, 1)) (`meta.NOISE_REL`), which stands for a runtime's float reassociation. This
measures that reassociation in the runtime itself: each QDIR exported as `--variant fp32` (its dequantized weights,
float activations: no grid of its own), run in LiteRT with XNNPACK (1 thread) on the export's parity inputs, and each
quantized layer's input in the file (the input of the op labelled `edgeq/<layer>`) read against the simulation's with
float activations, on the rows parity reads (an encoder's token rows). Per layer: the mean |file - simulation|, as a
multiple of the floor's mean perturbation (1e-6 * sqrt(2 / pi) * mean |x|), and, for a layer with a static input
grid, both in steps of that grid (x 1000: about how many of 1000 values either moves across a rounding boundary).
A ratio above 1: the runtime moves that layer's input more than the floor's draws do. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostinfo import md_table, probe_heading, probe_record, write_result  # noqa: E402

FLOOR_MEAN = math.sqrt(2 / math.pi)  # E|N(0, 1)|


def layer_inputs(qdir: str, tmp: Path) -> tuple[dict, dict]:
    """{layer: (file's inputs, simulation's inputs)}, each a list of arrays (one per parity sample, used rows only),
    and the quantized layers."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeq.export import export
    from edgeq.export.tflite import DEFAULT_SEQ_LEN, _parity_inputs, _used_rows
    from edgeq.export.tflite_graph import labelled
    from edgeq.export.tflite_grids import RUNTIME_KINDS
    from edgeq.export.tflite_render import graph_module
    from edgeq.quantize.modules import activations_as
    from edgeq.quantize.qmodel import load_quantized
    from edgeq.recipe import ActSpec

    path = tmp / f"{Path(qdir).name}.fp32.tflite"
    export(qdir, "tflite", path, variant="fp32", cache_len=0)
    qm = load_quantized(qdir)
    bundle, layers = qm.bundle, qm.layers()
    interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True, num_threads=1)
    interpreter.allocate_tensors()
    names = {t["index"]: labelled(t["name"]) for t in interpreter.get_tensor_details()}
    op_input = {names[op["outputs"][0]][0]: op["inputs"][0] for op in interpreter._get_ops_details()
                if names[op["outputs"][0]] and op["op_name"] != "DELEGATE"}  # (XNNPACK's node lists them too)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.__setitem__(n, args[0].detach().clone()))
             for n, m in layers.items() if n in op_input and m.decision.kind in RUNTIME_KINDS]
    module, rows = graph_module(bundle, qm.model), _used_rows(bundle)
    out: dict[str, tuple[list, list]] = {}
    for sample in _parity_inputs(bundle, DEFAULT_SEQ_LEN):
        for detail, x in zip(interpreter.get_input_details(), sample):
            interpreter.set_tensor(detail["index"], x.numpy().astype(detail["dtype"]))
        interpreter.invoke()
        seen.clear()
        with torch.no_grad(), activations_as(layers, ActSpec()):
            module(*sample)
        for name, x in seen.items():
            got = interpreter.get_tensor(op_input[name])
            if got.ndim == 4:  # NHWC in the file
                got = got.transpose(0, 3, 1, 2)
            if got.size != x.numel():  # a convolution whose padding is an op before it
                continue
            sim, got = x.numpy(), got.reshape(x.shape)
            if sim.ndim == 3:  # [1, tokens, features]: the rows parity reads
                sim, got = rows(sim, sample), rows(got, sample)
            files, sims = out.setdefault(name, ([], []))
            files.append(got)
            sims.append(sim)
    for h in hooks:
        h.remove()
    return out, layers


def layer_row(name: str, m, files: list, sims: list, rel: float) -> dict:
    dev = float(np.mean(np.concatenate([np.abs(f - s).ravel() for f, s in zip(files, sims)])))
    floor = rel * FLOOR_MEAN * float(np.mean(np.concatenate([np.abs(s).ravel() for s in sims])))
    a = m.decision.activation
    row = {"layer": name, "kind": m.decision.kind, "grid": f"{a.mode} {a.bits}" if a.quantized else "float",
           "mean_abs_deviation": dev, "floor_mean_abs_perturbation": floor, "ratio": dev / floor if floor else None}
    if a.mode == "static":
        step = float(m.act_scale)
        row.update(per_1000_steps_file=1000 * dev / step, per_1000_steps_floor=1000 * floor / step)
    return row


def group(name: str) -> str:
    """A layer's name with its block index as *: one row per kind of layer."""
    return re.sub(r"\.\d+\.", ".*.", name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qdir", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--source", default="", help="how the QDIRs were made, for the Markdown")
    args = ap.parse_args()

    from edgeq.export.meta import NOISE_REL

    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for qdir in args.qdir:
            t0 = time.time()
            inputs, layers = layer_inputs(qdir, Path(tmp))
            layer_rows = [layer_row(n, layers[n], *inputs[n], NOISE_REL) for n in layers if n in inputs]
            models.append({"qdir": qdir, "recipe": json.loads((Path(qdir) / "quant.json").read_text())["recipe"],
                           "seconds": round(time.time() - t0, 1), "layers": layer_rows,
                           "skipped": sorted(set(layers) - set(inputs))})
            print(json.dumps({k: v for k, v in models[-1].items() if k != "layers"}), file=sys.stderr, flush=True)
    result = {**probe_record("probe_float_noise.py", args.source), "noise_rel": NOISE_REL, "models": models}
    write_result(args.out, result, "\n".join(markdown(result)) + "\n")


def markdown(result: dict) -> list[str]:
    lines = probe_heading(
        "LiteRT's own float noise at each quantized layer's input, against the noise floor's (probe)", result,
        "Each QDIR exported as `--variant fp32` and run in LiteRT (XNNPACK, 1 thread) on the export's parity inputs; "
        "each quantized layer's input in the file against the simulation's with float activations. \"ratio\": mean "
        f"|file - simulation| over the noise floor's mean perturbation ({result['noise_rel']:g} * sqrt(2/pi) * mean "
        "|x|); above 1 the runtime moves the input more than a draw of the floor does. \"per 1000 steps\": the same "
        "two in steps of the layer's static input grid, x 1000. Layers of the same kind in every block are one row: "
        "the median ratio over blocks, and the largest.")
    header = ["QDIR", "layers", "grid", "ratio: median / max", "per 1000 steps: file / floor (median)"]
    for model in result["models"]:
        groups: dict[str, list] = {}
        for row in model["layers"]:
            groups.setdefault(group(row["layer"]), []).append(row)
        body = []
        for name, rows in groups.items():
            ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
            steps = [(r["per_1000_steps_file"], r["per_1000_steps_floor"]) for r in rows if "per_1000_steps_file" in r]
            body.append([Path(model["qdir"]).name, f"{name} ({len(rows)})", rows[0]["grid"],
                         f"{statistics.median(ratios):.2f} / {max(ratios):.2f}" if ratios else "-",
                         (f"{statistics.median(s[0] for s in steps):.3g} / {statistics.median(s[1] for s in steps):.3g}"
                          if steps else "-")])
        lines += [f"## {Path(model['qdir']).name} ({model['recipe']})", ""] + md_table(header, body) + [""]
        if model["skipped"]:
            lines += [f"Not compared (no labelled op, or a convolution padded by an op before it): "
                      f"{', '.join(model['skipped'])}.", ""]
    return lines


if __name__ == "__main__":
    main()
