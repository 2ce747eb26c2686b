"""Writing an ONNX export's files: each graph saved with its tensors inside or in a data file, then ONNX Runtime's
basic optimizations saved into it; an LM's graphs made to share one data file; the finished files moved into place,
and the companion files of the export they replace that they do not have removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO

import onnx

from ..fileio import current_umask, naming

# above this (all graphs' tensors), tensors go to one FILE.onnx.data beside the file. ONNX Runtime holds more memory for
# weights inside the proto (RSS after a run, this host, ORT 1.32): MiniLM-L6 fp32 150 MB inside against 106 MB in a
# data file, SmolLM2 w8's prefill graph 391 against 226, w4-g64's 436 against 302; below this a single file is handier
EXTERNAL_DATA_BYTES = 32 << 20
# ONNX Runtime's basic (level-1) graph optimizations are run once at export and saved into the file, as ORT's
# quant_pre_process does for the models its own quantizers take: semantics-preserving rewrites in the ONNX domain only
# (no contrib operators), so the file stays plain ONNX. ORT builds faster sessions from the saved graph than from the
# graph as traced (SmolLM2 w8-fast, ORT 1.32, 3 sessions x 4 processes: decode step 4-5%, 64-token prefill 2-3%; the
# outputs bitwise the same). Constant folding and the transpose optimizer are left out: they store a tied LM head's
# Transpose(embedding) as a second table (+113 MB on SmolLM2); ORT still folds it in memory when it loads the file.
OFFLINE_OPTIMIZATION_SKIPS = ("ConstantFolding", "TransposeOptimizer")


def write_graphs(protos: list[onnx.ModelProto], paths: list[Path], external_data: bool | None, optimize: bool,
                 session_config: dict) -> tuple[bool, dict | None, dict | None]:
    """Save each graph to its path (external data: None decides by EXTERNAL_DATA_BYTES), ONNX Runtime's optimization
    saved into it when `optimize`, and several graphs onto one shared data file -> (external data used, what the
    optimization ran, `_share_external_data`'s account), for FILE.json."""
    big = sum(len(t.raw_data) for p in protos for t in p.graph.initializer) > EXTERNAL_DATA_BYTES
    external = big if external_data is None else bool(external_data)
    optimization = None
    for proto, path in zip(protos, paths):
        save(proto, path, external)
        if optimize:
            optimization = optimize_offline(path, external, session_config, contrib_attributes(proto))
    shared = _share_external_data(paths, f"{paths[0].name}.data") if external and len(paths) > 1 else None
    return external, optimization, shared


def put_in_place(main: Path, companions: list[Path], out: Path) -> None:
    """Move a finished export (`main`, its companion files and `main`.json, written in a temporary directory) to `out`,
    with ordinary permissions (onnx writes external data 0600); then remove the companions of the export it replaced
    that it does not have."""
    mode = 0o666 & ~current_umask()
    for p in [*companions, main, Path(f"{main}.json")]:
        os.chmod(p, mode)
    stale = _stale_companions(out, {p.name for p in companions})
    for p in companions:
        os.replace(p, out.parent / p.name)
    os.replace(main, out)
    os.replace(Path(f"{main}.json"), Path(f"{out}.json"))
    for name in stale:
        (out.parent / name).unlink(missing_ok=True)


def save(proto: onnx.ModelProto, path: Path, external: bool) -> None:
    with naming(path):
        if external:
            onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
        else:
            onnx.save_model(proto, str(path))


def _stale_companions(out: Path, written: set[str]) -> list[str]:
    """The companion files the export being replaced at `out` listed (its FILE.json `files`) that this one does not
    write, named after `out` (an LM's FILE.decode.onnx.data from before its graphs shared one data file): removed once
    the new export is in place, so that an export is replaced as a whole."""
    try:
        old = json.loads(Path(f"{out}.json").read_text())
    except (OSError, ValueError):
        return []
    names = [f.get("name") for f in old.get("files") or [] if isinstance(f, dict)] if isinstance(old, dict) else []
    return [n for n in names if isinstance(n, str) and n == Path(n).name and n.startswith(f"{out.stem}.")
            and n != out.name and n not in written]


def _share_external_data(paths: list[Path], name: str) -> dict:
    """Rewrite one model's graphs at `paths` (prefill and decode), each with its tensors in a data file of its own, to
    read one data file `name` beside them that holds each distinct tensor once: the decode graph's weights are the
    prefill's, so an LM's files took twice its weights on disk. -> FILE.json's `external_data_shared`."""
    import hashlib

    folder = paths[0].parent
    staging = folder / f".{name}.shared"
    stored: dict[bytes, tuple[int, int]] = {}  # sha256 of the bytes -> (offset, length) in the shared file
    sources: dict[Path, BinaryIO] = {}
    repeated = 0
    models = []
    with contextlib.ExitStack() as files, open(staging, "wb") as data:
        for path in paths:
            model = onnx.load(str(path), load_external_data=False)
            for t in model.graph.initializer:
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in t.external_data}
                location = folder / info["location"]
                if location not in sources:
                    sources[location] = files.enter_context(open(location, "rb"))
                sources[location].seek(int(info.get("offset", 0)))
                raw = sources[location].read(int(info["length"]))
                key = hashlib.sha256(raw).digest()
                if key in stored:
                    repeated += len(raw)
                else:
                    stored[key] = (data.tell(), len(raw))
                    data.write(raw)
                del t.external_data[:]
                offset, length = stored[key]
                for k, v in (("location", name), ("offset", str(offset)), ("length", str(length))):
                    t.external_data.add(key=k, value=v)
            models.append(model)
        size = data.tell()
    for path, model in zip(paths, models):
        onnx.save_model(model, str(path))  # the proto only: its tensors stay where they now point
    for source in sources:
        if source.name != name:
            source.unlink()
    os.replace(staging, folder / name)
    return {"file": name, "bytes": size, "bytes_not_repeated": repeated}


