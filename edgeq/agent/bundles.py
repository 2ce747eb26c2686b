"""What the host sends for one artifact (`Bundle`: the file, its external data, its export metadata) and what it checks
before sending: a file this host cannot read as a model, a `--signature` it lacks, a `--dim` no input has, each
refused before a board spends an upload and a job on it. Runs on the host; no torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ..console import native_chatter_dropped
from ..errors import EdgeqError
from ..export import prefill_of
from ..fileio import read_json, sha256_file
from .onnxcheck import MalformedModel, external_locations
from .protocol import DEFAULT_DIMS, FILE_NAME_RE


def export_meta(artifact: Path) -> dict | None:
    """The artifact's export metadata: FILE.onnx.json, or FILE.json if it is export metadata."""
    for cand in (artifact.with_name(artifact.name + ".json"), artifact.with_suffix(".json")):
        if cand.is_file():
            try:
                meta = read_json(cand)
            except (OSError, ValueError) as exc:
                raise EdgeqError(f"export metadata: {cand}: {exc}") from None
            if isinstance(meta, dict) and ("format" in meta or "inputs" in meta):
                return meta
    return None


def graph_meta(path: Path, sha256: str, size_bytes: int) -> dict | None:
    """Metadata for FILE.decode.onnx, which has no JSON of its own: the export's FILE.onnx.json names it in `graph` and
    lists its sha256 in `files`. It is that export's metadata (model, recipe, variant, exactness and parity: the step
    holds the same layers, checked against the prefill graph) with this graph's hash and size (with the external data
    it reads, which the prefill graph shares), `graph_role` saying which graph it is and `graph_of` whose; `inputs` is
    left to the agent, which reads them from the graph. None when no such export lists these bytes."""
    prefill = prefill_of(path)
    if prefill is None:
        return None
    parent = export_meta(prefill)
    if not parent or (parent.get("graph") or {}).get("decode") != path.name:
        return None
    entry = next((f for f in parent.get("files") or [] if f.get("name") == path.name), {})
    if entry.get("sha256") != sha256:
        return None
    return {**parent, "sha256": sha256, "size_bytes": size_bytes, "inputs": None, "files": [],
            "graph_role": "decode", "graph_of": {"name": prefill.name, "sha256": parent.get("sha256")}}


def job_meta(meta: dict | None, signature: str | None) -> dict | None:
    """The metadata a job gets: FILE.json, its `inputs` those of `signature` when one is named (a TFLite
    file's `signatures`; without a spec for it the agent reads the signature's own inputs)."""
    if signature is None or meta is None:
        return meta
    spec = ((meta.get("signatures") or {}).get(signature) or {}).get("inputs")
    return {**meta, "inputs": spec}


@dataclasses.dataclass(frozen=True)
class Bundle:
    """What to upload for one artifact: the file, its external data, and its metadata."""

    path: Path
    sha256: str
    files: tuple[tuple[Path, str], ...]
    meta: dict | None
    signatures: tuple[str, ...] | None = None  # a .tflite file's, as this host's LiteRT reads them (None: not read)


def bundle(path: str | os.PathLike) -> Bundle:
    path = Path(path)
    if not path.is_file() or path.suffix not in (".onnx", ".tflite"):
        raise EdgeqError(f"artifact: {path} must be an existing .onnx or .tflite file")
    if not FILE_NAME_RE.fullmatch(path.name):
        raise EdgeqError(f"artifact: file name {path.name!r} must use only letters, digits, _ . -")
    files = []
    if path.suffix == ".onnx":
        try:
            locations = external_locations(path)
        except MalformedModel as exc:
            raise EdgeqError(f"artifact: {path} is not a readable ONNX model ({exc})") from None
        for loc in sorted(set(locations)):
            if not FILE_NAME_RE.fullmatch(loc) or not (path.parent / loc).is_file():
                raise EdgeqError(f"artifact: {path.name} names external data {loc!r}, which is not a file "
                                 "beside it with a plain name")
            files.append((path.parent / loc, sha256_file(path.parent / loc)))
    signatures = tflite_signatures(path) if path.suffix == ".tflite" else None
    sha = sha256_file(path)
    size = path.stat().st_size + sum(f.stat().st_size for f, _ in files)
    return Bundle(path, sha, tuple(files), export_meta(path) or graph_meta(path, sha, size), signatures)


