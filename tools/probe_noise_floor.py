"""Probe: where an exported file sits among its simulation's noise-floor draws. Not a test.

    .venv/bin/python tools/probe_noise_floor.py --export QDIR:FORMAT [QDIR:FORMAT ...] --out benchmarks/noise_floor_X
        [--draws N] [--rel 1e-6 2e-6 measured=benchmarks/float_noise_tflite.json]

A file's parity verdict sets it against the noise floor: the PyTorch simulation run against itself with every
quantized layer's input perturbed by 1e-6, the worst of up to `meta.NOISE_DRAWS` draws (FILE.json
`parity.noise_floor`, each draw in `per_draw`; an export stops drawing once the file is within the floor, this probe
takes all of them). If the file departs from the simulation by float noise like the draws', it is one more draw, and
falls below the worst of k draws on a measure with probability 1/(k+1). This exports each QDIR in its FORMAT (onnx
or tflite; `edgeq export`, the default variant, TFLite without a decode signature) and reports, per measure (the worst
row's cosine, top-1 agreement, an LM's mean NLL offset), the file's value, the draws' range and median, how many
draws are further from the simulation than the file, and what the floor would have said with only the first 3 draws
(the rule before 2026-12-06), and, against the simulation, how many draws miss the variant's tolerance: how often a
file that is one more draw would. `--draws N` takes N draws (default `meta.NOISE_DRAWS`); `--rel` exports each file
once per noise model: a relative perturbation for every layer, or `measured=PATH` (TFLite files only), each layer's
own from tools/probe_float_noise.py's OUT.json: the layer's ratio there times 1e-6, never below 1e-6, so the floor
widens where LiteRT was measured noisier. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeq.export.verdict import BESIDE, TOLERANCE  # noqa: E402
from hostinfo import md_table, probe_heading, probe_record, write_result  # noqa: E402


def standing(file_value: float, draws: list[float], higher_is_better: bool = True) -> dict:
    """The file's measure among the draws': their range and median, how many draws are worse than the file, and
    whether it is at or above the worst of all draws and of the first 3."""
    worse = (lambda d: d < file_value) if higher_is_better else (lambda d: d > file_value)
    at_floor = (lambda ds: file_value >= min(ds)) if higher_is_better else (lambda ds: file_value <= max(ds))
    return {"file": file_value, "draws_min": min(draws), "draws_median": statistics.median(draws),
            "draws_max": max(draws), "draws_worse_than_file": sum(map(worse, draws)), "draws": len(draws),
            "within_all": at_floor(draws), "within_first_3": at_floor(draws[:3])}


def measure(parity: dict, floor: dict, file_nll: float | None = None, simulation_nll: float | None = None) -> dict:
    """The file's standing (`standing`) on each measure `floor` has draws for: the file's `parity` against a
    simulation, and an LM's mean NLL, the file's and that simulation's."""
    per_draw = floor["per_draw"]
    out = {"cos_min": standing(parity["cos_min"], per_draw["cos_min"]),
           "top1_agree": standing(parity["top1_agree"], per_draw["top1_agree"])}
    if "nll_offset" in per_draw:
        out["nll_offset"] = standing(abs(file_nll - simulation_nll), [abs(d) for d in per_draw["nll_offset"]],
                                     higher_is_better=False)
    return out


def measures(meta: dict) -> dict:
    """The file's standing against the simulation (`measures`, with how many draws miss the variant's tolerance on
    each row check), and against each simulation with a rounding the file does that its FILE.json has (`beside`)."""
    parity = meta["parity"]
    nll = parity.get("nll") or {}
    out = {"measures": measure(parity, parity["noise_floor"], nll.get("file"), nll.get("simulation")), "beside": {}}
    for what, bound in zip(("cos_min", "top1_agree"), TOLERANCE[meta["variant"]]):
        out["measures"][what]["draws_below_tolerance"] = sum(d < bound for d in parity["noise_floor"]["per_draw"][what])
        out["measures"][what]["tolerance"] = bound
    for key, what in BESIDE:
        if key in parity:
            out["beside"][f"with {what}"] = measure(parity[key], parity[key]["noise_floor"], nll.get("file"),
                                          parity[key].get("nll_simulation"))
    return out


def measured_rel(path: str, qdir: str, rel: float) -> dict[str, float] | None:
    """Each layer's perturbation from tools/probe_float_noise.py's OUT.json for `qdir`: `rel` times the layer's ratio
    of LiteRT's float noise to the floor's, never below `rel`; None if that file measured no model from `qdir`."""
    models = [m for m in json.loads(Path(path).read_text())["models"]
              if Path(m["qdir"]).resolve() == Path(qdir).resolve()]
    if not models:
        return None
    return {row["layer"]: rel * max(1.0, row["ratio"]) for row in models[0]["layers"] if row["ratio"] is not None}


