"""Benchmark: hardware-aware mixed precision vs uniform INT4 g128 / INT8 on SmolLM2-135M (issue 6 item 5).

    .venv/bin/python tools/bench_mixed.py --out benchmarks/mixed_unfolded   # full run (~6 min on 2 cores)
    .venv/bin/python tools/bench_mixed.py --out /tmp/mixed-quick --quick    # sanity run

Norm gains stay unfolded (--fold-norms false, as `--recipe auto` and the INT4 presets); benchmarks/mixed/ is a
run from before that choice existed, with every plan and baseline folded.

Everything is weight-only round-to-nearest (RTN): asymmetric groups of 128 for 2-6 bits (never the
asymmetric g32 that reproduces the Q4_1 source exactly), symmetric per channel for 8 bits, in the PyTorch simulation; perplexity on 16 evaluation windows of 512 tokens of enwiki
(disjoint from the 8 calibration windows the sensitivity analysis uses). One Fisher analysis serves
every budget. Configurations marked `emb int8 (sim)` additionally round the tied embedding / LM head
to int8 per row in place (simulated; the QDIR format does not store quantized embeddings yet) and
count it at its int8 size with quant.json's accounting.

Writes results.json after every configuration (a rerun skips finished ones), then results.md and
pareto.png / pareto.svg. Not imported by edgeq.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeq.data import lm_windows  # noqa: E402
from edgeq.evaluate import perplexity  # noqa: E402
from edgeq.fileio import write_json_atomic, write_text_atomic  # noqa: E402
from edgeq.models import load_model  # noqa: E402
from edgeq.models.inputs import calibration_batches  # noqa: E402
from edgeq.quantize.mixed import MixedOptions, allowed_bit_specs, analyze, auto_quantize  # noqa: E402
from edgeq.quantize.primitives import compute_qparams, dequantize, quantize  # noqa: E402
from edgeq.quantize.ptq import quantize_model  # noqa: E402
from edgeq.quantize.qmodel import model_float_bytes  # noqa: E402
from edgeq.quantize.sensitivity import Objective, mean_loss, measure_layers  # noqa: E402
from edgeq.recipe import QuantRecipe  # noqa: E402

MODEL = "smollm2-135m"
ALL_BITS = (2, 3, 4, 5, 6, 8)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


SYMMETRIC = False  # 2-6 bits: asymmetric (uint) groups of 128; 8 bits is always symmetric per channel
OPTIONS = MixedOptions(symmetric=SYMMETRIC, measure="model")  # main() sets fold_norms from --fold-norms


def uniform_recipe(bits: int, group: int | None, fold_norms: bool) -> QuantRecipe:
    w = {"bits": bits, "symmetric": SYMMETRIC or bits == 8, "granularity": "group" if group else "channel"}
    if group:
        w["group_size"] = group
    # the tied head stays float, as in the mixed plans
    return QuantRecipe.from_dict({"name": f"w{bits}" + (f"-g{group}" if group else ""), "untie_head": False,
                                  "fold_norms": fold_norms,
                                  "rules": [{"match": r"^lm_head$", "skip": True}, {"match": ".*", "weight": w}]})


def embedding_int8_(model) -> tuple[int, int]:
    """Round the (tied) input embedding to int8 per row in place; returns (fp32 bytes, int8 bytes incl. scales)."""
    emb = model.get_input_embeddings().weight
    w = emb.detach().float()
    scale, zp = compute_qparams(w, 8, True, "channel")
    with torch.no_grad():
        emb.copy_(dequantize(quantize(w, scale, zp, 8, True), scale, zp))
    return w.numel() * 4, w.numel() + w.shape[0] * 4


def ppl_of(model, windows) -> dict:
    @torch.no_grad()
    def forward(ids):
        return model(torch.from_numpy(ids)).logits.float().numpy()

    return perplexity(forward, windows)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"configs": {}}
        self.bundle0 = load_model(MODEL)
        tok = self.bundle0.tokenizer
        self.windows = lm_windows(tok, "enwiki", "evaluation", args.seq_len, args.eval_windows)
        self.calib = calibration_batches(self.bundle0, "enwiki", args.calib_windows, args.seq_len, batch_size=1)
        self.fp32_bytes = model_float_bytes(self.bundle0.module)

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def fresh(self):
        return load_model(MODEL)

    def record(self, name: str, fn) -> dict:
        if name in self.data["configs"]:
            log(f"{name}: done before, skipped")
            return self.data["configs"][name]
        log(f"{name} ...")
        t = time.time()
        entry = fn()
        entry["seconds"] = round(time.time() - t, 1)
        entry["reduction"] = 1 - entry["bytes"] / self.fp32_bytes
        fp = self.data["configs"].get("fp32", entry)
        entry["ppl_delta_pct"] = 100 * (entry["ppl"] / fp["ppl"] - 1)
        self.data["configs"][name] = entry
        self.save()
        log(f"{name}: {entry['bytes'] / 1e6:.2f} MB, ppl {entry['ppl']:.3f} ({entry['ppl_delta_pct']:+.2f}%), {entry['seconds']} s")
        return entry

    def fp32(self) -> dict:
        return {"kind": "fp32", "bytes": self.fp32_bytes, "avg_bits": 32.0, **self._ppl(self.bundle0.module)}

    def _ppl(self, model) -> dict:
        r = ppl_of(model, self.windows)
        return {"ppl": r["ppl"], "nll": r["nll"], "tokens": r["tokens"]}

    def uniform(self, bits: int, group: int | None, emb: bool = False) -> dict:
        b = self.fresh()
        qm = quantize_model(b, uniform_recipe(bits, group, OPTIONS.fold_norms), None)
        s = qm.summary()
        size, extra = s["bytes_after"], {}
        if emb:
            fp, q = embedding_int8_(qm.model)
            size, extra = size - fp + q, {"embedding": "int8 per row (simulated)"}
        return {"kind": "uniform", "recipe": qm.recipe.name, "bytes": size, "bytes_qdir": s["bytes_after"],
                "avg_bits": s["avg_bits"], **extra, **self._ppl(qm.model)}

    def mixed(self, analysis, budget: str, label: str, emb: bool = False) -> dict:
        b = self.fresh()
        # RTN needs no calibration; these windows only measure the final loss (quant.json measured_loss)
        qm = auto_quantize(b, None, budget, self.calib[: self.args.measure_windows], options=OPTIONS,
                           analysis=analysis)
        s = qm.summary()
        m = s["mixed"]
        size, extra = s["bytes_after"], {}
        if emb:
            fp, q = embedding_int8_(qm.model)
            size, extra = size - fp + q, {"embedding": "int8 per row (simulated)"}
        hist = {}
        for layer in m["layers"].values():
            hist[str(layer["bits"])] = hist.get(str(layer["bits"]), 0) + 1
        (self.out / "plans").mkdir(exist_ok=True)
        write_json_atomic(self.out / "plans" / f"{label}.json", {k: v for k, v in s.items()})
        return {"kind": "mixed", "bits_set": sorted(analysis.specs), "budget": budget, "bytes": size,
                "bytes_qdir": s["bytes_after"], "avg_bits": s["avg_bits"], "bits_histogram": hist, **extra,
                "strategy": m["allocation"]["strategy"], "predicted_loss_increase": m["predicted_loss_increase"],
                "measured_calib_loss_increase": m["measured_loss_increase"], **self._ppl(qm.model)}


def correlation(bench: Bench, analysis, n_layers: int, bits: int) -> dict:
    """Measured (layer alone, RTN) vs Fisher-predicted loss increase on a random sample of layers."""
    b = bench.fresh()
    from edgeq.quantize.transforms import fold_norms

    if analysis.folded_norms:
        fold_norms(b.module)
    names = random.Random(0).sample(sorted(analysis.layers), min(n_layers, len(analysis.layers)))
    batches = bench.calib[: bench.args.measure_windows]
    obj = Objective(True)
    base = mean_loss(b.module, batches, obj)
    measured = measure_layers(b.module, {n: analysis.specs[bits] for n in names}, batches, obj, base)
    predicted = {n: analysis.table[n][bits] for n in names}
    from edgeq.quantize.mixed import _spearman

    return {"bits": bits, "layers": names, "measured": measured, "predicted": predicted,
            "spearman": _spearman([predicted[n] for n in names], [measured[n] for n in names]),
            "windows": len(batches), "base_loss": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/mixed")
    ap.add_argument("--quick", action="store_true", help="sanity run: 2 eval windows, 2 calibration windows of 256")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=4, help="calibration windows (RTN needs them only for the analysis and measured loss)")
    ap.add_argument("--analysis-windows", type=int, default=4, help="windows the Fisher analysis uses")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--measure-layers", type=int, default=24, help="layers sampled for the predicted-vs-measured check (0: skip)")
    ap.add_argument("--measure-windows", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fold-norms", choices=["true", "false"], default="false",
                    help="fold norm gains into the weights, mixed plans and uniform baselines alike (false: as --recipe auto "
                         "and the INT4 presets; runs before 2026-12-05 folded)")
    ap.add_argument("--render", action="store_true", help="only write OUT/results.md and the plots from OUT/results.json")
    args = ap.parse_args()
    if args.render:
        out = Path(args.out)
        data = json.loads((out / "results.json").read_text())
        report(SimpleNamespace(args=args, out=out, data=data, fp32_bytes=data["configs"]["fp32"]["bytes"],
                               windows=[None] * args.eval_windows))
        return
    global OPTIONS
    OPTIONS = replace(OPTIONS, fold_norms=args.fold_norms == "true")
    if args.quick:
        args.eval_windows, args.calib_windows, args.seq_len, args.measure_layers = 2, 2, 256, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    bench = Bench(args)
    bench.data["command"] = "python tools/bench_mixed.py " + " ".join(sys.argv[1:])
    bench.data["setup"] = {"model": MODEL, "eval": f"enwiki evaluation half, {len(bench.windows)} windows x {args.seq_len} tokens",
                           "calibration": f"enwiki calibration half, {args.calib_windows} windows x {args.seq_len} tokens",
                           "method": "weight-only RTN; 2-6 bits asymmetric g128, 8 bits symmetric per channel; tied embedding/head fp32 unless noted; "
                                     f"norm gains {'folded' if OPTIONS.fold_norms else 'unfolded'}",
                           "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads}
    bench.record("fp32", bench.fp32)
    w4 = bench.record("w4-g128", lambda: bench.uniform(4, 128))
    report(bench)

    log("sensitivity analysis ...")
    t = time.time()
    specs, _ = allowed_bit_specs(None, ALL_BITS, OPTIONS)
    ana_bundle = bench.fresh()
    analysis = analyze(ana_bundle, bench.calib[: args.analysis_windows], specs, OPTIONS)
    del ana_bundle
    bench.data["analysis"] = {"seconds": round(time.time() - t, 1), "windows": min(args.analysis_windows, len(bench.calib)),
                              "base_loss": analysis.base_loss, "layers": {
        n: {"sensitivity": s.sensitivity, "variance": s.variance, "input_kurtosis": s.kurtosis,
            "predicted_loss_by_bits": {str(b): v for b, v in analysis.table[n].items()}}
        for n, s in analysis.layers.items()}}
    bench.save()
    log(f"analysis: {time.time() - t:.0f} s")

    emb_w = bench.bundle0.module.get_input_embeddings().weight
    emb_fp, emb_q = emb_w.numel() * 4, emb_w.numel() + emb_w.shape[0] * 4
    todo = []  # most informative first: a run cut short by the deadline still answers the targets
    at_w4 = lambda label, bits, factor: (  # noqa: E731
        f"mixed {label} @ w4-g128 size x{factor:.2f}",
        lambda: bench.mixed(analysis.restrict(bits), f"{int(w4['bytes'] * factor)}B", _slug(f"{label}-x{factor:.2f}")))
    todo.append(at_w4("{2,3,4,8}", (2, 3, 4, 8), 1.00))
    todo.append(at_w4("{4,8}", (4, 8), 1.05))
    for share in (0.20,):
        name = f"mixed {{2,3,4,5,6,8}} + emb int8 (sim) @ {share:.0%} of fp32"
        budget = f"{int(share * bench.fp32_bytes - emb_q + emb_fp)}B"
        todo.append((name, lambda budget=budget, name=name: bench.mixed(analysis, budget, _slug(name), emb=True)))
    todo.append(("w8 (per channel)", lambda: bench.uniform(8, None)))
    todo.append(at_w4("{2,3,4,5,6,8}", ALL_BITS, 1.00))
    todo.append(at_w4("{4,8}", (4, 8), 1.00))
    todo.append(("w8 + emb int8 (sim)", lambda: bench.uniform(8, None, emb=True)))
    for avg in ("5bits", "3.5bits"):
        name = f"mixed {{2,3,4,5,6,8}} @ {avg}"
        todo.append((name, lambda avg=avg, name=name: bench.mixed(analysis, avg, _slug(name))))
    todo.append(("w3-g128", lambda: bench.uniform(3, 128)))
    if args.quick:
        todo = [todo[0], todo[2]]
    for name, fn in todo:
        bench.record(name, fn)
        report(bench)

    if args.measure_layers and "correlation" not in bench.data:
        log("predicted vs measured ...")
        bench.data["correlation"] = correlation(bench, analysis, args.measure_layers, 3)
        bench.save()
    bench.data["total_seconds"] = round(time.time() - t0, 1)
    bench.save()
    report(bench)
    log("done")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def report(bench: Bench) -> None:
    cfg = bench.data["configs"]
    rows = sorted(cfg.items(), key=lambda kv: kv[1]["bytes"])
    best = math.inf
    pareto = set()
    for name, e in rows:
        if e["ppl"] < best:
            pareto.add(name)
            best = e["ppl"]
    lines = ["# Mixed precision on SmolLM2-135M: size vs perplexity", "",
             f"Command: `{bench.data['command']}`", "",
             *(f"- {k}: {v}" for k, v in bench.data["setup"].items()), "",
             "## Pareto table (sorted by whole-model size; * = on the Pareto front)", "",
             "| config | size (MB) | avg bits (quantized layers) | ppl | bit-widths used |", "|---|---:|---:|---:|---|"]
    for name, e in rows:
        hist = ", ".join(f"{k}b x{v}" for k, v in sorted(e.get("bits_histogram", {}).items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {name}{' *' if name in pareto else ''} | {e['bytes'] / 1e6:.2f} | {e['avg_bits']:.3f} | {e['ppl']:.3f} | {hist} |")
    lines += ["", "## Hasan-style table (size reduction vs fp32, perplexity change)", "",
              "| config | size reduction | ppl | ppl delta vs fp32 |", "|---|---:|---:|---:|"]
    for name, e in rows:
        lines.append(f"| {name} | {100 * e['reduction']:.1f}% | {e['ppl']:.3f} | {e['ppl_delta_pct']:+.2f}% |")
    lines += ["", "## Targets (issue 6 item 5)", ""]
    w4 = cfg.get("w4-g128")
    if w4:
        cands = [(n, e) for n, e in cfg.items() if e["kind"] == "mixed" and e["bytes"] <= 1.05 * w4["bytes"] and "emb" not in n]
        if cands:
            n, e = min(cands, key=lambda kv: kv[1]["ppl"])
            ok = e["ppl"] < w4["ppl"]
            lines.append(f"- At the size of uniform INT4 g128 (+5% at most: <= {1.05 * w4['bytes'] / 1e6:.2f} MB): best mixed "
                         f"`{n}` {e['bytes'] / 1e6:.2f} MB, ppl {e['ppl']:.3f} vs uniform {w4['ppl']:.3f}: "
                         f"{'MET' if ok else 'NOT MET'} (strictly lower).")
    hits = [(n, e) for n, e in cfg.items() if e["reduction"] >= 0.80 and e["ppl_delta_pct"] <= 6.0]
    big = [(n, e) for n, e in cfg.items() if e["reduction"] >= 0.80]
    if hits:
        n, e = min(hits, key=lambda kv: kv[1]["ppl"])
        lines.append(f"- >= 80% whole-model size reduction within 6% of fp32 ppl: MET by `{n}` "
                     f"({100 * e['reduction']:.1f}%, {e['ppl_delta_pct']:+.2f}%).")
    else:
        best80 = min(big, key=lambda kv: kv[1]["ppl"]) if big else None
        lines.append("- >= 80% whole-model size reduction within 6% of fp32 ppl: NOT MET" +
                     (f"; best at >= 80%: `{best80[0]}` ({100 * best80[1]['reduction']:.1f}%, {best80[1]['ppl_delta_pct']:+.2f}%)." if best80 else "."))
    within = [(n, e) for n, e in cfg.items() if e["ppl_delta_pct"] <= 6.0]
    if within:
        n, e = max(within, key=lambda kv: kv[1]["reduction"])
        lines.append(f"- Largest reduction within 6% of fp32 ppl: `{n}` ({100 * e['reduction']:.1f}%, {e['ppl_delta_pct']:+.2f}%).")
    corr = bench.data.get("correlation")
    if corr and corr.get("spearman") is not None:
        lines += ["", "## Does the Fisher prediction track measured loss?", "",
                  f"{len(corr['layers'])} random layers, each alone RTN-quantized to {corr['bits']} bits (g128), loss on "
                  f"{corr['windows']} calibration windows: Spearman rank correlation predicted vs measured = "
                  f"{corr['spearman']:.3f}."]
    if "analysis" in bench.data:
        lines += ["", f"Sensitivity analysis (empirical Fisher from per-token gradients, one pass over "
                  f"{bench.data['analysis'].get('windows', '?')} calibration windows): "
                  f"{bench.data['analysis']['seconds']} s. Total benchmark: {bench.data.get('total_seconds', '?')} s."]
    lines += ["", "Sizes are whole-model bytes with quant.json's accounting (integers + scales + every float tensor). "
              "`emb int8 (sim)`: the tied embedding/head is rounded to int8 per row in place and counted at "
              "int8 + fp32 row scales (simulated here; `edgeq quantize --recipe auto --embedding-bits 8` stores it, "
              "benchmarks/mixed/ship_80.md).", ""]
    uniform = [n for n, e in cfg.items() if str(e.get("strategy", "")).startswith("uniform")]
    if any("strategy" in e for e in cfg.values()):
        lines += ["Mixed rows are what `--recipe auto` keeps: the allocator's plan, or the uniform plan of the same budget "
                  f"when that measured a lower loss on the {bench.args.measure_windows} calibration windows the final loss "
                  "is measured on (plans/*.json: `mixed.measured_alternative` has the other). Kept uniform: "
                  + (", ".join(f"`{n}`" for n in uniform) if uniform else "none") + ".", ""]
    write_text_atomic(bench.out / "results.md", "\n".join(lines))
    plot(bench, pareto)


def plot(bench: Bench, pareto: set) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = bench.data["configs"]
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"fp32": ("k", "*"), "uniform": ("tab:blue", "s"), "mixed": ("tab:red", "o")}
    for kind, (color, marker) in styles.items():
        pts = sorted((e["bytes"] / 1e6, e["ppl"], n) for n, e in cfg.items() if e["kind"] == kind)
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=color, marker=marker, label=kind, zorder=3)
        for x, y, n in pts:
            ax.annotate(n.replace("mixed ", "").replace(" (sim)", "*"), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((cfg[n]["bytes"] / 1e6, cfg[n]["ppl"]) for n in pareto)
    ax.plot([p[0] for p in front], [p[1] for p in front], "g--", lw=1, label="Pareto front")
    fp = cfg["fp32"]["ppl"]
    ax.axhline(fp * 1.06, color="gray", lw=0.8, ls=":", label="fp32 ppl +6%")
    ax.axvline(0.2 * bench.fp32_bytes / 1e6, color="gray", lw=0.8, ls="-.", label="80% size reduction")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("whole-model size (MB)")
    ax.set_ylabel(f"perplexity (enwiki, {len(bench.windows)} x {bench.args.seq_len} tokens)")
    ax.set_title("SmolLM2-135M: mixed precision vs uniform (weight-only RTN)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(bench.out / "pareto.png", dpi=130)
    fig.savefig(bench.out / "pareto.svg")


if __name__ == "__main__":
    main()
