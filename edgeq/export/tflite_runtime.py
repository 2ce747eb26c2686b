"""Run a .tflite file with LiteRT's interpreter (XNNPACK), the way a board runs it.

Torch-free on purpose: the board agent and `edgeq eval FILE.tflite` import this with nothing but
numpy and a runtime. `ai_edge_litert` is preferred; `tflite_runtime` (its last release, 2.14, is
what older boards have) is the fallback. Inputs are positional, as for the PyTorch module the file
came from; outputs come back in signature order, logits first.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import EdgeqError


def interpreter_class():
    """LiteRT's `Interpreter`, from ai_edge_litert or else tflite_runtime."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            raise EdgeqError("tflite: running .tflite files needs ai-edge-litert (pip install ai-edge-litert)") from None
    return Interpreter


def runtime_version() -> str:
    """`ai-edge-litert X` or `tflite-runtime X`: the runtime `TfliteRunner` uses."""
    try:
        import ai_edge_litert

        return f"ai-edge-litert {ai_edge_litert.__version__}"
    except ImportError:
        import tflite_runtime

        return f"tflite-runtime {tflite_runtime.__version__}"


def arg_order(name: str) -> tuple:
    """litert-torch names positional inputs args_0, args_1, ...: sort by that number, not as text."""
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else 1 << 30, name)


class TfliteRunner:
    """One signature of a .tflite file, called like the PyTorch module: `runner(*arrays) -> [outputs]`."""

    def __init__(self, path: str | Path | bytes, threads: int = 1, signature: str | None = None):
        Interpreter = interpreter_class()
        kwargs = {"model_content": bytes(path)} if isinstance(path, (bytes, bytearray)) else {"model_path": str(path)}
        try:
            self.interpreter = Interpreter(num_threads=threads, **kwargs)
        except ValueError as exc:
            raise EdgeqError(f"tflite: cannot load {path if not isinstance(path, (bytes, bytearray)) else 'model'}: {exc}") from None
        signatures = self.interpreter.get_signature_list()
        if not signatures:
            raise EdgeqError("tflite: the file has no signature (export it with edgeq or litert-torch)")
        if signature is None:
            signature = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
        if signature not in signatures:
            raise EdgeqError(f"tflite: signature {signature!r} is not one of: {', '.join(sorted(signatures))}")
        self.signature = signature
        self.runner = self.interpreter.get_signature_runner(signature)
        details = self.runner.get_input_details()
        self.input_names = sorted(details, key=arg_order)
        self.inputs = [details[n] for n in self.input_names]
        outs = self.runner.get_output_details()
        self.output_names = sorted(outs, key=arg_order)
        self.threads = threads

    def input_specs(self) -> list[dict]:
        """name, dtype and shape of each positional input."""
        return [{"name": n, "dtype": np.dtype(d["dtype"]).name, "shape": [int(x) for x in d["shape"]]}
                for n, d in zip(self.input_names, self.inputs)]

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise EdgeqError(f"tflite: the model takes {len(self.inputs)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        feed = {}
        for name, d, x in zip(self.input_names, self.inputs, inputs):
            x = np.asarray(x)
            want = tuple(int(s) for s in d["shape"])
            if x.shape != want:
                raise EdgeqError(f"tflite: input {name} has shape {list(x.shape)}; the file was exported for {list(want)}")
            feed[name] = x.astype(d["dtype"], copy=False)
        out = self.runner(**feed)
        return [np.asarray(out[n]) for n in self.output_names]
