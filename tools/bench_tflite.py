"""Benchmark: edgeq's TFLite variants vs ai-edge-quantizer's own recipes (issue 3 item 8). Not a test.

    .venv/bin/python tools/bench_tflite.py --model smollm2-135m --out benchmarks/tflite_smollm2
    .venv/bin/python tools/bench_tflite.py --model efficientnet-lite0 --out benchmarks/tflite_efficientnet

One run per model, on the same float graph and the same data:
- edgeq: `edgeq export QDIR --format tflite` for the QDIRs of recipes w8 (dynamic-int8), w8a8-static (int8, full
  integer; --int8-recipe w8a8-static-fc2a16 adds the int8 file with 16x8 down-projections), w8a16-static (int16x8: full integer with 16-bit activations) and, for language models, w4-g64-litert (int4 blockwise, GPTQ, LiteRT's grid; SmolLM2's width 576 rules out blocks
  of 128); QDIRs are made here (or reused from --work) with the presets' own calibration.
- ai-edge-quantizer: `dynamic_wi8_afp32`, `weight_only_wi4_afp32`, `dynamic_wi4b32_afp32`, `static_wi8_ai8`
  applied to litert-torch's FP32 file of the float model (static calibration: 8 calibration inputs, and for a
  decoder LM's decode signature the decode steps edgeq's own full-integer export calibrates with).
Quality: language models: perplexity on 16 evaluation windows of 512 tokens of enwiki
(`lm_windows(tok, "enwiki", "evaluation", 512, 16)`) and next-token top-1 agreement with the FP32 file;
images: top-1 agreement and mean KL(fp32 || variant) on --images evaluation images (64). Latency: one full forward of
the file's input shape in LiteRT with XNNPACK, at 1 and 2 threads, variants interleaved round-robin, median of
--reps after 3 warm-up calls. Writes OUT.json and OUT.md (command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeq.export import export  # noqa: E402
from edgeq.export import tflite as tflite_export  # noqa: E402
from edgeq.export.tflite_quant import OUTPUT_CALIBRATIONS  # noqa: E402
from edgeq.export.tflite_runtime import TfliteRunner  # noqa: E402
from edgeq.fileio import write_json_atomic, write_text_atomic  # noqa: E402
from hostinfo import machine  # noqa: E402

COMMANDS: list[str] = []  # every run that contributed rows (a run resumes the previous one's results)
AEQ_RECIPES = ("dynamic_wi8_afp32", "weight_only_wi4_afp32", "dynamic_wi4b32_afp32", "static_wi8_ai8")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


DEFAULT_RECIPES = {"dynamic-int8": "w8", "int8": "w8a8-static", "int16x8": "w8a16-static", "int4": "w4-g64-litert"}  # their files keep the short name


def make_qdir(model: str, recipe_name: str, work: Path) -> tuple[Path, float | None]:
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe

    qdir = work / f"{model}-{Path(recipe_name).stem}"
    if (qdir / "quant.json").is_file():
        log(f"reuse {qdir}")
        return qdir, None
    t0 = time.perf_counter()
    bundle = load_model(model)
    recipe = load_recipe(recipe_name)
    calib = None
    if recipe.needs_calibration:
        calib = calibration_batches(bundle, None, recipe.calibration.samples, recipe.calibration.seq_len)
    quantize_model(bundle, recipe, calib).save(qdir, overwrite=True)
    return qdir, time.perf_counter() - t0


def aeq_quantize(fp32: Path, recipe_name: str, out: Path, calibration: dict[str, list[dict]]) -> float:
    from ai_edge_quantizer import quantizer, recipe

    t0 = time.perf_counter()
    qt = quantizer.Quantizer(str(fp32))
    qt.load_quantization_recipe(getattr(recipe, recipe_name)())
    result = None
    if qt.need_calibration:
        result = qt.calibrate(calibration, num_threads=2)
    q = qt.quantize(result, enable_progress_report=False)
    out.write_bytes(bytes(q.quantized_model))
    return time.perf_counter() - t0


def lm_quality(path: Path, windows: np.ndarray, ref_top1: list | None) -> tuple[dict, list]:
    runner = TfliteRunner(path, threads=2)
    nll, count, top1s, agree = 0.0, 0, [], 0
    for i, w in enumerate(windows):
        logits = runner(w[None, :].astype(np.int64))[0][0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
        top1 = logits.argmax(-1)
        top1s.append(top1)
        if ref_top1 is not None:
            agree += int((top1 == ref_top1[i]).sum())
    total = sum(len(t) for t in top1s)
    return {"ppl": float(np.exp(nll / count)), "top1_agree_fp32": agree / total if ref_top1 is not None else 1.0}, top1s


def image_quality(path: Path, images: np.ndarray, ref: np.ndarray | None) -> tuple[dict, np.ndarray]:
    runner = TfliteRunner(path, threads=2)
    logits = np.concatenate([runner(images[i : i + 1])[0] for i in range(len(images))]).astype(np.float64)
    if ref is None:
        return {"top1_agree_fp32": 1.0, "kl_fp32": 0.0}, logits

    def logsoftmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsoftmax(ref), logsoftmax(logits)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    return {"top1_agree_fp32": float(np.mean(ref.argmax(-1) == logits.argmax(-1))), "kl_fp32": kl}, logits


def interleaved(calls: dict, reps: int, warmup: int = 3) -> dict[str, dict]:
    """Time each zero-argument call `reps` times, round-robin (rotated so none always runs first), after
    `warmup` calls each; median and p10/p90 in ms. Empties `calls`."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {n: [] for n in calls}
    names = list(calls)
    for rep in range(reps):
        for n in names[rep % len(names):] + names[: rep % len(names)]:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    calls.clear()  # the interpreters go before the next measurement
    gc.collect()
    return {n: {"median_ms": statistics.median(t), "p10_ms": float(np.percentile(t, 10)), "p90_ms": float(np.percentile(t, 90)),
                "n": len(t)} for n, t in times.items()}


