"""Run an exported ONNX file in ONNX Runtime (CPU). No torch: numpy and onnxruntime only.

`OnnxRunner(path)(*inputs)` takes the same positional inputs as the PyTorch module (input_ids;
input_ids + attention_mask for encoders; images) and returns every output, logits / embeddings
first (decoder LM prefill graphs also return the present key/values after the logits). Session
options recorded by the exporter in `FILE.json` (the MatMulNBits accuracy level used for parity)
are applied unless overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import EdgeqError

ACCURACY_LEVEL_KEY = "session.qdq_matmulnbits_accuracy_level"
_DTYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32, "tensor(bool)": np.bool_,
           "tensor(float16)": np.float16}


def export_meta(path: str | Path) -> dict:
    """The exporter's metadata beside `path` (FILE.onnx.json), or {} when there is none."""
    meta = Path(str(path) + ".json")
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}


class OnnxRunner:
    """One ONNX Runtime session on the CPU execution provider."""

    def __init__(self, path: str | Path, threads: int = 1, accuracy_level: int | None = None,
                 session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.meta = export_meta(self.path)
        config = dict(self.meta.get("session_config") or {})
        if accuracy_level is not None:
            config[ACCURACY_LEVEL_KEY] = str(int(accuracy_level))
        config.update(session_config or {})
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # constant-folding notices about CastLike are not the user's problem
        for key, value in config.items():
            options.add_session_config_entry(key, str(value))
        self.session_config = config
        self.threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's pybind errors (InvalidProtobuf, InvalidArgument, Fail) share no base
            raise EdgeqError(f"onnx: ONNX Runtime cannot load {self.path}: {str(exc).splitlines()[0]}") from None
        self.inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self.inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path.name} takes {len(self.inputs)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        feeds = {}
        for spec, value in zip(self.inputs, inputs):
            value = np.asarray(value)
            dtype = _DTYPES.get(spec.type)
            feeds[spec.name] = value.astype(dtype, copy=False) if dtype is not None else value
        return self.session.run(None, feeds)

    def decode_runner(self, threads: int | None = None) -> "OnnxRunner | None":
        """The decode-step graph of a decoder LM export (past key/values in and out), if it has one."""
        decode = (self.meta.get("graph") or {}).get("decode")
        if not decode:
            return None
        return OnnxRunner(self.path.parent / decode, threads=self.threads if threads is None else threads,
                          session_config=self.session_config)


def next_token_logits(prefill: OnnxRunner, decode: OnnxRunner, prefix: np.ndarray, token: np.ndarray) -> np.ndarray:
    """Logits for `token` [batch, 1] after `prefix` [batch, n]: prefill the prefix, then one decode step."""
    out = prefill(prefix)
    step = decode(token, *out[1:])
    return step[0][:, -1]