def optimize_offline(path: Path, external: bool, session_config: dict, contrib: dict[str, set[str]] | None = None) -> dict:
    """Replace the ONNX file at `path` by ONNX Runtime's basic-level optimization of it (OFFLINE_OPTIMIZATION_SKIPS);
    returns what was run, for FILE.json. `contrib`: the attributes the graph's com.microsoft nodes were written with
    (`contrib_attributes`), the only ones they keep."""
    import onnxruntime as ort

    staging = path.parent / f".{path.name}.optimized"
    staging.mkdir()
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(staging / path.name)
        opts.log_severity_level = 3
        for key, value in session_config.items():
            opts.add_session_config_entry(key, value)
        if external:
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{path.name}.data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(OFFLINE_OPTIMIZATION_SKIPS))
        if contrib:
            _drop_written_defaults(staging / path.name, contrib)
        for p in staging.iterdir():
            os.replace(p, path.parent / p.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"onnxruntime": ort.__version__, "level": "basic", "skipped": list(OFFLINE_OPTIMIZATION_SKIPS)}


def contrib_attributes(model: onnx.ModelProto) -> dict[str, set[str]]:
    """The attribute names of each com.microsoft node of a graph, by node name."""
    return {n.name: {a.name for a in n.attribute} for n in model.graph.node if n.domain == "com.microsoft"}


def _drop_written_defaults(path: Path, written: dict[str, set[str]]) -> None:
    """Remove from a graph ONNX Runtime saved the attributes it added to edgeq's com.microsoft nodes (each one's default,
    its tensors untouched): older versions refuse attributes their schema lacks (ORT 1.22 a packed table's
    GatherBlockQuantized `bits` and MatMulNBits `weight_prepacked`, written by 1.32)."""
    model = onnx.load(str(path), load_external_data=False)
    dropped = False
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.name in written:
            keep = [a for a in node.attribute if a.name in written[node.name]]
            dropped |= len(keep) < len(node.attribute)
            del node.attribute[:]
            node.attribute.extend(keep)
    if dropped:
        onnx.save(model, str(path))
