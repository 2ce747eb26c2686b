"""The two runtimes behind one small interface: load, describe inputs, run, say what was used.

ONNX goes to onnxruntime (CPU execution provider); TFLite goes to LiteRT (`ai_edge_litert`),
falling back to the older `tflite_runtime` with the same Interpreter API. LiteRT applies its
XNNPACK delegate by default; whether it actually did is read from the runtime's own log line,
not assumed.
"""

from __future__ import annotations

import os
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import EdgeqError
from ..export.tflite_runtime import arg_order, signature_io

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


class _CaptureStderr:
    """Capture the process's fd 2 (C++ runtimes log there, not to sys.stderr)."""

    def __enter__(self):
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode("utf-8", "replace")
        self._tmp.close()
        os.write(2, self.text.encode())
        return False


class OrtModel:
    format = "onnx"

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.runtime = {"name": "onnxruntime", "version": ort.__version__,
                        "provider": self.session.get_providers()[0],
                        "providers_available": ort.get_available_providers()}

    def signature(self) -> list[dict]:
        """Inputs as name, dtype and shape (None or a string for a dynamic dim)."""
        return [{"name": i.name, "dtype": _ORT_TYPES.get(i.type, i.type),
                 "shape": [d if isinstance(d, (int, str)) else None for d in i.shape]}
                for i in self.session.get_inputs()]

    def prepare(self, feeds: dict[str, np.ndarray]) -> None:
        self._feeds = feeds

    def run(self) -> None:
        self.session.run(None, self._feeds)


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
            for name, arr in feeds.items():
                if list(details[name]["shape"]) != list(arr.shape) or arr.dtype != np.dtype(details[name]["dtype"]):
                    raise EdgeqError(f"inputs: {name} is {arr.dtype}{list(arr.shape)}; the signature takes "
                                     f"{np.dtype(details[name]['dtype'])}{list(details[name]['shape'])}")
            self._feeds = feeds
            self._signature_io = self._set_signature_inputs(feeds)
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

    def _set_signature_inputs(self, feeds: dict[str, np.ndarray]):
        """Set a signature's inputs once, as for the first subgraph, so each run times the invoke and the
        outputs (what benchmark_model times), not copying every input in again: a decode step's KV caches
        are megabytes. Returns (wrapper, subgraph, output indices), or None where the runtime's signature
        runner has no wrapper to do it with (each run then goes through the runner, inputs and all)."""
        io = signature_io(self.runner)
        if io is None:
            return None
        w, sg, inputs, outputs = io
        w.AllocateTensors(sg)
        for name, arr in feeds.items():
            w.SetTensor(inputs[name], arr, sg)
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


def load(path: Path, threads: int, signature: str | None = None):
    """Load an .onnx or .tflite file with its runtime (a TFLite file's named `signature` if given)."""
    if signature is not None and path.suffix != ".tflite":
        raise EdgeqError(f"signature: {signature!r} applies to .tflite files; {path.name} is ONNX (one graph per file)")
    if path.suffix == ".onnx":
        return OrtModel(path, threads)
    if path.suffix == ".tflite":
        return LiteRtModel(path, threads, signature)
    raise EdgeqError(f"artifact: {path.name!r} must end with .onnx or .tflite")
