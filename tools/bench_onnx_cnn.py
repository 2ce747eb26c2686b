"""Benchmark: edgeq's ONNX export of a CNN against ONNX Runtime's own quantizers, in one run. Not a test.

    .venv/bin/python tools/bench_onnx_cnn.py --model efficientnet-lite0 --out benchmarks/onnx_efficientnet

Rows (every file run in ONNX Runtime, CPU execution provider):
- fp32: edgeq's export of the float model (BatchNormalization kept, as traced);
- edgeq w8a8 (`int8`), with its default uint8 weight encoding and with `int8_weights="int8"` (ORT's own), each also
  with `output_grids=True` (every tensor a float op reads quantized: Conv outputs on calibrated grids, residual Adds
  through the next layer's grid, the pooling a GlobalAveragePool; outside the simulation);
- edgeq w8 (`dynamic-int8`);
- ORT quantize_static on the fp32 file after quant_pre_process (which folds the norms): QDQ, per-channel int8
  weights, uint8 activations, MinMax, every op it quantizes by default; calibrated on the same images as edgeq;
- ORT quantize_dynamic (per-channel; ConvInteger for convs);
- `--qdir`: existing QDIRs (e.g. `edgeq quantize --recipe auto --activation static`), each exported as its recipe's
  default variant with `output_grids=True` and `int8_weights="int8"`, rows named by the directory.
Quality: top-1 agreement with fp32 and mean KL(fp32 || file) on `--eval` held-back crops of the bundled photos.
Latency: one image, at 1 and 2 threads, the files interleaved round-robin, median of `--reps` after 5 warm-ups,
with `session.intra_op.allow_spinning=0` (the other sessions' idle threads would spin on the same cores).
Seconds (`s`): the row's quantize + export wall time (the later w8a8 rows reuse the first's QDIR: export only).
Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostinfo import machine, md_table, write_result  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # idle worker threads of the other interleaved sessions would spin on the 2 cores (as in bench_ptq.py)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _logits(path: Path, images: np.ndarray) -> np.ndarray:
    s = _session(path, 2)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: images[i:i + 1]})[0] for i in range(len(images))])


def _quality(ref: np.ndarray, got: np.ndarray) -> dict:
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref.astype(np.float64)), log_softmax(got.astype(np.float64))
    return {"top1_agree_fp32": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "kl_fp32": float((np.exp(lp) * (lp - lq)).sum(-1).mean())}


def _fused_ops(path: Path, work: Path) -> dict:
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(work / f"{path.stem}.optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    kernels = ("QLinearConv", "ConvInteger", "Conv", "FusedConv", "QGemm", "Gemm", "QLinearAdd", "Add",
               "QLinearGlobalAveragePool", "GlobalAveragePool", "ReduceMean", "DequantizeLinear")
    return {k: ops[k] for k in kernels if ops[k]}


def _latency(files: dict[str, Path], threads: int, reps: int) -> dict[str, float]:
    sessions = {k: _session(p, threads) for k, p in files.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(5):
            s.run(None, feeds[k])
    times: dict[str, list] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - t0)
    return {k: round(float(np.median(v)) * 1e3, 2) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/edgeq-bench-onnx-cnn")
    ap.add_argument("--calib", type=int, default=32, help="calibration images (both quantizers)")
    ap.add_argument("--eval", type=int, default=64, help="held-back evaluation images")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--qdir", nargs="+", default=[], help="existing QDIRs, exported with output grids and int8 weights")
    args = ap.parse_args()
    command = " ".join([".venv/bin/python tools/bench_onnx_cnn.py"] + sys.argv[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import onnxruntime
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgeq import data
    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe

    bundle = load_model(args.model)
    calib = calibration_batches(bundle, None, args.calib, 0)
    info = bundle.info
    images = data.images("images", args.eval, info.get("image_size", 224), split="evaluation",
                         mean=info.get("mean", 0.5), std=info.get("std", 0.5))
    rows: dict[str, dict] = {}
    files: dict[str, Path] = {}

    def timed(key: str, tool: str, what: str, fn) -> None:
        log(key)
        t0 = time.perf_counter()
        meta = fn() or {}
        rows[key] = {"tool": tool, "what": what, "quantize_export_s": round(time.perf_counter() - t0, 1),
                     "exact": meta.get("exact"), "size_mb": round(files[key].stat().st_size / 1e6, 2)}

    files["fp32"] = work / "fp32.onnx"
    timed("fp32", "edgeq", "export of the float model", lambda: export(args.model, "onnx", files["fp32"]))
    grids = {"output_grids": True, "calib_samples": args.calib}
    for recipe, key, opts in (("w8a8", "edgeq w8a8", {}), ("w8a8", "edgeq w8a8 int8 weights", {"int8_weights": "int8"}),
                              ("w8a8", "edgeq w8a8 output grids", grids),
                              ("w8a8", "edgeq w8a8 output grids int8 weights", {**grids, "int8_weights": "int8"}),
                              ("w8", "edgeq w8", {})):
        files[key] = work / f"{key.replace(' ', '-')}.onnx"

        def run(recipe=recipe, key=key, opts=opts):
            qdir = work / f"q-{recipe}"
            if not qdir.is_dir():
                quantize_model(load_model(args.model), load_recipe(recipe), calib).save(qdir)  # it quantizes the bundle in place
            return export(qdir, "onnx", files[key], **opts)

        timed(key, "edgeq", ", ".join([f"recipe {recipe}"] + [f"{k}={v}" for k, v in opts.items()]), run)

    for qdir in map(Path, args.qdir):
        key = f"edgeq {qdir.name} output grids int8 weights"
        files[key] = work / f"{qdir.name}.onnx"
        recipe = json.loads((qdir / "quant.json").read_text())["recipe"]
        timed(key, "edgeq", f"recipe {recipe} ({qdir}), output_grids=True, int8_weights=int8",
              lambda qdir=qdir, key=key: export(qdir, "onnx", files[key], **grids, int8_weights="int8"))
        rows[key]["qdir"] = str(qdir)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b[0][i:i + 1].numpy()} for b in calib for i in range(len(b[0]))])

        def get_next(self):
            return next(self.it, None)

    pre = work / "fp32.pre.onnx"
    files["ORT quantize_static"] = work / "ort-static.onnx"
    files["ORT quantize_dynamic"] = work / "ort-dynamic.onnx"

    def ort_static():
        quant_pre_process(str(files["fp32"]), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(files["ORT quantize_static"]), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)

    timed("ORT quantize_static", "onnxruntime", "quant_pre_process, then QDQ, per-channel int8 weights, uint8 activations, MinMax",
          ort_static)
    timed("ORT quantize_dynamic", "onnxruntime", "per-channel int8 weights, on the pre-processed file",
          lambda: quantize_dynamic(str(pre), str(files["ORT quantize_dynamic"]), per_channel=True, weight_type=QuantType.QInt8))

    log("quality")
    ref = _logits(files["fp32"], images)
    for key, path in files.items():
        rows[key].update(_quality(ref, _logits(path, images)), ort_ops=_fused_ops(path, work))
    for threads in (1, 2):
        log(f"latency, {threads} thread(s), {args.reps} reps interleaved over {len(files)} files")
        for key, ms in _latency(files, threads, args.reps).items():
            rows[key][f"ms_{threads}t"] = ms

    result = {"command": command, "model": args.model, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), "onnxruntime": onnxruntime.__version__, "calib_images": args.calib,
              "eval_images": args.eval, "reps": args.reps, "rows": rows}
    lines = [f"# ONNX Runtime on {args.model}: edgeq's export vs ONNX Runtime's quantizers", "", "```", command, "```", "",
             f"Created {result['created']} on {result['machine']['cpu']} ({result['machine']['cores']} cores, shared), "
             f"onnxruntime {onnxruntime.__version__}. Quality on {args.eval} held-back crops of the bundled photos against "
             f"the fp32 file; both quantizers calibrated on the same {args.calib} images. Latency: one image, median of "
             f"{args.reps} interleaved runs after warm-up.", ""]
    lines += md_table(["file", "what", "exact", "top-1 vs fp32", "KL vs fp32", "size MB", "s", "ms 1 thread", "ms 2 threads",
                       "ORT's kernels (optimized graph)"],
                      [[key, r["what"], r["exact"], f"{r['top1_agree_fp32']:.4f}", f"{r['kl_fp32']:.4f}", r["size_mb"],
                        r["quantize_export_s"], r["ms_1t"], r["ms_2t"], json.dumps(r["ort_ops"])] for key, r in rows.items()])
    write_result(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