def fresh_process_rounds(fn, args_for, names: list[str], rounds: int) -> list:
    """`fn(*args_for(order))` in `rounds` fresh (spawned) processes, each with `names` in an order rotated a further
    len(names) / rounds places: in one process the model loaded first ran slower than the same model loaded later
    (LiteRT and ONNX Runtime alike), so a fixed load order would favour whatever is loaded last. Returns each
    process's result, in round order."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = []
    for r in range(rounds):
        shift = r * len(names) // rounds % len(names)
        with ctx.Pool(1) as pool:
            out.append(pool.apply(fn, args_for(names[shift:] + names[:shift])))
    return out


def latency(files: dict[str, Path], example: list[np.ndarray], threads: int, reps: int) -> dict[str, dict]:
    return interleaved({n: functools.partial(TfliteRunner(p, threads=threads), *example) for n, p in files.items()}, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-bench-tflite", help="QDIRs and .tflite files")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--int4-recipe", nargs="+", default=["w4-g64-litert"],
                    help="recipe(s) (preset names or TOML paths) for the int4 rows (default w4-g64-litert)")
    ap.add_argument("--int8-recipe", nargs="+", default=["w8a8-static"],
                    help="recipe(s) for the full-integer int8 rows (default w8a8-static; w8a8-static-fc2a16 adds 16x8 down-projections)")
    ap.add_argument("--int8-qdir", nargs="+", default=[],
                    help="existing QDIRs (e.g. from `edgeq qat --loss kd`) exported as --variant int8 rows named by their directory")
    ap.add_argument("--qdir", nargs="+", default=[],
                    help="existing QDIRs (e.g. `edgeq quantize --recipe auto --runtime litert-xnnpack`) exported as their "
                         "recipe's default variant, rows named by their directory")
    ap.add_argument("--output-calibration", nargs="+", default=[OUTPUT_CALIBRATIONS[0]], choices=OUTPUT_CALIBRATIONS,
                    help="full-integer rows: how their output grids are calibrated (`edgeq export --output-calibration`); "
                         "each method a row of the same QDIR, named with it unless it is minmax, the default")
    ap.add_argument("--only", nargs="*", default=None,
                    help="edgeq recipes to include this run (default all); rows finished by an earlier run are kept")
    ap.add_argument("--images", type=int, default=64, help="image models: evaluation images for top-1 agreement and KL")
    ap.add_argument("--skip-latency", action="store_true", help="quality and size only (latency is measured in a later run)")
    ap.add_argument("--no-aeq", action="store_true", help="skip ai-edge-quantizer's recipes (another run's output has them)")
    ap.add_argument("--reuse-graphs", action="store_true",
                    help="reuse litert-torch graphs cached by earlier exports (convert_s is then 0: see the cached export's FILE.json)")
    args = ap.parse_args()
    command = "  ".join([".venv/bin/python tools/bench_tflite.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    from edgeq import data
    from edgeq.models import load_model

    bundle = load_model(args.model)
    is_lm = bundle.kind == "causal-lm"
    # full integer needs static activations in every layer: int8, or int16 (LiteRT's 16x8 mode)
    recipes = {"w8": "dynamic-int8", **{r: "int8" for r in args.int8_recipe}, "w8a16-static": "int16x8"}
    if is_lm:
        recipes.update({r: "int4" for r in args.int4_recipe})
    # rows finished by an earlier run (same model and sequence length) are kept: the run resumes
    previous = json.loads(Path(f"{out}.json").read_text()) if Path(f"{out}.json").is_file() else {}
    keep = previous.get("model") == args.model and previous.get("seq_len") in (args.seq_len, None)
    rows: dict[str, dict] = {n: r for n, r in previous.get("rows", {}).items() if keep and "error" not in r}
    files: dict[str, Path] = {n: Path(r["file"]) for n, r in rows.items() if Path(r.get("file", "")).is_file()}
    rows = {n: r for n, r in rows.items() if n in files}
    global COMMANDS  # the commands that made the rows kept, then this one
    COMMANDS = (previous.get("commands", []) if rows else []) + [command]

    fp32 = work / f"{args.model}-fp32.tflite"
    if "fp32" not in rows and fp32.is_file() and Path(f"{fp32}.json").is_file() and args.reuse_graphs:
        meta = json.loads(Path(f"{fp32}.json").read_text())  # an earlier run's conversion: keep its file and seconds
        files["fp32"] = fp32
        rows["fp32"] = {"tool": "litert-torch", "variant": "fp32", "convert_s": meta["timing_s"]["convert"], "quantize_s": 0.0}
    if "fp32" not in rows:
        log("fp32: litert-torch conversion of the float model")
        meta = export(args.model, "tflite", fp32, variant="fp32", seq_len=args.seq_len, cache=args.reuse_graphs)
        files["fp32"] = fp32
        rows["fp32"] = {"tool": "litert-torch", "variant": "fp32", "convert_s": meta["timing_s"]["convert"], "quantize_s": 0.0}
    else:
        meta = json.loads(Path(f"{fp32}.json").read_text())

    jobs = [(recipe_name, variant, None) for recipe_name, variant in recipes.items()]
    jobs += [(str(Path(q).resolve()), "int8", Path(q).resolve()) for q in args.int8_qdir]
    if args.qdir:
        from edgeq.export.tflite_grids import default_variant
        from edgeq.quantize.qmodel import load_quantized

        jobs += [(str(Path(q).resolve()), default_variant(load_quantized(q)), Path(q).resolve()) for q in args.qdir]
    jobs = [(*job, method) for job in jobs for method in (args.output_calibration if job[1] in tflite_export.FULL_INTEGER else [None])]
    for recipe_name, variant, given, method in jobs:
        stem = Path(recipe_name).stem if given is None else given.name
        tag = f", {method}" if method not in (None, OUTPUT_CALIBRATIONS[0]) else ""
        name = f"edgeq {variant} ({stem}{tag})"
        if name in rows or (args.only is not None and stem not in args.only):
            continue
        log(f"edgeq {recipe_name} -> {variant}")
        qdir, qs = make_qdir(args.model, recipe_name, work) if given is None else (given, None)
        path = work / (f"{args.model}-edgeq-{variant}.tflite" if stem == DEFAULT_RECIPES[variant] else f"{args.model}-edgeq-{variant}-{stem}.tflite")
        path = path.with_name(path.stem + tag.replace(", ", "-") + path.suffix)
        earlier = json.loads(Path(f"{path}.json").read_text()) if Path(f"{path}.json").is_file() else None
        if (args.reuse_graphs and earlier is not None and earlier["source"]["qdir"] == str(qdir.resolve())
                and (earlier.get("output_grids") or {}).get("calibration") == method):
            m = earlier  # exported by an earlier run from the same QDIR
        else:
            m = export(qdir, "tflite", path, variant=variant if given is not None else None, seq_len=args.seq_len,
                       **({"output_calibration": method} if method else {}))
        files[name] = path
        rows[name] = {"tool": "edgeq", "variant": variant, "recipe": recipe_name, "exact": m["exact"], "output_calibration": method,
                      "edgeq_quantize_s": None if qs is None else round(qs, 1), "convert_s": m["timing_s"]["convert"],
                      "quantize_s": m["timing_s"]["quantize"], "parity_vs_simulation": m["parity"]}
        if given is not None:  # how the QDIR was made: its recipe and, from edgeq qat, the training record
            qmeta = json.loads((given / "quant.json").read_text())
            rows[name]["recipe"] = qmeta["recipe"]
            rows[name]["qdir"] = str(given)
            if "qat" in qmeta:
                rec = qmeta["qat"]
                rows[name]["qat"] = {k: rec[k] for k in ("method", "config", "steps_done", "eval_loss_start", "eval_loss_end",
                                                       "eval_top1_agree_fp32_start", "eval_top1_agree_fp32_end", "step_seconds")
                                     if k in rec}
            if "mixed" in qmeta:  # `--recipe auto`: the plan's budget, target and bits per layer
                rec = qmeta["mixed"]
                bits = [e["weight"]["bits"] for e in qmeta["layers"]]
                rows[name]["mixed"] = {"budget": rec.get("budget"), "target": rec.get("target"),
                                       "avg_bits": qmeta.get("avg_bits"),
                                       "layers_by_bits": {str(b): bits.count(b) for b in sorted(set(bits))},
                                       "convolutions_kept_float": len(rec.get("convolutions_kept_float") or []),
                                       "measured_loss_increase": rec.get("measured_loss_increase")}

    # every signature of the fp32 file needs feeds (a decoder LM's has a decode step too): the feeds edgeq's
    # own full-integer export calibrates with, from the same 8 calibration inputs
    decode = (meta.get("graph") or {}).get("decode") or {}
    calibration = tflite_export._calibration(bundle, args.seq_len, 8, bundle.module, decode.get("cache_len", 0))
    for r in () if args.no_aeq else AEQ_RECIPES:
        path = work / f"{args.model}-aeq-{r}.tflite"
        name = f"aeq {r}"
        if name in rows:
            continue
        log(f"ai-edge-quantizer {r}")
        try:
            secs = aeq_quantize(fp32, r, path, calibration)
        except Exception as exc:  # record a recipe that fails on this model instead of stopping the run
            rows[name] = {"tool": "ai-edge-quantizer", "variant": r, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"  failed: {rows[name]['error']}")
            continue
        files[name] = path
        rows[name] = {"tool": "ai-edge-quantizer", "variant": r, "convert_s": rows["fp32"]["convert_s"], "quantize_s": round(secs, 2)}

    for name, path in files.items():
        rows[name]["size_mb"] = round(path.stat().st_size / 1e6, 2)
        rows[name]["file"] = str(path)

    log("quality")
    if is_lm:
        windows = data.lm_windows(bundle.tokenizer, "enwiki", "evaluation", 512, 16)
        q, ref_top1 = lm_quality(files["fp32"], windows, None)
        rows["fp32"].update(q)
        for name, path in files.items():
            if name != "fp32" and "ppl" not in rows[name]:
                log(f"  {name}")
                rows[name].update(lm_quality(path, windows, ref_top1)[0])
                save(out, command, args, bundle, meta, rows, is_lm)
        example = [windows[0][None, : args.seq_len].astype(np.int64)]
    else:
        images = data.images("images", args.images, bundle.info.get("image_size", 224), split="evaluation")
        q, ref = image_quality(files["fp32"], images, None)
        rows["fp32"].update(q)
        for name, path in files.items():
            if name != "fp32" and "kl_fp32" not in rows[name]:
                rows[name].update(image_quality(path, images, ref)[0])
        example = [images[:1]]

    for threads in () if args.skip_latency else (1, 2):
        log(f"latency, {threads} thread(s), {args.reps} reps interleaved over {len(files)} files")
        for name, lat in latency(files, example, threads, args.reps).items():
            rows[name][f"latency_{threads}t"] = lat
    save(out, command, args, bundle, meta, rows, is_lm)
    log(f"wrote {out}.json / .md")


def save(out: Path, command: str, args, bundle, meta: dict, rows: dict, is_lm: bool) -> None:
    result = {"command": command, "commands": COMMANDS, "model": args.model, "seq_len": args.seq_len if bundle.kind in ("causal-lm", "encoder") else None,
              "machine": machine(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "tools": meta.get("tools"), "rows": rows, "targets": targets(rows, is_lm)}
    write_json_atomic(Path(f"{out}.json"), result)
    write_text_atomic(Path(f"{out}.md"), markdown(result, is_lm))


def targets(rows: dict, is_lm: bool) -> dict:
    def get(prefix):
        return next((r for n, r in rows.items() if n.startswith(prefix) and "error" not in r), None)

    out = {}
    dyn, aeq_dyn = get("edgeq dynamic-int8"), get("aeq dynamic_wi8_afp32")
    if dyn and aeq_dyn and "latency_1t" in dyn and "latency_1t" in aeq_dyn:
        ratio = dyn["latency_1t"]["median_ms"] / aeq_dyn["latency_1t"]["median_ms"]
        out["dynamic_int8_latency_ratio_vs_aeq_1t"] = {"value": round(ratio, 3), "target": "<= 1.05", "met": ratio <= 1.05}
    aeq_static = get("aeq static_wi8_ai8")
    for name, full in rows.items():  # every full-integer int8 row, each against the same ai-edge-quantizer file
        if not (name.startswith("edgeq int8 ") and "top1_agree_fp32" in full):
            continue
        tag = "" if name == f"edgeq int8 ({DEFAULT_RECIPES['int8']})" else name[len("edgeq int8"):]
        out[f"int8_top1_agree_fp32{tag}"] = {"value": full["top1_agree_fp32"], "target": ">= 0.99" if is_lm else "report",
                                             "met": full["top1_agree_fp32"] >= 0.99}
        if aeq_static and ("ppl" if is_lm else "kl_fp32") in aeq_static:
            key = "ppl" if is_lm else "kl_fp32"
            better = full[key] < aeq_static[key]
            out[f"int8_better_than_static_wi8_ai8{tag}"] = {"edgeq": full[key], "aeq": aeq_static[key], "metric": key, "met": better}
    aeq4 = get("aeq dynamic_wi4b32_afp32")
    for name, int4 in rows.items():  # every int4 row, each against the same ai-edge-quantizer file
        if not (name.startswith("edgeq int4") and is_lm and aeq4 and "ppl" in int4 and "ppl" in aeq4):
            continue
        tag = "" if name == f"edgeq int4 ({DEFAULT_RECIPES['int4']})" else name[len("edgeq int4"):]
        out[f"int4_ppl_below_dynamic_wi4b32{tag}"] = {"edgeq": int4["ppl"], "aeq": aeq4["ppl"], "met": int4["ppl"] < aeq4["ppl"]}
        out[f"int4_size_not_larger{tag}"] = {"edgeq_mb": int4["size_mb"], "aeq_mb": aeq4["size_mb"],
                                             "met": int4["size_mb"] <= aeq4["size_mb"]}
    key = "ppl" if is_lm else "kl_fp32"
    for name, r in rows.items():  # `--recipe auto` rows against the uniform preset of their variant and ai-edge-quantizer
        preset_name = DEFAULT_RECIPES.get(r.get("variant"))
        preset = rows.get(f"edgeq {r.get('variant')} ({preset_name})")
        aeq = aeq_dyn if r.get("variant") in ("dynamic-int8", "int4") else aeq_static
        if "mixed" not in r or key not in r or not preset or key not in preset:
            continue
        entry = {"preset": preset_name, "size_ratio_vs_preset": round(r["size_mb"] / preset["size_mb"], 3),
                 f"{key}_ratio_vs_preset": round(r[key] / preset[key], 3)}
        for peer, label in ((preset, "preset"), (aeq, "aeq")):
            if peer and "latency_1t" in r and "latency_1t" in peer:
                ratio = r["latency_1t"]["median_ms"] / peer["latency_1t"]["median_ms"]
                entry[f"latency_1t_ratio_vs_{label}"] = round(ratio, 3)
        if aeq:
            entry["aeq"] = aeq["variant"]
        out[f"mixed {name[len('edgeq '):]}"] = {**entry, "target": "report"}
    return out


def markdown(result: dict, is_lm: bool) -> str:
    q = ["ppl", "top1_agree_fp32"] if is_lm else ["top1_agree_fp32", "kl_fp32"]
    head = ["file", "exact", *q, "size MB", "convert s", "quantize s", "ms 1 thread", "ms 2 threads"]
    reps = next(iter(result["rows"].values())).get("latency_1t", {}).get("n")
    timing = ("Latency: not measured in this run." if reps is None else
              f"Latency: median of {reps} interleaved calls after warm-up, LiteRT XNNPACK"
              + (f", one {result['seq_len']}-token prefill." if is_lm else ", one image."))
    lines = [f"# TFLite variants on {result['model']}: edgeq vs ai-edge-quantizer", "", "```", *result["commands"], "```", "",
             f"Created {result['created']} on {result['machine'].get('cpu', '?')} ({result['machine']['cores']} cores, shared). {timing}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue

        def f(v, nd=3):
            return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))

        lines.append("| " + " | ".join([name, f(r.get("exact")), *[f(r.get(k), 4) for k in q], f(r.get("size_mb"), 1),
                                        f(r.get("convert_s"), 1), f(r.get("quantize_s"), 1),
                                        f(r.get("latency_1t", {}).get("median_ms"), 1), f(r.get("latency_2t", {}).get("median_ms"), 1)]) + " |")
    for name, r in result["rows"].items():
        if "qat" in r:
            c, qat = r["qat"]["config"], r["qat"]
            lines += ["", f"{name}: `edgeq qat` of recipe {r['recipe']} ({qat['method']}, loss {c.get('loss', 'ce')}, "
                      f"{qat['steps_done']} steps x {c['batch']} x {c['seq_len']} tokens of {c['data']}, lr {c['lr']}, "
                      f"scale-lr {c['scale_lr']}, {c['threads']} threads, {qat['step_seconds']} s/step); its own evaluation "
                      f"({c['eval_windows']} x {c['seq_len']} tokens, PyTorch): top-1 agreement with FP32 "
                      f"{qat.get('eval_top1_agree_fp32_start')} -> {qat.get('eval_top1_agree_fp32_end')}, "
                      f"loss {qat['eval_loss_start']:.4f} -> {qat['eval_loss_end']:.4f}."]
        if "mixed" in r:
            m = r["mixed"]
            lines += ["", f"{name}: `edgeq quantize --recipe auto` for {m['target'].get('name')} / {m['target'].get('runtime')} "
                      f"at a budget of {m['budget'].get('text', m['budget'])}: {m['avg_bits']} avg bits, quantized layers by "
                      f"bits {m['layers_by_bits']}, {m.get('convolutions_kept_float', 0)} convolutions kept float by the "
                      f"plan; its loss increase on the calibration inputs (PyTorch) {m.get('measured_loss_increase')}."]
    lines += ["", "## Targets", ""]
    for k, v in result["targets"].items():
        lines.append(f"- {k}: {json.dumps(v)}")
    lines += ["", "convert s: litert-torch conversion (edgeq variants share one cached float graph of the quantized "
              "model's architecture, so only the first pays it; ai-edge-quantizer recipes start from the FP32 file). "
              "quantize s: the TFLite quantization step only (edgeq's own PTQ time is in the JSON as edgeq_quantize_s).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