def noise_model(text: str) -> str:
    """A `--rel` value as the rows name it: a relative perturbation ("1e-06"), or "measured=PATH" of a file that
    exists."""
    if text.startswith("measured="):
        if not Path(text.partition("=")[2]).is_file():
            raise SystemExit(f"--rel {text}: no such file")
        return text
    try:
        return f"{float(text):g}"
    except ValueError:
        raise SystemExit(f"--rel {text}: a relative perturbation (1e-6) or measured=PATH") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", nargs="+", required=True, metavar="QDIR:FORMAT")
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=None, help="draws per floor (default: the export's, meta.NOISE_DRAWS)")
    ap.add_argument("--rel", nargs="+", default=None, metavar="REL|measured=PATH",
                    help="noise models, each exporting every file once (default: meta.NOISE_REL)")
    ap.add_argument("--source", default="", help="how the QDIRs were made, for the Markdown")
    args = ap.parse_args()

    from functools import partial

    from edgeq.cli.main import main as edgeq
    from edgeq.export import meta as floor

    default_rel, perturb = floor.NOISE_REL, floor.perturbed_quant_inputs
    floor.NOISE_DRAWS = args.draws or floor.NOISE_DRAWS
    floor.NOISE_DRAWS_MIN = floor.NOISE_DRAWS  # every draw, not only until the file is within the floor

    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        noises = [noise_model(n) for n in args.rel or [str(default_rel)]]
        for noise, pair in ((n, p) for n in noises for p in args.export):
            qdir, _, fmt = pair.rpartition(":")
            if fmt not in ("onnx", "tflite"):
                raise SystemExit(f"--export {pair}: FORMAT is onnx or tflite")
            if noise.startswith("measured="):
                rel = measured_rel(noise.partition("=")[2], qdir, default_rel) if fmt == "tflite" else None
                if rel is None:  # the float noise measured is LiteRT's, of some QDIRs
                    skipped.append(f"{pair} ({noise})")
                    continue
                # the export's floor calls meta.perturbed_quant_inputs by its name
                floor.perturbed_quant_inputs = partial(perturb, rel=rel)
            else:
                floor.perturbed_quant_inputs, floor.NOISE_REL = perturb, float(noise)
            out = Path(tmp) / f"{Path(qdir).stem}.{len(rows)}.{fmt}"
            extra = ["--cache-len", "0"] if fmt == "tflite" else []  # the floor's draws are of the prefill
            t0 = time.time()
            rc = edgeq(["export", qdir, "--format", fmt, "-o", str(out), "--json", *extra])
            if rc != 0:
                raise SystemExit(f"edgeq export {qdir} --format {fmt} failed with {rc}")
            meta = json.loads(Path(str(out) + ".json").read_text())
            parity = meta["parity"]
            rows.append({"qdir": str(qdir), "format": fmt, "variant": meta["variant"], "noise": noise,
                         "seconds": round(time.time() - t0, 1), "within_tolerance": parity["within_tolerance"],
                         "within_noise_floor": parity["within_noise_floor"], **measures(meta)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    result = {**probe_record("probe_noise_floor.py", args.source), "rows": rows, "skipped": skipped}
    write_result(args.out, result, "\n".join(markdown(result)) + "\n")


def noise_name(row: dict) -> str:
    """A row's noise model as the tables name it: "1e-06", or "measured" (rows from before the column: 1e-6)."""
    return row.get("noise", "1e-06").partition("=")[0]


def markdown(result: dict) -> list[str]:
    lines = probe_heading(
        "A file among its simulation's noise-floor draws (probe)", result,
        "Each QDIR exported in its default variant; the file's measure against the simulation, and the same measure "
        "of each noise-floor draw (the simulation against itself, every quantized layer's input perturbed by the "
        "row's noise: a relative perturbation for every layer, or \"measured\", each layer's own from "
        "tools/probe_float_noise.py, never below 1e-6); \"against\": the simulation of quant.json, or that simulation "
        "with a rounding the file does (a hybrid file's run-time grid, a full-integer file's output grids), with its "
        "own draws. \"worse draws\": how many draws are further from the simulation than the file; a file that is one "
        "more draw has every rank equally likely. \"first 3\": at or above the worst of the first 3 draws (the floor "
        "before 2026-12-06). \"draws below tolerance\": against the simulation, how many draws miss the variant's "
        "bound on that measure (`verdict.TOLERANCE`; since 2026-12-06 an encoder's verdict bounds its cosine only), so "
        "how often a file that is one more draw would.")
    header = ["file", "variant", "noise", "against", "measure", "file's", "draws: worst / median / best", "worse draws",
              "within all", "within first 3", "draws below tolerance"]
    body = []
    for row in result["rows"]:
        name = f"{Path(row['qdir']).stem}.{row['format']}"
        noise = noise_name(row)
        for simulation, standings in {"the simulation": row["measures"], **(row.get("beside") or {})}.items():
            for what, s in standings.items():
                worst, best = s["draws_min"], s["draws_max"]
                if what == "nll_offset":  # an offset is worse the larger it is
                    worst, best = best, worst
                below = (f"{s['draws_below_tolerance']} of {s['draws']} (< {s['tolerance']})"
                         if "draws_below_tolerance" in s else "-")
                body.append([name, row["variant"], noise, simulation, what, f"{s['file']:.4f}",
                             f"{worst:.4f} / {s['draws_median']:.4f} / {best:.4f}",
                             f"{s['draws_worse_than_file']} of {s['draws']}", "yes" if s["within_all"] else "no",
                             "yes" if s["within_first_3"] else "no", below])
    lines += md_table(header, body)
    lines += ["", "Verdicts as exported (all draws): " + ", ".join(
        f"{Path(r['qdir']).stem}.{r['format']} ({noise_name(r)}) within tolerance "
        f"{r['within_tolerance']}, within noise floor {r['within_noise_floor']}" for r in result["rows"]) + "."]
    if result.get("skipped"):
        lines += ["", f"Not run (no float noise measured for that file): {', '.join(result['skipped'])}."]
    return lines


if __name__ == "__main__":
    main()
