"""Fixtures for agent tests: tiny seeded models and real agents on 127.0.0.1 with port 0."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from edgeq.agent.host import stop_process
from edgeq.agent.client import AgentClient
from edgeq.agent.jobs import AgentConfig
from edgeq.agent.server import READY_PREFIX, AgentServer

FAST = {"runs": 10, "min_seconds": 0.05, "warmup_min": 2, "warmup_max": 10}


def make_onnx(path: Path, *, hidden: int = 16, external: str | None = None, seed: int = 0) -> Path:
    """x[batch, sequence, hidden] @ W -> y; W optionally in external data named `external`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(seed).standard_normal((hidden, hidden)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", hidden])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def make_qdq_onnx(path: Path, *, activations: bool, channels: int = 16) -> Path:
    """A 1x1 Conv in QDQ form with int8 weights: `activations` puts its input and output on uint8 grids too (ONNX
    Runtime fuses that into QLinearConv); without, a weight-only Conv on the dequantized weight, which ONNX Runtime
    leaves float (a weight-only MatMul or Gemm it makes MatMulNBits)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (channels, channels, 1, 1), dtype=np.int8), "Wq"),
             numpy_helper.from_array(np.float32(0.01), "sw"), numpy_helper.from_array(np.int8(0), "zw"),
             numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["W"])]
    if activations:
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                  helper.make_node("Conv", ["xd", "W"], ["m"]),
                  helper.make_node("QuantizeLinear", ["m", "s", "z"], ["mq"]),
                  helper.make_node("DequantizeLinear", ["mq", "s", "z"], ["y"])]
    else:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["y"]))
    shape = ["batch", channels, 4, 4]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


def make_token_onnx(path: Path) -> Path:
    """Token ids [batch, sequence] int64 -> Gather from an embedding: integer inputs with a range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.random.default_rng(1).standard_normal((50, 8)).astype(np.float32), "E")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "ids"], ["y"])], "tok",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [emb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return path


class AgentProc:
    """`edgeq agent serve` as a real child process on 127.0.0.1:0; can be killed and restarted."""

    def __init__(self, root: Path, extra: list[str] | None = None, host: str = "127.0.0.1",
                 netns: str | None = None, relative: bool = False):
        """`relative`: started in `root` with `--data-dir data`, as a user typing a relative path would."""
        self.root = root
        self.data_dir = root / "data"
        self.relative = relative
        self.token = secrets.token_urlsafe(24)
        self.token_file = root / "token"
        self.token_file.write_text(self.token)
        os.chmod(self.token_file, 0o600)
        self.extra = extra or []
        self.host = host
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.scheme = "https" if "--tls-cert" in self.extra else "http"

    def start(self, port: int = 0) -> "AgentProc":
        cmd = [sys.executable, "-m", "edgeq.cli.main", "agent", "serve", "--host", self.host,
               "--port", str(port), "--token-file", str(self.token_file), "--data-dir",
               "data" if self.relative else str(self.data_dir), "--power-meter", "none", *self.extra]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.log = open(self.root / "agent.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=self.root if self.relative else None)
        timer = threading.Timer(60, self.proc.kill)
        timer.start()
        line = self.proc.stdout.readline()
        timer.cancel()
        assert line.startswith(READY_PREFIX), (line, (self.root / "agent.log").read_text()[-2000:])
        self.url = line.split()[1]
        return self

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def client(self, token: str | None = None, **kw) -> AgentClient:
        return AgentClient(self.url, self.token if token is None else token, **kw)

    def kill(self) -> None:
        """SIGKILL: a crash, no chance to clean up."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)
            self.log.close()


@pytest.fixture
def agent_factory(tmp_path):
    started: list[AgentProc] = []

    def make(extra: list[str] | None = None, name: str = "agent", **kw) -> AgentProc:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        a = AgentProc(root, extra, **kw).start()
        started.append(a)
        return a

    yield make
    for a in started:
        a.stop()


@pytest.fixture
def inproc(tmp_path):
    """Start an AgentServer in this process on 127.0.0.1:0 with AgentConfig overrides; stopped after the test."""
    servers = []

    def make(**kw) -> AgentServer:
        cfg = AgentConfig(token=secrets.token_urlsafe(24), data_dir=tmp_path / f"data{len(servers)}", port=0,
                          power_meter="none", **kw)
        server = AgentServer(cfg)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory):
    """One agent for the read-mostly security tests of a module (small upload cap: 64 KiB)."""
    root = tmp_path_factory.mktemp("shared-agent")
    a = AgentProc(root, ["--max-upload-mb", str(64 / 1024)]).start()
    yield a
    a.stop()


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    return make_onnx(tmp_path_factory.mktemp("models") / "tiny.onnx")


def _cached_tflite(pytestconfig, name: str, build) -> Path:
    """A TFLite file made once by `build(torch, litert_torch)` (a converted model) and cached across sessions."""
    cache = Path(pytestconfig.cache.mkdir("edgeq-agent-tflite"))
    path = cache / name
    if path.exists():
        return path
    try:
        import litert_torch
        import torch
    except ImportError:
        pytest.skip("litert_torch not installed: cannot build a TFLite model")
    torch.manual_seed(0)
    tmp = cache / f"{name}.tmp"
    build(torch, litert_torch).export(str(tmp))
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def tiny_tflite(pytestconfig) -> Path:
    """A tiny TFLite model converted with litert_torch."""
    def build(torch, litert_torch):
        module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
        return litert_torch.convert(module, (torch.randn(1, 16),))

    return _cached_tflite(pytestconfig, "tiny.tflite", build)


@pytest.fixture(scope="session")
def int16x8_tflite(pytestconfig, tiny_tflite) -> Path:
    """`tiny_tflite` quantized by ai-edge-quantizer's static_wi8_ai16 (LiteRT's 16x8 mode): a FULLY_CONNECTED that
    XNNPACK has no kernel for, so LiteRT runs it on its built-in kernels."""
    path = Path(pytestconfig.cache.mkdir("edgeq-agent-tflite")) / "int16x8.tflite"
    if not path.exists():
        quantizer = pytest.importorskip("ai_edge_quantizer.quantizer")
        from ai_edge_quantizer import recipe

        qt = quantizer.Quantizer(str(tiny_tflite))
        qt.load_quantization_recipe(recipe.static_wi8_ai16())
        rng = np.random.default_rng(0)
        calibration = qt.calibrate({"serving_default": [{"args_0": rng.standard_normal((1, 16), dtype=np.float32)}
                                                        for _ in range(4)]})
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(qt.quantize(calibration).quantized_model))
        os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def two_signature_tflite(pytestconfig) -> Path:
    """A TFLite file with two signatures, as a decoder LM's export has: `serving_default` (x [1, 16]) and
    `decode` (x [1, 4] float32, pos [1] int32)."""
    def build(torch, litert_torch):
        class Step(torch.nn.Module):
            def forward(self, x, pos):
                return x * 2 + pos.to(x.dtype)

        first = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
        return (litert_torch.signature("serving_default", first, (torch.randn(1, 16),))
                .signature("decode", Step().eval(), (torch.randn(1, 4), torch.tensor([3], dtype=torch.int32))).convert())

    return _cached_tflite(pytestconfig, "two_signatures.tflite", build)


@pytest.fixture(scope="session")
def shared_weight_tflite(pytestconfig) -> Path:
    """Two signatures reading one 2048 x 2048 fp32 weight (16 MB) stored once in the file, as a decoder LM's prefill
    and decode read theirs: `serving_default` (x [4, 2048]) and `decode` (x [1, 2048])."""
    def build(torch, litert_torch):
        layer = torch.nn.Linear(2048, 2048, bias=False).eval()
        return (litert_torch.signature("serving_default", layer, (torch.randn(4, 2048),))
                .signature("decode", layer, (torch.randn(1, 2048),)).convert())

    return _cached_tflite(pytestconfig, "shared_weight.tflite", build)


def run_job(client: AgentClient, model: Path, config: dict | None = None, job_id: str | None = None,
            files: list[Path] = (), metadata: dict | None = None, timeout_s: float = 120) -> dict:
    """Upload, submit and wait; returns the result document."""
    sha = client.upload(model)
    refs = [{"name": f.name, "sha256": client.upload(f)} for f in files]
    job_id = job_id or f"t-{secrets.token_hex(6)}"
    client.submit(job_id, {"name": model.name, "sha256": sha}, refs, metadata, {**FAST, **(config or {})})
    return client.wait(job_id, poll_s=0.1, timeout_s=timeout_s)
