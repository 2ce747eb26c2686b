"""The two runtimes behind one small interface: load, describe inputs, run, say what was used.

ONNX goes to onnxruntime (CPU execution provider); TFLite goes to LiteRT (`ai_edge_litert`),
falling back to the older `tflite_runtime` with the same Interpreter API. LiteRT applies its
XNNPACK delegate by default; whether it actually did is read from the runtime's own log line,
not assumed. With `weight_cache`, a TFLite file goes to LiteRT's CompiledModel API instead, with
XNNPACK's weight cache held in memory (`CompiledLiteRtModel`).
"""

from __future__ import annotations

import gc
import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from ..console import CapturedFd2
from ..errors import EdgeqError
from ..export.runtime_min import runtime_for, runtime_verdict
from ..export.tflite_runtime import arg_order, delegate_coverage, node_count, signature_io, xnnpack_coverage

WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "TRANSPOSE_CONV")

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class _CaptureStderr(CapturedFd2):
    """Descriptor 2 captured (C++ runtimes log there: LiteRT says whether it applied XNNPACK) and passed on whole."""

    def __exit__(self, *exc):
        super().__exit__(*exc)
        os.write(2, self.text.encode())
        return False


class OrtModel:
    format = "onnx"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        self.path, self.threads, self.coverage_pending = path, threads, True
        self.session = ort.InferenceSession(str(path), self._options(), providers=["CPUExecutionProvider"])
        self.runtime = {"name": "onnxruntime", "version": ort.__version__,
                        "provider": self.session.get_providers()[0],
                        "providers_available": ort.get_available_providers()}

    def _options(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return opts

    def deferred_coverage(self) -> dict:
        """`kernels`: what this board's ONNX Runtime made of the file (`onnxcheck.kernel_account` of the graph it
        optimized: op counts, and the weight ops it left float on dequantized tensors), or `kernels_note` saying why
        not measured. ONNX Runtime writes its optimized graph only while it creates a session, so a second session
        with the timed one's options writes it (weights to a side file) into a temporary directory in the job's;
        the runner calls this after the timed runs and the peak RSS, and the timed session is released first."""
        import onnxruntime as ort

        from .onnxcheck import graph_nodes, kernel_account

        self.session = None
        gc.collect()
        try:
            with tempfile.TemporaryDirectory(dir=self.path.parent) as tmp, _CaptureStderr():
                opts = self._options()
                opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
                opts.log_severity_level = 3  # not its warning that an optimized graph may be hardware-specific
                opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
                ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
                account = kernel_account(graph_nodes(opts.optimized_model_filepath))
        except Exception as exc:  # ORT's errors are plain Exceptions: none may cost the measured result
            return {"kernels": None, "kernels_note": f"not measured: a second session writing the optimized graph "
                                                     f"failed ({type(exc).__name__}: {str(exc)[:300]})"}
        return {"kernels": account, "kernels_note": "the graph a second session with the same options optimized, "
                                                    "after the timed runs"}

    def signature(self) -> list[dict]:
        """Inputs as name, dtype and shape (None or a string for a dynamic dim)."""
        return [{"name": i.name, "dtype": _ORT_TYPES.get(i.type, i.type),
                 "shape": [d if isinstance(d, (int, str)) else None for d in i.shape]}
                for i in self.session.get_inputs()]

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        self._feeds = feeds

    def run(self) -> None:
        self.session.run(None, self._feeds)

    def outputs(self) -> list[tuple[str, np.ndarray]]:
        """One more run, its outputs by name (`outputs.digest` sends them back in brief)."""
        return list(zip((o.name for o in self.session.get_outputs()), self.session.run(None, self._feeds)))


def _litert_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "litert", _version("ai-edge-litert")
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite_runtime", _version("tflite-runtime")
    except ImportError:
        raise EdgeqError("runtime: TFLite needs ai-edge-litert or tflite-runtime on the agent "
                         "(pip install 'edgeq[agent]')") from None


class LiteRtModel:
    """A .tflite file in LiteRT: its first subgraph through the interpreter's tensors, or one named
    signature (`decode` of a decoder LM's file) through its signature runner."""

    format = "tflite"

    def __init__(self, path: Path, threads: int, signature: str | None = None):
        interpreter_cls, name, version = _litert_interpreter()
        with _CaptureStderr() as log:
            self.interpreter = interpreter_cls(model_path=str(path), num_threads=threads)
            nodes = node_count(self.interpreter)  # before allocation applies the delegate
            self.interpreter.allocate_tensors()
            self.runner = None
            if signature is not None:
                known = self.interpreter.get_signature_list()
                if signature not in known:
                    raise EdgeqError(f"signature: {signature!r} is not one of the file's: {', '.join(sorted(known)) or 'none'}")
                self.runner = self.interpreter.get_signature_runner(signature)
        xnnpack = "XNNPACK" in log.text
        self.runtime = {"name": name, "version": version,
                        "provider": "XNNPACK delegate" if xnnpack else "builtin CPU kernels (no delegate)",
                        "load_log": log.text[-2000:]}
        self.path, self.signature_name, self.coverage_pending = path, signature, False
        self.runtime.update(self._coverage(nodes) if xnnpack else {})

    def _coverage(self, nodes: int | None) -> dict:
        """What this board's runtime gave XNNPACK (`xnnpack`: nodes, partitions, op types left to the built-in
        kernels, as FILE.json `graph.xnnpack` says for the export host), or `xnnpack_note` saying why not measured.
        The interpreter lists the nodes of the file's first subgraph only: another signature's (a decoder LM's
        `decode`) are left to `deferred_coverage`, after the measurements."""
        subgraph = 0 if self.runner is None else (signature_io(self.runner) or (None, None))[1]
        if nodes is None or subgraph is None:
            return {"xnnpack": None, "xnnpack_note": "this runtime's interpreter does not list its nodes"}
        if subgraph != 0:
            self.coverage_pending = True
            return {"xnnpack": None, "xnnpack_note": "not measured yet: measured after the timed runs"}
        return {"xnnpack": delegate_coverage(self.interpreter, nodes)}

    def deferred_coverage(self) -> dict:
        """`xnnpack` for a signature that is not the file's first subgraph, from a second, one-thread interpreter
        holding that signature's subgraph alone (`xnnpack_coverage`, what the export host does for FILE.json, the
        subgraph written beside the file). Its delegate packs the weights again, so the runner calls this last, after
        the timed runs and the peak RSS, and the timed interpreter is released first: the model cannot run after it.
        A runtime or a memory limit that cannot do it gives `xnnpack_note` with the reason."""
        self.runner = self.interpreter = self._signature_io = None
        gc.collect()
        try:
            with _CaptureStderr():
                coverage = xnnpack_coverage(self.path, self.signature_name, workdir=self.path.parent)
        except (EdgeqError, MemoryError, OSError, RuntimeError, ValueError) as exc:
            return {"xnnpack": None, "xnnpack_note": f"not measured: loading the {self.signature_name!r} subgraph alone "
                                                     f"failed ({type(exc).__name__}: {str(exc)[:300]})"}
        if coverage is None:
            return {"xnnpack": None, "xnnpack_note": "this runtime's interpreter does not list its nodes"}
        return {"xnnpack": coverage, "xnnpack_note": f"the {self.signature_name!r} subgraph loaded alone after the timed runs"}

    def signature(self) -> list[dict]:
        if self.runner is not None:
            details = self.runner.get_input_details()
            return [{"name": n, "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]]}
                    for n, d in sorted(details.items(), key=lambda kv: arg_order(kv[0]))]
        out = []
        for d in self.interpreter.get_input_details():
            sig = d.get("shape_signature", d["shape"])
            out.append({"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "index": d["index"],
                        "shape": [None if int(s) < 0 else int(s) for s in sig]})
        return out

    def _input_details(self, names: list[str]) -> dict[str, dict]:
        """Input details by feed name: tensor name, else signature input name, else position."""
        inputs = self.interpreter.get_input_details()
        by_name = {d["name"]: d for d in inputs}
        by_index = {d["index"]: d for d in inputs}
        if all(n in by_name for n in names):
            return by_name
        try:  # signature names (`args_0`) differ from tensor names (`serving_default_args_0:0`)
            for sig in self.interpreter._get_full_signature_list().values():
                idx = sig.get("inputs", {})
                if all(n in idx for n in names):
                    return {n: by_index[idx[n]] for n in names}
        except (AttributeError, KeyError):
            pass
        if len(names) == len(inputs):
            return dict(zip(names, inputs))
        raise EdgeqError(f"inputs: {names} do not match the model's inputs {sorted(by_name)}")

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        if self.runner is not None:
            details = self.runner.get_input_details()
            if set(feeds) != set(details):
                raise EdgeqError(f"inputs: {sorted(feeds)} do not match the signature's inputs {sorted(details)}")
            resize = {}
            for name, arr in feeds.items():
                want = [int(x) for x in details[name]["shape"]]
                free = [int(x) for x in details[name].get("shape_signature", details[name]["shape"])]
                fits = len(want) == arr.ndim and all(w == n or f == -1 for w, n, f in zip(want, arr.shape, free))
                if not fits or arr.dtype != np.dtype(details[name]["dtype"]):
                    raise EdgeqError(f"inputs: {name} is {arr.dtype}{list(arr.shape)}; the signature takes "
                                     f"{np.dtype(details[name]['dtype'])}{[n if f != -1 else None for n, f in zip(want, free)]}")
                if want != list(arr.shape):
                    resize[name] = arr.shape  # a dynamic axis (a decode step's cache slots) at another size
            self._feeds = feeds
            self._signature_io = self._set_signature_inputs(feeds, resize)
            return
        details = self._input_details(list(feeds))
        resized = False
        for name, arr in feeds.items():
            if list(details[name]["shape"]) != list(arr.shape):
                self.interpreter.resize_tensor_input(details[name]["index"], list(arr.shape))
                resized = True
        if resized:
            self.interpreter.allocate_tensors()
        for name, arr in feeds.items():
            want = np.dtype(details[name]["dtype"])
            if arr.dtype != want:
                raise EdgeqError(f"inputs: {name} is {arr.dtype} in the metadata but {want} in the model")
            self.interpreter.set_tensor(details[name]["index"], arr)
        self._outputs = [d["index"] for d in self.interpreter.get_output_details()]

    def _set_signature_inputs(self, feeds: dict[str, np.ndarray], resize: dict[str, tuple]):
        """Set a signature's inputs once, as for the first subgraph, so each run times the invoke and the
        outputs (what benchmark_model times), not copying every input in again: a decode step's KV caches
        are megabytes. `resize`: inputs to resize first (along their dynamic axes). Returns (wrapper, subgraph,
        output indices), or None where the runtime's signature runner has no wrapper to do it with (each run
        then goes through the runner, inputs and all, which cannot resize)."""
        io = signature_io(self.runner)
        if io is None:
            if resize:
                raise EdgeqError(f"inputs: resizing {sorted(resize)[0]} needs ai-edge-litert's signature runner; "
                                 "this runtime runs the declared shapes only")
            return None
        w, sg, inputs, outputs = io
        for name, shape in resize.items():
            w.ResizeInputTensor(inputs[name], np.array(shape, dtype=np.int32), True, sg)
        w.AllocateTensors(sg)
        for name, arr in feeds.items():
            w.SetTensor(inputs[name], arr, sg)
        self._output_names = list(outputs)
        return w, sg, list(outputs.values())

    def run(self) -> None:
        if self.runner is not None:
            if self._signature_io is None:
                self.runner(**self._feeds)  # sets the inputs, invokes, copies the outputs out
                return
            w, sg, outputs = self._signature_io
            w.Invoke(sg)
            for idx in outputs:
                w.GetTensor(idx, sg)
            return
        self.interpreter.invoke()
        for idx in self._outputs:
            self.interpreter.get_tensor(idx)

    def outputs(self) -> list[tuple[str, np.ndarray]]:
        """One more run, its outputs by name: a signature's in their name order (output_0, output_1, ...), the first
        subgraph's as the interpreter lists them."""
        if self.runner is not None:
            if self._signature_io is None:
                return sorted(((n, np.asarray(a)) for n, a in self.runner(**self._feeds).items()),
                              key=lambda kv: arg_order(kv[0]))
            w, sg, indices = self._signature_io
            w.Invoke(sg)
            return sorted(((n, np.array(w.GetTensor(i, sg))) for n, i in zip(self._output_names, indices)),
                          key=lambda kv: arg_order(kv[0]))
        self.interpreter.invoke()
        return [(d["name"], np.array(self.interpreter.get_tensor(d["index"])))
                for d in self.interpreter.get_output_details()]


class CompiledLiteRtModel:
    """A .tflite file in LiteRT's CompiledModel API on the CPU (XNNPACK), with XNNPACK's weight cache held in memory
    (`:memory:`): a packed weight is looked up by the buffer it came from, so the signatures of a file that share a
    weight (a decoder LM's prefill and decode) share one packed copy. The Interpreter (`LiteRtModel`) packs every
    signature's subgraph on its own: SmolLM2's fp32 file with both signatures peaked at 1634 MB there against 731 MB
    here, its INT4 file at 304 against 200 (benchmarks/tflite_memory_smollm2_zen4.md). A decode step here took
    0.94-1.13x the Interpreter's time over two runs on the host measured, so the Interpreter stays the default (what
    edgeq's own runners use). Times one signature (the named one, else the file's first signature) with its inputs
    written into its buffers once, resized first along the axes the file leaves dynamic (a decode step's slots)."""

    format = "tflite"

    def __init__(self, path: Path, threads: int, signature: str | None = None):
        try:
            from ai_edge_litert.compiled_model import CompiledModel
            from ai_edge_litert.options import CpuOptions, Options

            options = Options(cpu_options=CpuOptions(num_threads=threads, xnnpack_weight_cache_path=":memory:"))
        except (ImportError, TypeError):  # tflite-runtime, or an ai-edge-litert before CompiledModel took CPU options
            raise EdgeqError("runtime: weight_cache needs ai-edge-litert with LiteRT's CompiledModel API and its XNNPACK "
                             f"weight cache option (tested: 2.3; here: {_version('ai-edge-litert') or 'none'}); "
                             "pip install -U ai-edge-litert") from None
        with _CaptureStderr() as log:
            try:
                self.model = CompiledModel.from_file(str(path), options=options)
            except RuntimeError as exc:
                raise EdgeqError(f"runtime: LiteRT cannot load {path.name}: {str(exc).splitlines()[0]}") from None
        known = self.model.get_signature_list()
        if signature is not None and signature not in known:
            raise EdgeqError(f"signature: {signature!r} is not one of the file's: {', '.join(sorted(known)) or 'none'}")
        self.key = signature if signature is not None else next(iter(known))
        self.index = self.model.get_signature_index(self.key)
        self._names = known[self.key]  # {"inputs": [...], "outputs": [...]}, in buffer order
        xnnpack = "Created TensorFlow Lite XNNPACK delegate" in log.text  # not "XNNPACK CPU accelerator registered"
        self.runtime = {"name": "litert-compiledmodel", "version": _version("ai-edge-litert"),
                        "provider": "XNNPACK delegate, weight cache in memory" if xnnpack else "builtin CPU kernels (no delegate)",
                        "load_log": log.text[-2000:]}

    def signature(self) -> list[dict]:
        details = self.model.get_input_tensor_details(self.key)
        return [{"name": n, "dtype": np.dtype(details[n]["dtype"]).name, "shape": [int(x) for x in details[n]["shape"]]}
                for n in sorted(self._names["inputs"], key=arg_order)]

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        names = self._names["inputs"]
        details = self.model.get_input_tensor_details(self.key)
        if set(feeds) != set(names):
            raise EdgeqError(f"inputs: {sorted(feeds)} do not match the signature's inputs {sorted(names)}")
        for name, arr in feeds.items():  # a buffer takes a shorter array as a prefix, silently: check first
            want = (np.dtype(details[name]["dtype"]), [int(x) for x in details[name]["shape"]])
            if (arr.dtype, list(arr.shape)) == want:
                continue
            resized = None
            if arr.dtype == want[0] and arr.ndim == len(want[1]):
                try:  # a dynamic axis (a decode step's cache slots) at another size; strict: only axes the file leaves free
                    self.model.resize_input_tensor(names.index(name), list(arr.shape), self.index, True)
                    resized = [int(x) for x in self.model.get_input_tensor_details(self.key)[name]["shape"]]
                except (RuntimeError, ValueError):
                    pass
            if resized != list(arr.shape):
                raise EdgeqError(f"inputs: {name} is {arr.dtype}{list(arr.shape)}; the signature takes {want[0]}{want[1]}")
        self._inputs = self.model.create_input_buffers(self.index)
        for buf, name in zip(self._inputs, names):
            buf.write(np.ascontiguousarray(feeds[name]))
        self._outputs = self.model.create_output_buffers(self.index)
        out = self.model.get_output_tensor_details(self.key)
        self._reads = [(int(np.prod(out[n]["shape"])), np.dtype(out[n]["dtype"]))
                       for n in self._names["outputs"]]

    def run(self) -> None:
        self.model.run_by_index(self.index, self._inputs, self._outputs)
        for buf, (n, dtype) in zip(self._outputs, self._reads):  # read the outputs, as the Interpreter's runs do
            buf.read(n, dtype)

    def outputs(self) -> list[tuple[str, np.ndarray]]:
        """One more run, its outputs by name, in their name order as the Interpreter's signature runner gives them."""
        self.model.run_by_index(self.index, self._inputs, self._outputs)
        shapes = self.model.get_output_tensor_details(self.key)
        got = [(name, np.asarray(buf.read(n, dtype)).reshape([int(x) for x in shapes[name]["shape"]]))
               for buf, name, (n, dtype) in zip(self._outputs, self._names["outputs"], self._reads)]
        return sorted(got, key=lambda kv: arg_order(kv[0]))


def runtime_dist(path: Path, weight_cache: bool = False) -> tuple[str, str | None]:
    """The distribution that runs `path` here, as FILE.json's `runtime_min` names it, and its version (the rule the
    host applies to an agent's /v1/info before it uploads)."""
    from .fingerprint import runtime_versions

    return runtime_for(path.suffix, weight_cache, runtime_versions())


def check_runtime_min(meta: dict | None, dist: str, version: str | None) -> list[str]:
    """Hold an export's `runtime_min` (its FILE.json, written for these bytes) against the runtime about to run the
    file, before it loads (`runtime_min.runtime_verdict`): a runtime the export rules out or one older than a minimum
    is an error naming what to install, never a latency of a computation that is not the model's; one older than the
    release it was tested with is a warning, which this returns."""
    verdict = runtime_verdict(meta, dist, version)
    if verdict is None:
        return []
    if verdict["support"] == "untested":
        return [verdict["why"]]
    raise EdgeqError(f"runtime: {verdict['why']}; {verdict['fix']} on the board")


def load(path: Path, threads: int, signature: str | None = None, weight_cache: bool = False):
    """Load an .onnx or .tflite file with its runtime (a TFLite file's named `signature` if given; `weight_cache`:
    through LiteRT's CompiledModel with XNNPACK's weight cache in memory)."""
    if signature is not None and path.suffix != ".tflite":
        raise EdgeqError(f"signature: {signature!r} applies to .tflite files; {path.name} is ONNX (one graph per file)")
    if weight_cache and path.suffix != ".tflite":
        raise EdgeqError(f"weight_cache: applies to .tflite files (XNNPACK in LiteRT); {path.name} is ONNX")
    if path.suffix == ".onnx":
        return OrtModel(path, threads)
    if path.suffix == ".tflite":
        return CompiledLiteRtModel(path, threads, signature) if weight_cache else LiteRtModel(path, threads, signature)
    raise EdgeqError(f"artifact: {path.name!r} must end with .onnx or .tflite")
