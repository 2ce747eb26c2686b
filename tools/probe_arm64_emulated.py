"""Probe: edgeq's files in the aarch64 builds of ONNX Runtime and LiteRT, on emulated Raspberry Pi CPUs. Not a test.

    .venv/bin/python tools/probe_arm64_emulated.py setup --rootfs /tmp/arm64   # once, as root (see `setup`)
    .venv/bin/python tools/probe_arm64_emulated.py run --rootfs /tmp/arm64 --work /tmp/arm64-work \\
        --out benchmarks/arm64_emulated_efficientnet

The board profiles' ARM rows were written from the runtimes' documentation and from runs on x86. This runs the files
in the runtimes' aarch64 wheels (the ones `pip install edgeq[agent]` takes on a Raspberry Pi), in a Debian bookworm
arm64 userland (Raspberry Pi OS's base: Python 3.11), under qemu-user emulating each CPU of `--cpus`:
cortex-a72 (Raspberry Pi 4: NEON only, as Jetson Nano's A57), cortex-a76 (Raspberry Pi 5: NEON dot product, fp16, as
Jetson Orin's A78AE), max (also i8mm, SVE).
The runtimes pick their kernels by the CPU features the emulated CPU reports, as on the board, so what is measured is
what an ARM build does with a file: which kernels ONNX Runtime fuses (its optimized graph, read by the board agent's
own `runtime.kernels` code), which nodes XNNPACK takes, and the outputs, against the same files on this x86 host.
Emulation says nothing about speed: no time is reported.

Files (`run` exports them into --work unless there): EfficientNet-Lite0 with `w8a8` (ONNX int8: uint8 and int8 weight
encodings, each with and without --output-grids), `w8a8-sym` (int8 activations, with and without --output-grids: ONNX
Runtime turns some int8 Q/DQ into uint8 on x86, not on ARM), `w8` (ONNX and TFLite dynamic-int8), `w8a8-static`
(TFLite int8), fp32 in both formats, ONNX Runtime's quantize_static of the fp32 file, and any --extra files (e.g.
ai-edge-quantizer's from tools/bench_tflite.py's work directory); inputs: `--eval` held-back crops of the bundled
photos. Or, with `--files`, a language model's exported files (e.g. `make demo`'s), on `--eval` evaluation windows
of `--seq-len` tokens; a copy of an ONNX file named `X-acc4.onnx` whose FILE.json asks for MatMulNBits accuracy
level 4 is also compared with `X.onnx` on the same CPU.
Per file and CPU: top-1 agreement and max |diff| of the logits against the same file on x86 (beside FILE.json's
noise floor), top-1 agreement with the fp32 file on that CPU; for ONNX, the ops ONNX Runtime ran on integer kernels,
by kind (`FUSED`), against those `edgeq check --target` calls integer (rpi4 for cortex-a72, rpi5 otherwise); for
TFLite, XNNPACK's nodes and what it leaves to built-in kernels against FILE.json `graph.xnnpack` (the x86 export
host's). For the image model's ONNX files, where the CPU's integers first part from x86's: each file again with every
QuantizeLinear output a graph output too, run on the first inputs; and each QDQ residual Add and the pooling of
`w8a8-grids.onnx` as a file of its own on random integers, on every platform against the ONNX definition computed
here. With no --no-agent, `edgeq agent serve` also runs there and is profiled over HTTP. Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CPUS = {"cortex-a72": "rpi4", "cortex-a76": "rpi5", "max": "rpi5"}
# what `edgeq check` calls integer (ops with 8-bit activations; MatMuls with 4-bit weights) against the ONNX Runtime
# kernels those become: category -> (check's ops, ORT's kernels)
FUSED = {
    "int8 weight ops": ({"Conv", "Gemm", "MatMul", "MatMulInteger", "ConvInteger"},
                        {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger",
                         "DynamicQuantizeMatMul"}),
    "4-bit MatMul": ({"MatMul"}, {"MatMulNBits"}),
    "Add": ({"Add"}, {"QLinearAdd"}),
    "GlobalAveragePool": ({"GlobalAveragePool"}, {"QLinearGlobalAveragePool"}),
}


TAP_INPUTS = 4  # inputs whose every quantized tensor is compared between x86 and ARM
OP_DRAWS = 50  # random integer inputs per single-op file


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- worker: runs inside the arm64 rootfs (and on the host, for the reference); imports no torch ----

def _hwcaps() -> list[str]:
    import ctypes

    getauxval = ctypes.CDLL(None).getauxval
    getauxval.restype = ctypes.c_ulong
    hwcap, hwcap2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2 (aarch64 bit numbers)
    bits = {"fphp": (hwcap, 9), "asimddp": (hwcap, 20), "sve": (hwcap, 22), "i8mm": (hwcap2, 13), "bf16": (hwcap2, 14)}
    return [name for name, (word, bit) in bits.items() if word >> bit & 1]


def worker(job: Path, out: Path) -> None:
    import platform

    from edgeq.agent.runtimes import load
    from edgeq.export.onnx_runtime import OnnxRunner
    from edgeq.export.tflite_runtime import TfliteRunner, xnnpack_coverage

    inputs = np.load(job / "inputs.npy")  # images [n, 3, h, w] or token windows [n, seq]
    result = {"machine": platform.machine(), "python": platform.python_version(), "files": {}}
    if platform.machine() == "aarch64":
        result["hwcaps"] = _hwcaps()
    logits = {}
    for path in sorted(job.glob("*.onnx")) + sorted(job.glob("*.tflite")):
        model = load(path, 1)  # as the board agent loads it
        result.setdefault("runtimes", {})[model.runtime["name"]] = model.runtime["version"]
        if path.suffix == ".onnx":
            entry = model.deferred_coverage()  # the agent's `runtime.kernels`
        else:  # as FILE.json's (the agent reads the same off its interpreter; LiteRT logs XNNPACK once a process)
            entry = {"xnnpack": xnnpack_coverage(path, "serving_default")}
        del model
        # outputs as `edgeq eval` runs the file (ONNX: with FILE.json's session options)
        runner = OnnxRunner(path, threads=1) if path.suffix == ".onnx" else TfliteRunner(path, threads=1)
        logits[path.name] = np.concatenate([runner(inputs[i:i + 1])[0] for i in range(len(inputs))])
        del runner
        result["files"][path.name] = entry
        print(path.name, flush=True)
    np.savez(out.with_suffix(".npz"), **logits)
    taps, ops = _run_taps(job, inputs[:TAP_INPUTS], result), {}
    for path in sorted((job / "ops").glob("*.onnx")):  # single QDQ units on random integers
        feeds = np.load(path.with_suffix(".npz"))
        session = _session(path)
        n = len(feeds[feeds.files[0]])
        ops[path.stem] = np.stack([session.run(None, {k: feeds[k][i] for k in feeds.files})[0] for i in range(n)])
        result.setdefault("ops", {})[path.stem] = _fused(path)
    np.savez_compressed(out.with_suffix(".taps.npz"), **taps, **{f"op/{k}": v for k, v in ops.items()})
    out.write_text(json.dumps(result, indent=1))


def _fused(path: Path) -> dict | None:
    """The op counts of the graph ONNX Runtime optimized from `path` on this CPU (the agent's `runtime.kernels`)."""
    from edgeq.agent.runtimes import load

    return (load(path, 1).deferred_coverage()["kernels"] or {}).get("ops")


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_taps(job: Path, inputs: np.ndarray, result: dict) -> dict[str, np.ndarray]:
    """Each taps/FILE.onnx (FILE with every QuantizeLinear output a graph output too) on `inputs`: "FILE/tensor" -> the
    integers, [n, ...]; the kernels ONNX Runtime made of it in result["taps"]."""
    taps = {}
    for path in sorted((job / "taps").glob("*.onnx")):
        result.setdefault("taps", {})[path.stem] = _fused(path)
        session = _session(path)
        names = [o.name for o in session.get_outputs()[1:]]  # the file's own output comes first
        feed = session.get_inputs()[0].name
        runs = [session.run(names, {feed: inputs[i:i + 1]}) for i in range(len(inputs))]
        taps.update({f"{path.stem}/{n}": np.stack([r[j] for r in runs]) for j, n in enumerate(names)})
    return taps


# ---- host side ----

def setup(rootfs: Path) -> None:
    """Debian bookworm arm64 (debootstrap), qemu-user through binfmt_misc, and the aarch64 wheels of the runtimes this
    host's venv has, from PyPI, installed into /opt/venv there. Needs root and Debian's qemu-user-static and
    debootstrap (`apt-get install qemu-user-static debootstrap`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:  # the aarch64 wheels are pinned to the versions this venv runs on x86
        runtimes = [f"onnxruntime=={version('onnxruntime')}", f"ai-edge-litert=={version('ai-edge-litert')}",
                    f"numpy=={version('numpy')}"]
    except PackageNotFoundError as e:
        raise SystemExit(f"setup: {e.name} is not installed in {sys.executable}; run setup with the repo's .venv/bin/python")
    pins = [*runtimes, "psutil>=5.9", "click>=8.1", "platformdirs>=3", "pyyaml>=6", "tomli-w>=1.0"]
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=True)
    if not (binfmt / "qemu-aarch64").exists():
        (binfmt / "register").write_text(Path("/usr/lib/binfmt.d/qemu-aarch64.conf").read_text().strip())
    if not (rootfs / "usr/bin/python3").exists():
        subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,python3-pip",
                        "bookworm", str(rootfs), "http://deb.debian.org/debian"], check=True)
    if not (rootfs / "proc/self").exists():
        subprocess.run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], check=True)
    wheels = rootfs / "opt/wheels"
    platforms = [a for v in (17, 27, 28, 31, 34, 35, 36) for a in ("--platform", f"manylinux_2_{v}_aarch64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
                    "--implementation", "cp", "--platform", "manylinux2014_aarch64", *platforms, "-d", str(wheels), *pins],
                   check=True, env={**os.environ, "PIP_CONSTRAINT": ""})
    subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", "test -x /opt/venv/bin/python || python3 -m venv /opt/venv; "
                    "/opt/venv/bin/pip install -q --no-index --find-links /opt/wheels " + " ".join(f"'{p}'" for p in pins)],
                   check=True)
    cpu = rootfs / "sys/devices/system/cpu"  # what pytorch's cpuinfo in onnxruntime reads (no /sys mounted)
    cpu.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present"):
        (cpu / name).write_text("0-1\n")
    log(f"arm64 rootfs ready at {rootfs}")


def _export_files(work: Path, model: str, calib: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe

    batches = list(calibration_batches(load_model(model), None, calib, 0))
    qdirs = {}
    for recipe in ("w8a8", "w8a8-sym", "w8", "w8a8-static"):
        qdirs[recipe] = work / f"q-{recipe}"
        if not qdirs[recipe].is_dir():
            log(f"quantize {recipe}")
            quantize_model(load_model(model), load_recipe(recipe), batches).save(qdirs[recipe])  # quantizes in place
    files = {
        "fp32.onnx": (model, "onnx", {"variant": "fp32"}),
        "w8a8.onnx": (qdirs["w8a8"], "onnx", {}),
        "w8a8-int8w.onnx": (qdirs["w8a8"], "onnx", {"int8_weights": "int8"}),
        "w8a8-grids.onnx": (qdirs["w8a8"], "onnx", {"output_grids": True}),
        "w8a8-grids-int8w.onnx": (qdirs["w8a8"], "onnx", {"output_grids": True, "int8_weights": "int8"}),
        "w8a8-sym.onnx": (qdirs["w8a8-sym"], "onnx", {}),
        "w8a8-sym-grids.onnx": (qdirs["w8a8-sym"], "onnx", {"output_grids": True}),
        "w8.onnx": (qdirs["w8"], "onnx", {}),
        "fp32.tflite": (model, "tflite", {"variant": "fp32"}),
        "w8.tflite": (qdirs["w8"], "tflite", {}),
        "w8a8-static.tflite": (qdirs["w8a8-static"], "tflite", {}),
    }
    for name, (source, fmt, opts) in files.items():
        if not (work / name).exists():
            log(f"export {name}")
            export(source, fmt, work / name, **opts)

    if not (work / "ort-static.onnx").exists():
        log("ONNX Runtime quantize_static")
        quant_pre_process(str(work / "fp32.onnx"), str(work / "fp32.pre.onnx"), skip_symbolic_shape=True)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter([{"input": b[0][i:i + 1].numpy()} for b in batches for i in range(len(b[0]))])

            def get_next(self):
                return next(self.items, None)

        quantize_static(str(work / "fp32.pre.onnx"), str(work / "ort-static.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _tapped(src: Path, dest: Path) -> list[list[str]]:
    """`src` with every QuantizeLinear output a graph output too (after the file's own), written to `dest` if it has
    any: [tensor, the op type whose output the QuantizeLinear quantizes] in graph order. A QuantizeLinear's output
    stays the output of the kernel ORT fuses it into; the probe compares the kernels with the file's on each CPU."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src))
    types = {i.name: i.data_type for i in model.graph.initializer}
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    for n in qs:
        dtype = types.get(n.input[2], TensorProto.UINT8) if len(n.input) > 2 else TensorProto.UINT8
        model.graph.output.append(helper.make_tensor_value_info(n.output[0], dtype, None))
    if qs:
        onnx.save(model, str(dest))
    return [[n.output[0], producer.get(n.input[0], "input")] for n in qs]


def _single_ops(src: Path, dest: Path, seed: int = 0) -> dict[str, dict]:
    """One ONNX file per QDQ Add (both inputs dequantized, output quantized: QLinearAdd) and per GlobalAveragePool
    between DequantizeLinear and QuantizeLinear (QLinearGlobalAveragePool) of `src`, on its grids and shapes, with
    OP_DRAWS uniformly random integer inputs each (FILE.npz): name -> what `_op_reference` needs."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(src)))
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.value_info, *g.input]}
    rng = np.random.default_rng(seed)
    found = {}

    def grid(node) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(inits[node.input[1]]), np.asarray(inits[node.input[2]])

    for node in g.node:
        if node.op_type not in ("Add", "GlobalAveragePool"):
            continue
        dqs = [producer.get(i) for i in node.input]
        after = readers.get(node.output[0], [])
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in dqs) or len(after) != 1 \
                or after[0].op_type != "QuantizeLinear":
            continue
        params = {f"in{j}": grid(d) for j, d in enumerate(dqs)} | {"out": grid(after[0])}
        shape = [1, *shapes[dqs[0].input[0]][1:]]
        names = [f"x{j}" for j in range(len(dqs))]
        init = []
        for key, (scale, zero) in params.items():
            init += [numpy_helper.from_array(scale, f"{key}_s"), numpy_helper.from_array(zero, f"{key}_z")]
        nodes = [helper.make_node("DequantizeLinear", [x, f"in{j}_s", f"in{j}_z"], [f"f{j}"]) for j, x in enumerate(names)]
        nodes += [helper.make_node(node.op_type, [f"f{j}" for j in range(len(names))], ["r"]),
                  helper.make_node("QuantizeLinear", ["r", "out_s", "out_z"], ["y"])]
        elem = helper.np_dtype_to_tensor_dtype(params["in0"][1].dtype)
        out_elem = helper.np_dtype_to_tensor_dtype(params["out"][1].dtype)
        graph = helper.make_graph(nodes, node.name, [helper.make_tensor_value_info(x, elem, shape) for x in names],
                                  [helper.make_tensor_value_info("y", out_elem, None)], init)
        single = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        name = f"{node.op_type}-{len(found)}"
        onnx.save(single, str(dest / f"{name}.onnx"))
        info = np.iinfo(params["in0"][1].dtype)
        feeds = {x: rng.integers(info.min, info.max + 1, (OP_DRAWS, *shape), dtype=params["in0"][1].dtype) for x in names}
        np.savez(dest / f"{name}.npz", **feeds)
        found[name] = {"op": node.op_type, "node": node.name, "shape": shape, "params": params, "feeds": feeds}
    return found


def _op_reference(op: dict) -> np.ndarray:
    """The ONNX definition of a single QDQ unit on its inputs: DequantizeLinear in fp32, the op, QuantizeLinear (x /
    scale in fp32, rounded half to even, saturated). The mean of GlobalAveragePool from the exact integer sum (fp64):
    ONNX fixes no order of summation in fp32."""
    (so, zo), out = op["params"]["out"], np.iinfo(op["params"]["out"][1].dtype)
    ints = [op["feeds"][f"x{j}"].astype(np.int64) - int(op["params"][f"in{j}"][1]) for j in range(len(op["feeds"]))]
    if op["op"] == "Add":
        value = sum(i.astype(np.float32) * np.float32(op["params"][f"in{j}"][0]) for j, i in enumerate(ints))
        scaled = value / np.float32(so)
    else:
        n = int(np.prod(op["shape"][2:]))
        scaled = ints[0].sum(axis=tuple(range(3, ints[0].ndim)), keepdims=True) * (np.float64(op["params"]["in0"][0]) / n) \
            / np.float64(so)
    return np.clip(np.rint(scaled) + int(zo), out.min, out.max)


def _divergence(order: list[list[str]], host: dict, arm: dict, file: str) -> dict:
    """Where `file`'s integers on an ARM CPU first differ from x86's, in the graph's order of QuantizeLinear nodes."""
    differing = []
    for t, op in order:
        a, b = host[f"{file}/{t}"].astype(np.int64), arm[f"{file}/{t}"].astype(np.int64)
        if not np.array_equal(a, b):
            differing.append({"tensor": t, "quantizes": op, "elements": int((a != b).sum()), "of": int(a.size),
                              "max_steps": int(np.abs(a - b).max())})
    return {"tensors": len(order), "differing": len(differing), "first": differing[0] if differing else None,
            "last": differing[-1] if differing else None}


def _agent_smoke(rootfs: Path, work: Path, files: list[Path], cpu: str, worker_result: dict) -> list[dict]:
    """`edgeq agent serve` in the arm64 userland, profiled from this host with `edgeq profile` over HTTP on 127.0.0.1:
    whether each job completes and what the agent reports of the runtime (not its times: emulated)."""
    import secrets
    import socket

    token = rootfs / "opt/agent-token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log(f"agent on aarch64 {cpu} (emulated), port {port}")
    proc = subprocess.Popen(["chroot", str(rootfs), "/usr/bin/env", f"QEMU_CPU={cpu}", "PYTHONPATH=/opt/edgeq-src",
                             "/opt/venv/bin/python", "-m", "edgeq.cli.main", "agent", "serve", "--port", str(port),
                             "--token-file", "/opt/agent-token", "--data-dir", "/opt/agent-data", "--power-meter", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("EDGEQ_AGENT_LISTENING"):
            raise SystemExit(f"the agent did not start: {line!r}")
        out = []
        for f in files:
            done = subprocess.run([str(ROOT / ".venv/bin/edgeq"), "profile", str(f), "--device", line.split()[1],
                                   "--token-file", str(token), "--runs", "5", "--min-seconds", "0.1",
                                   "--db", str(work / "agent-smoke.sqlite"), "--json"],
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode != 0:
                out.append({"file": f.name, "error": done.stderr.strip()[-500:]})
                continue
            row = json.loads(done.stdout)[0]
            r = row.get("result") or {}
            runtime = r.get("runtime") or {}
            key = "kernels" if f.suffix == ".onnx" else "xnnpack"
            account = runtime.get(key)
            out.append({"file": f.name, "state": row.get("error") or "done", "status": row.get("status"),
                        "machine": (r.get("fingerprint") or {}).get("machine"), "runtime": runtime.get("name"),
                        "version": runtime.get("version"), "provider": runtime.get("provider"), key: account,
                        "same_as_worker": account == worker_result["files"][f.name][key], "warnings": r.get("warnings")})
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _check_integer(path: Path, target: str) -> dict:
    from edgeq.targets import check

    rows = check(path, target, runtime="onnxruntime-cpu").rows

    def counts(category: str, row) -> bool:
        if category == "4-bit MatMul":
            return any(w in row.signature for w in ("w=int4", "w=uint4"))
        return row.signature.split()[0] in ("act=uint8", "act=int8")

    return {c: sum(r.count for r in rows if r.op in ops and counts(c, r)) for c, (ops, _) in FUSED.items()}


def _but_transposes(ops: dict | None) -> dict:
    """Op counts without Transposes: on ARM ORT runs integer convs in NHWC and transposes each tapped tensor back."""
    return {k: v for k, v in (ops or {}).items() if k != "Transpose"}


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def run(args) -> None:
    from hostinfo import machine, write_result

    from edgeq import data
    from edgeq.models import load_model

    rootfs, work = Path(args.rootfs), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = load_model(args.model)
    if args.files:  # given files of a language model: evaluation token windows
        inputs = data.lm_windows(bundle.tokenizer, "enwiki", "evaluation", args.seq_len, args.eval).astype(np.int64)
        files = [Path(f) for f in args.files]
    else:  # an image model: edgeq's files exported here, and ONNX Runtime's quantize_static
        info = bundle.info
        inputs = data.images("images", args.eval, info.get("image_size", 224), split="evaluation",
                             mean=info.get("mean", 0.5), std=info.get("std", 0.5)).astype(np.float32)
        _export_files(work, args.model, args.calib)
        files = [f for f in sorted(work.glob("*.onnx")) + sorted(work.glob("*.tflite"))
                 if not f.name.endswith((".pre.onnx", ".optimized.onnx"))]
    files += [Path(e) for e in args.extra]
    del bundle

    inside = f"/opt/edgeq-arm-job-{work.name}"  # the job's directory in the rootfs (and so, one per --work)
    job = rootfs / inside.lstrip("/")
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    np.save(job / "inputs.npy", inputs)
    for f in files:  # with FILE.json and external data (FILE.data), not a decode graph
        for extra in [f] + sorted(f.parent.glob(f"{f.name}.*")):
            shutil.copy(extra, job / extra.name)
    orders, single_ops = {}, {}
    if not args.files:  # every quantized tensor of each ONNX file; single QDQ units on random integers
        (job / "taps").mkdir()
        (job / "ops").mkdir()
        orders = {f.stem: order for f in files if f.suffix == ".onnx" and (order := _tapped(f, job / "taps" / f.name))}
        grids = work / "w8a8-grids.onnx"
        single_ops = _single_ops(grids, job / "ops") if grids.exists() else {}
    src = rootfs / "opt/edgeq-src"  # this tree's edgeq, torch-free parts used only
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(ROOT / "edgeq", src / "edgeq", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(__file__, job / "probe.py")

    log("x86 reference")
    host_out = work / "x86.json"
    subprocess.run([sys.executable, str(job / "probe.py"), "worker", str(job), str(host_out)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    results = {"x86": json.loads(host_out.read_text())}
    logits = {"x86": dict(np.load(host_out.with_suffix(".npz")))}
    taps = {"x86": dict(np.load(host_out.with_suffix(".taps.npz")))}
    for cpu in args.cpus:  # kept in --work: --reuse takes them instead of emulating again
        if not (args.reuse and (work / f"{cpu}.json").exists()):
            log(f"aarch64 {cpu} (emulated)")
            subprocess.run(["chroot", str(rootfs), "/usr/bin/env", f"QEMU_CPU={cpu}", "PYTHONPATH=/opt/edgeq-src",
                            "/opt/venv/bin/python", f"{inside}/probe.py", "worker", inside, f"{inside}/{cpu}.json"],
                           check=True, stdout=subprocess.DEVNULL)
            for suffix in (".json", ".npz", ".taps.npz"):
                shutil.copy(job / f"{cpu}{suffix}", work / f"{cpu}{suffix}")
        results[cpu] = json.loads((work / f"{cpu}.json").read_text())
        logits[cpu] = dict(np.load(work / f"{cpu}.npz"))
        kept = work / f"{cpu}.taps.npz"  # not in a --reuse'd run from before the taps
        taps[cpu] = dict(np.load(kept)) if kept.exists() else {}

    agent_json = work / "agent.json"
    if args.no_agent:
        agent = []
    elif args.reuse and agent_json.exists():
        agent = json.loads(agent_json.read_text())
    else:
        agent = _agent_smoke(rootfs, work, [f for f in files if f.suffix == ".onnx"][-1:]
                             + [f for f in files if f.suffix == ".tflite"][-1:], args.cpus[-1], results[args.cpus[-1]])
        agent_json.write_text(json.dumps(agent, indent=1))

    rows = {}
    for f in files:
        meta_path = f.parent / f"{f.name}.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        floor = (meta.get("parity") or {}).get("noise_floor") or {}
        row = {"format": f.suffix.lstrip("."), "recipe": meta.get("recipe"), "cpus": {},
               "noise_floor": {k: floor[k] for k in ("max_abs", "top1_agree") if k in floor} or None}
        base = f.name.replace("-acc4.onnx", ".onnx")  # a copy run at MatMulNBits accuracy level 4: against level 0
        if base != f.name and base in logits["x86"]:
            row["acc4_vs_acc0_max_abs"] = {c: float(np.abs(logits[c][f.name] - logits[c][base]).max())
                                           for c in ["x86", *args.cpus]}
        ref = logits["x86"][f.name]
        fp32 = next((g.name for g in files if g.suffix == f.suffix and g.stem.endswith("fp32")), None)
        if f.suffix == ".onnx":
            row["x86_kernels"] = results["x86"]["files"][f.name]["kernels"]
            row["check"] = {t: _check_integer(f, t) for t in sorted(set(CPUS[c] for c in args.cpus))}
        else:
            row["x86_xnnpack"] = results["x86"]["files"][f.name]["xnnpack"]
            row["file_json_xnnpack"] = ((meta.get("graph") or {}).get("xnnpack") or {}).get("serving_default")
        for cpu in args.cpus:
            got = logits[cpu][f.name]
            cell = {"max_abs_vs_x86": float(np.abs(got - ref).max()), "bitwise_x86": bool(np.array_equal(got, ref)),
                    "top1_vs_x86": _top1(got, ref), "top1_vs_fp32": _top1(got, logits[cpu][fp32]) if fp32 else None}
            entry = results[cpu]["files"][f.name]
            if f.suffix == ".onnx":
                kernels = entry["kernels"]
                cell["kernels"] = kernels
                cell["integer"] = {c: sum(kernels["ops"].get(k, 0) for k in ort) for c, (_, ort) in FUSED.items()}
                cell["check_agrees"] = cell["integer"] == row["check"][CPUS[cpu]]
                cell["same_graph_as_x86"] = kernels["ops"] == row["x86_kernels"]["ops"]
                if f.stem in orders and taps[cpu]:
                    cell["divergence"] = _divergence(orders[f.stem], taps["x86"], taps[cpu], f.stem)
                    cell["divergence"]["taps_same_kernels"] = \
                        _but_transposes(results[cpu]["taps"][f.stem]) == _but_transposes(kernels["ops"])
            else:
                cell["xnnpack"] = entry["xnnpack"]
                cell["same_as_file_json"] = entry["xnnpack"] == row["file_json_xnnpack"]
            row["cpus"][cpu] = cell
        rows[f.name] = row

    ops_out = {}
    for name, op in single_ops.items() if all(taps.values()) else ():
        ref = _op_reference(op)
        ops_out[name] = {"op": op["op"], "node": op["node"], "shape": op["shape"], "elements": int(ref.size)}
        for c in ["x86", *args.cpus]:
            got = taps[c][f"op/{name}"].astype(np.int64)
            ops_out[name][c] = {"differ_from_onnx": int((got != ref).sum()), "max_steps": int(np.abs(got - ref).max()),
                                "kernels": results[c]["ops"][name]}

    result = {"command": args.command, "date": time.strftime("%Y-%m-%d"), "machine": machine(), "model": args.model,
              "inputs": f"{args.eval} evaluation windows of {args.seq_len} enwiki tokens (top-1: each position's next "
                        "token)" if args.files else
                        f"{args.eval} held-back crops of the bundled photos", "cpus": {c: results[c].get("hwcaps") for c in args.cpus},
              "runtimes": {"x86": results["x86"].get("runtimes"), "aarch64": results[args.cpus[0]].get("runtimes")},
              "aarch64_python": results[args.cpus[0]]["python"], "agent": agent, "rows": rows,
              "tap_inputs": TAP_INPUTS, "single_ops": ops_out, "single_ops_source": "w8a8-grids.onnx" if ops_out else None}
    write_result(args.out, result, _markdown(result, args))


def _fmt_ops(counts: dict) -> str:
    return ", ".join(f"{n} {op}" for op, n in counts.items() if n) or "none"


def _markdown(result: dict, args) -> str:
    from hostinfo import md_table

    cpus = args.cpus
    lines = [f"# edgeq files in the aarch64 builds of ONNX Runtime and LiteRT, emulated ({result['model']})", "",
             f"Command: `{result['command']}`", "",
             f"Date {result['date']}. Host: {result['machine']['cpu']}. aarch64: Debian bookworm arm64 (Python "
             f"{result['aarch64_python']}) under qemu-user {', '.join(cpus)}; runtimes there "
             f"{result['runtimes']['aarch64']}, on x86 {result['runtimes']['x86']}. CPU features each emulated CPU "
             f"reported: " + "; ".join(f"{c}: {', '.join(f) or 'NEON only'}" for c, f in result["cpus"].items()) + ".",
             "", f"Inputs: {result['inputs']}, one at a time, 1 thread. Emulation "
             "measures which kernels run and what they compute, not speed: no time is reported.", "",
             "## Outputs: each file on each CPU against the same file on x86", ""]
    header = ["file"] + [f"{c}: top-1 vs x86 / max abs / top-1 vs fp32" for c in cpus] + [
        "noise floor: top-1 / max abs"]
    body = []
    for name, row in result["rows"].items():
        floor = row.get("noise_floor")
        cells = [name]
        for c in cpus:
            cell = row["cpus"][c]
            same = "bitwise" if cell["bitwise_x86"] else f"{cell['max_abs_vs_x86']:.3g}"
            vs_fp32 = "-" if cell["top1_vs_fp32"] is None else f"{cell['top1_vs_fp32']:.3f}"
            cells.append(f"{cell['top1_vs_x86']:.3f} / {same} / {vs_fp32}")
        cells.append(f"{floor['top1_agree']:.3f} / {floor['max_abs']:.3g}" if floor else "-")
        body.append(cells)
    lines += md_table(header, body)
    lines += ["", "Noise floor (FILE.json `parity.noise_floor`, where the export measured one): the PyTorch simulation "
              "against itself with every quantized layer's input perturbed by 1e-6, the worst of 3 draws on the "
              "export's parity tokens: how far float reassociation alone moves the outputs."]
    for name, row in result["rows"].items():
        if "acc4_vs_acc0_max_abs" in row:
            diffs = row["acc4_vs_acc0_max_abs"]
            lines += ["", f"`{name}` is `{name.replace('-acc4.onnx', '.onnx')}` run at MatMulNBits accuracy level 4 "
                      "(int8 activations where the CPU has a CompInt8 kernel, else CompFp32) instead of 0: max |diff| "
                      "against level 0 on the same CPU: " + ", ".join(f"{c} {v:.3g}" for c, v in diffs.items())
                      + " (0: the same float kernel ran)."]
    lines += _divergence_markdown(result, cpus)
    lines += ["", "## ONNX: integer kernels ONNX Runtime fused on ARM, against `edgeq check`", "",
              "Integer: the ops ONNX Runtime ran on integer kernels, by kind (int8 weight ops: QLinearConv, QGemm, "
              "QLinearMatMul, MatMulIntegerToFloat, MatMulInteger, ConvInteger, DynamicQuantizeMatMul; 4-bit "
              "MatMul: MatMulNBits; Add: QLinearAdd; GlobalAveragePool: QLinearGlobalAveragePool); `check says`: the "
              "ops `edgeq check` calls so (8-bit activations; MatMuls with 4-bit weights), target rpi4 for "
              "cortex-a72, rpi5 otherwise. `float on DQ`: weight ops left on float kernels "
              "over dequantized tensors (the agent's `runtime.kernels`). `x86 graph`: whether ONNX Runtime's optimized "
              "graph on x86 has the same ops (float convs differ there: x86 alone has the NCHWc layout transformer).", ""]
    header = ["file", "x86 graph"] + [f"{c} integer" for c in cpus] + ["check says", "agrees", "float on DQ (ARM)"]
    body = []
    for name, row in result["rows"].items():
        if row["format"] != "onnx":
            continue
        first = row["cpus"][cpus[0]]
        integer = [_fmt_ops(row["cpus"][c]["integer"]) for c in cpus]
        checks = {t: _fmt_ops(v) for t, v in row["check"].items()}
        body.append([name, "same as ARM" if all(row["cpus"][c]["same_graph_as_x86"] for c in cpus) else "differs"]
                    + integer + ["; ".join(f"{t}: {v}" for t, v in checks.items()),
                                 "yes" if all(row["cpus"][c]["check_agrees"] for c in cpus) else "NO",
                                 _fmt_ops(first["kernels"]["float_on_dequantized"])])
    lines += md_table(header, body)
    lines += [] if not result["agent"] else ["", f"## The board agent on aarch64 ({cpus[-1]}, emulated), profiled from this host over HTTP", "",
              "`edgeq agent serve` in the arm64 userland, `edgeq profile --device URL` here: each job's state and what "
              "the agent reported of its runtime (its times are the emulator's and are not reported).", ""]
    body = [[a["file"], a.get("error") or f"{a['state']} / {a['status']}", a.get("machine"),
             f"{a.get('runtime')} {a.get('version')} ({a.get('provider')})",
             "yes" if a.get("same_as_worker") else "NO", "; ".join(a.get("warnings") or []) or "none"]
            for a in result["agent"]]
    lines += md_table(["file", "job", "machine", "runtime", "kernels / XNNPACK as measured above", "warnings"], body) if body else []
    lines += ["", "## TFLite: what XNNPACK took on ARM, against FILE.json `graph.xnnpack` (x86)", ""]
    header = ["file"] + [f"{c}: nodes / partitions / built-in" for c in cpus] + ["as on x86"]
    body = []
    for name, row in result["rows"].items():
        if row["format"] != "tflite":
            continue
        cells = [name]
        for c in cpus:
            x = row["cpus"][c]["xnnpack"] or {}
            cells.append(f"{x.get('nodes')} / {x.get('partitions')} / {_fmt_ops(x.get('builtin') or {})}")
        cells.append("yes" if all(row["cpus"][c]["xnnpack"] == row["x86_xnnpack"] for c in cpus) else "NO")
        body.append(cells)
    lines += md_table(header, body)
    return "\n".join(lines) + "\n"


def _divergence_markdown(result: dict, cpus: list[str]) -> list[str]:
    from hostinfo import md_table

    rows = {n: r for n, r in result["rows"].items() if all("divergence" in r["cpus"][c] for c in cpus)}
    if not rows:
        return []
    lines = ["", "## Where ARM and x86 part: every quantized tensor of each ONNX file", "",
             f"Each file again with every QuantizeLinear output a graph output too, on the first {result['tap_inputs']} "
             "inputs: how many of its quantized tensors hold other integers on the CPU than on x86, and the first of them "
             "in graph order (the op whose output it quantizes: elements that differ / elements, largest difference in "
             "grid steps). `kernels`: whether ONNX Runtime fused the tapped file into the same kernels as the file "
             "(Transposes aside: on ARM ORT runs the integer convs in NHWC and transposes each tapped tensor back).", ""]
    body = []
    for name, row in rows.items():
        cells = [name]
        for c in cpus:
            d = row["cpus"][c]["divergence"]
            first = d["first"]
            cells.append(f"{d['differing']} of {d['tensors']}" + (
                f"; first `{first['tensor']}` ({first['quantizes']}): {first['elements']} / {first['of']}, "
                f"{first['max_steps']} step(s)" if first else ""))
        cells.append("same" if all(row["cpus"][c]["divergence"]["taps_same_kernels"] for c in cpus) else "DIFFER")
        body.append(cells)
    lines += md_table(["file"] + [f"{c}: tensors differing; first" for c in cpus] + ["kernels"], body)
    if result["single_ops"]:
        lines += ["", f"Single QDQ units of `{result['single_ops_source']}` (each residual Add and the pooling between "
                  "its DequantizeLinear and QuantizeLinear nodes, on the file's grids and shapes), on random integer "
                  "inputs, against the ONNX definition computed here (DequantizeLinear in fp32, the op, x / scale in fp32 "
                  "rounded half to even; the pooling's mean from the exact integer sum): elements that differ, largest "
                  "difference in steps.", ""]
        platforms = ["x86", *cpus]
        body = []
        for name, op in result["single_ops"].items():
            kernels = {p: _fmt_ops(op[p]["kernels"] or {}) for p in platforms}
            body.append([f"{op['node']} ({op['op']})", op["elements"],
                         kernels["x86"] if len(set(kernels.values())) == 1 else "; ".join(f"{p}: {k}" for p, k in kernels.items())]
                        + [f"{op[p]['differ_from_onnx']} / {op[p]['max_steps']}" for p in platforms])
        lines += md_table(["unit", "elements", "kernel"] + [f"{p}: differ / steps" for p in platforms], body)
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--rootfs", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rootfs", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    r.add_argument("--model", default="efficientnet-lite0")
    r.add_argument("--cpus", nargs="+", default=["cortex-a72", "cortex-a76"], choices=list(CPUS),
                   help="max (i8mm, SVE: no board of the profiles) is ~3x slower to emulate")
    r.add_argument("--calib", type=int, default=32)
    r.add_argument("--eval", type=int, default=16)
    r.add_argument("--extra", nargs="*", default=[], help="more .onnx / .tflite files of the same model to run")
    r.add_argument("--files", nargs="*", default=[],
                   help="a language model's files to run instead of exporting the image model's (fp32 named *fp32*)")
    r.add_argument("--seq-len", type=int, default=64, help="with --files: tokens per window")
    r.add_argument("--no-agent", action="store_true", help="skip profiling through the agent on aarch64")
    r.add_argument("--reuse", action="store_true", help="take the aarch64 runs kept in --work from an earlier run")
    args = ap.parse_args()
    args.command = " ".join([".venv/bin/python tools/probe_arm64_emulated.py"] + sys.argv[1:])
    setup(Path(args.rootfs)) if args.cmd == "setup" else run(args)


if __name__ == "__main__":
    main()