_OP_ERROR = re.compile(r"\bops?\b|opcode|custom", re.IGNORECASE)


def tflite_signatures(path: Path) -> tuple[str, ...] | None:
    """The signatures of a .tflite file as this host's LiteRT reads them; an EdgeqError for a file that is no TFLite
    model (random bytes, a truncated file, an ONNX file renamed), refused here as `bundle` refuses an unreadable ONNX
    file, before a board spends an upload and a job on it. None when this host cannot tell: no LiteRT here (then only
    the flatbuffer's file identifier is checked), or an op this host's LiteRT lacks (the board's may have it)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise EdgeqError(f"artifact: {path} is not a TFLite model (no TFL3 flatbuffer identifier)")
    from .runtimes import _litert_interpreter

    try:
        interpreter_cls = _litert_interpreter()[0]
    except EdgeqError:
        return None
    try:
        with native_chatter_dropped():
            interpreter = interpreter_cls(model_path=str(path))  # parses and verifies; allocates nothing
        return tuple(sorted(interpreter.get_signature_list()))
    except Exception as exc:  # LiteRT raises plain ValueError / RuntimeError
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if _OP_ERROR.search(why):
            return None
        raise EdgeqError(f"artifact: {path} is not a TFLite model this host's LiteRT loads ({why})") from None


def check_signature(b: Bundle, signature: str | None) -> None:
    """Refuse a signature the file's own FILE.json (written for these bytes) does not list, before any board spends a
    job on a typo; without that metadata the board's runtime judges."""
    meta = b.meta or {}
    known = meta.get("signatures")
    if signature is not None and known and meta.get("sha256") == b.sha256 and signature not in known:
        raise EdgeqError(f"--signature: {signature!r} is not a signature of {b.path.name} (it has: {', '.join(sorted(known))})")


def check_tflite_signature(b: Bundle, signature: str | None) -> None:
    """Refuse a signature the .tflite file itself does not have (as this host's LiteRT reads it), listing those it
    has."""
    if signature is not None and b.signatures is not None and signature not in b.signatures:
        raise EdgeqError(f"--signature: {signature!r} is not a signature of {b.path.name} "
                         f"(it has: {', '.join(b.signatures) or 'none'})")


def dim_names(b: Bundle, signature: str | None) -> set[str] | None:
    """The symbolic dim names the inputs of a job on `b` have, as the agent reads them (`inputs` of the job's
    metadata, else the file's own: an ONNX graph's dim_params; a TFLite file's dynamic dims are unnamed); None when
    this host cannot tell (no `onnx` package here)."""
    spec = (job_meta(b.meta, signature) or {}).get("inputs")
    if spec:
        return {d for item in spec if isinstance(item, dict) for d in item.get("shape") or [] if isinstance(d, str)}
    if b.path.suffix == ".tflite":
        return set()
    try:
        import onnx
    except ImportError:
        return None
    try:
        graph = onnx.load(str(b.path), load_external_data=False).graph
    except Exception:  # a parse `bundle` already passed; the board judges
        return None
    weights = {t.name for t in graph.initializer}
    return {d.dim_param for i in graph.input if i.name not in weights
            for d in i.type.tensor_type.shape.dim if d.dim_param}


def check_dims(bundles: list[Bundle], dims: dict[str, int], signature: str | None) -> None:
    """Refuse a --dim that sizes no input of any file in the run (a typo would change nothing and still be stored as
    measured at it), listing each file's dims; batch and sequence also size unnamed dims, so they always apply."""
    if not dims:
        return  # nothing to check: no graph read
    names = {b.path.name: dim_names(b, signature) for b in bundles}
    if any(n is None for n in names.values()):
        return
    known = set(DEFAULT_DIMS).union(*names.values())
    unknown = sorted(set(dims) - known)
    if unknown:
        has = "; ".join(f"{f}: {', '.join(sorted(n | set(DEFAULT_DIMS)))}" for f, n in names.items())
        raise EdgeqError(f"--dim {', '.join(f'{k}={dims[k]}' for k in unknown)}: no input of "
                         f"{', '.join(names)}{f' [{signature}]' if signature else ''} has a dim of that name ({has})")
