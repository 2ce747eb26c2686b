"""The quantized model and its directory (QDIR): the single source of truth for every rendering.

Layout (see docs/architecture.md): `recipe.toml`, `model.json`, `float.safetensors` (every float
tensor not replaced by integers), `layers.safetensors` (per quantized layer: `qweight`, `scale`,
`zero_point`, and `act_scale` / `act_zero_point` for static activations) and `quant.json` (the
decisions and the size accounting). Saving is atomic; loading rebuilds the architecture from the
model reference and never unpickles anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import EdgeqError
from ..fileio import atomic_dir, damaged_fields, read_json, save_tensors, sha256_file, write_json_atomic, write_text_atomic
from ..models import ModelBundle, load_model
from ..recipe import QuantRecipe, dump_recipe_toml, load_recipe
from .methods import METHOD_RECORDS
from .modules import TIED_METHOD, LayerDecision, QuantConv2d, QuantEmbedding, QuantLinear, quant_layers, set_module
from .transforms import fold_batchnorms, untie_head

FORMAT_VERSION = 1
QUANT_BUFFERS = ("qweight", "scale", "zero_point", "act_scale", "act_zero_point")


@dataclass
class QuantizedModel:
    bundle: ModelBundle  # its module holds QuantLinear / QuantConv2d layers
    recipe: QuantRecipe
    float_bytes_before: int
    untied: bool = False
    folded_norms: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # method-specific records (e.g. QAT, sensitivity)
    folded_batchnorms: dict = field(default_factory=dict)  # conv or linear layer -> BatchNorm folded into it before quantizing

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.module

    def layers(self) -> dict:
        return quant_layers(self.model)

    def summary(self) -> dict:
        """quant.json: per-layer decisions and sizes, average bits and whole-model size reduction."""
        layers, q_bytes, q_params, q_bits = [], 0, 0, 0.0
        replaced = set()
        quantized = self.layers()
        for name, m in quantized.items():
            d = m.decision
            numel = math.prod(d.shape)
            entry = d.to_dict()
            if d.method == TIED_METHOD:  # its integers are the embedding's, counted there
                entry.update(bytes_quant=0, bytes_scales=0, bytes_fp32=0, params=numel, tied_to=tied_source(quantized, m))
                layers.append(entry)
                continue
            entry.update(layer_bytes(m))
            record = METHOD_RECORDS.get(d.method)
            if record is not None:  # method-specific accounting (e.g. PB-LLM's real bits per weight)
                entry[d.method] = record(m, self.recipe)
            if getattr(m, "bias_fit_channels", None):  # ptq.fit_bias_grid
                entry["bias_fit_channels"] = m.bias_fit_channels
            entry["bytes_fp32"] = numel * 4
            entry["params"] = numel
            layers.append(entry)
            q_bytes += entry["bytes_quant"]
            q_params += numel
            q_bits += entry["bytes_quant"] * 8
            replaced.add(id(m.qweight))
        float_bytes = sum(t.numel() * t.element_size() for t in unique_float_tensors(self.model).values())
        after = float_bytes + q_bytes
        from ..export.tflite_grids import representability

        return {
            "format_version": FORMAT_VERSION,
            "model": self.bundle.reference,
            "kind": self.bundle.kind,
            "recipe": self.recipe.name,
            "untied_head": self.untied,
            "folded_norms": self.folded_norms,
            "folded_batchnorms": self.folded_batchnorms,
            "layers": layers,
            "quantized_params": q_params,
            "avg_bits": round(q_bits / q_params, 4) if q_params else None,
            "bytes_before": self.float_bytes_before,
            "bytes_after": after,
            "size_reduction": round(1 - after / self.float_bytes_before, 6),
            "tflite": representability(self),  # per variant: held exactly, or why not (edgeq.export.tflite)
            **self.extra,
        }

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            write_text_atomic(tmp / "recipe.toml", dump_recipe_toml(self.recipe))
            floats = unique_float_tensors(self.model)
            save_tensors({k: v.contiguous() for k, v in floats.items()}, tmp / "float.safetensors")
            tensors = {}
            for name, m in self.layers().items():
                if m.decision.method == TIED_METHOD:  # shares the embedding's tensors (safetensors stores each once)
                    continue
                for b in QUANT_BUFFERS:
                    if hasattr(m, b):
                        tensors[f"{name}.{b}"] = getattr(m, b).contiguous()
            save_tensors(tensors, tmp / "layers.safetensors")
            write_json_atomic(tmp / "model.json", {
                "reference": self.bundle.reference,
                "kind": self.bundle.kind,
                "untied_head": self.untied,
                "folded_norms": self.folded_norms,
                "folded_batchnorms": self.folded_batchnorms,
                "format_version": FORMAT_VERSION,
                "structure_sha256": self.bundle.structure or None,  # of the model as loaded, before quantization
                "sha256": {f: sha256_file(tmp / f) for f in TENSOR_FILES},  # checked when the directory is loaded
            })
            write_json_atomic(tmp / "quant.json", self.summary())
        return Path(out)


def tied_source(layers: dict, m) -> str:
    """The name of the quantized layer (in `layers`, name -> module) whose integers a tied head `m` shares."""
    for name, other in layers.items():
        if other is not m and other.qweight is m.qweight:
            return name
    raise EdgeqError(f"quantized model: tied layer {m.decision.name} shares no other layer's integers")


def layer_bytes(m) -> dict:
    """Stored size of a quantized layer: packed integers plus scales and zero points."""
    d = m.decision
    numel = m.qweight.numel()
    n_scales = m.scale.numel()
    scale_bytes = 2 if d.weight.scale_dtype == "bf16" else 4
    zp_bits = 0 if d.weight.symmetric else d.weight.bits
    meta = n_scales * scale_bytes + math.ceil(n_scales * zp_bits / 8)
    if d.activation.mode == "static":
        meta += 5
    if d.weight.bits >= 16:  # float weights (W16Ax): stored as fp32, no scales
        return {"bytes_quant": numel * 4 + (5 if d.activation.mode == "static" else 0), "bytes_scales": 0}
    ints = math.ceil(numel * d.weight.bits / 8)
    return {"bytes_quant": ints + meta, "bytes_scales": meta}


def unique_float_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every float parameter and persistent buffer, tied tensors once, quantized layers' integers excluded."""
    seen, out = set(), {}
    state = model.state_dict(keep_vars=False)
    qnames = {f"{n}.{b}" for n in quant_layers(model) for b in QUANT_BUFFERS}
    for k, v in state.items():
        if k in qnames or not v.is_floating_point():
            continue
        key = (v.data_ptr(), v.shape, v.stride())
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    return out


def model_float_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in unique_float_tensors(model).values())


TENSOR_FILES = ("float.safetensors", "layers.safetensors")


def _load_tensors(qdir: Path, name: str, recorded: dict) -> dict:
    """A tensor file of `qdir`, refused in one line when it is not the file model.json recorded (directories written
    before 2026-12-05 recorded none) or safetensors cannot read it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = qdir / name
    if name in recorded and sha256_file(path) != recorded[name]:
        raise EdgeqError(f"quantized model: {path} is not the file model.json recorded (its sha256 differs: damaged or "
                         "replaced); quantize again")
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise EdgeqError(f"quantized model: {path} cannot be read ({exc}); quantize again") from None


def load_quantized(qdir: str | Path) -> QuantizedModel:
    """Rebuild a quantized model from its directory (the model reference must still resolve)."""
    qdir = Path(qdir)
    for name in ("model.json", "quant.json", "recipe.toml", "float.safetensors", "layers.safetensors"):
        if not (qdir / name).is_file():
            raise EdgeqError(f"quantized model: {qdir} has no {name} (not an edgeq quantized-model directory)")
    with damaged_fields(f"quantized model: {qdir}", "quantize again"):  # a field missing or of the wrong type
        return _rebuild(qdir, read_json(qdir / "model.json"), read_json(qdir / "quant.json"))


def _rebuild(qdir: Path, meta: dict, summary: dict) -> QuantizedModel:
    """The model of `qdir` from its model.json (`meta`) and quant.json (`summary`) and its tensors."""
    recipe = load_recipe(qdir / "recipe.toml")
    try:
        bundle = load_model(meta["reference"])
    except EdgeqError as exc:  # the directory holds the quantized layers, the rest comes from the source model
        raise EdgeqError(f"quantized model: {qdir} needs its source model {meta['reference']!r}, which does not load "
                         f"here: {exc}") from None
    if meta.get("structure_sha256") and meta["structure_sha256"] != bundle.structure:
        raise EdgeqError(f"quantized model: {qdir} was made from another definition of {meta['reference']!r} (its modules or "
                         "tensors have changed since): quantize it again")
    model = bundle.module
    if meta.get("untied_head"):
        untie_head(model)
    if meta.get("folded_batchnorms"):
        fold_batchnorms(model, (), meta["folded_batchnorms"])
    tensors = _load_tensors(qdir, "layers.safetensors", meta.get("sha256") or {})
    for entry in summary["layers"]:
        d = LayerDecision.from_dict(entry)
        name = d.name
        orig = model.get_submodule(name)
        args = {b: tensors.get(f"{name}.{b}") for b in QUANT_BUFFERS}
        if d.method == TIED_METHOD:
            src = model.get_submodule(entry["tied_to"])
            new = QuantLinear(d, src.qweight, src.scale, src.zero_point)
        elif d.kind == "embedding":
            new = QuantEmbedding(d, args["qweight"], args["scale"], args["zero_point"], getattr(orig, "padding_idx", None))
        elif d.kind == "linear":
            new = QuantLinear(d, args["qweight"], args["scale"], args["zero_point"], orig.bias, args["act_scale"], args["act_zero_point"])
        else:
            new = QuantConv2d(d, orig, args["qweight"], args["scale"], args["zero_point"], args["act_scale"], args["act_zero_point"])
        set_module(model, name, new)
    floats = _load_tensors(qdir, "float.safetensors", meta.get("sha256") or {})
    missing, unexpected = model.load_state_dict(floats, strict=False)
    if unexpected:
        raise EdgeqError(f"quantized model: {qdir}/float.safetensors has tensors the model lacks: {unexpected[:3]}")
    extra = {k: v for k, v in summary.items() if k not in _SUMMARY_KEYS}
    qm = QuantizedModel(bundle, recipe, summary["bytes_before"], bool(meta.get("untied_head")), meta.get("folded_norms", []), extra,
                        meta.get("folded_batchnorms") or {})
    model.eval()
    return qm


_SUMMARY_KEYS = {"format_version", "model", "kind", "recipe", "untied_head", "folded_norms", "folded_batchnorms", "layers", "quantized_params",
                 "avg_bits", "bytes_before", "bytes_after", "size_reduction", "tflite"}


def quant_json_sha256(qdir: str | Path) -> str:
    return sha256_file(Path(qdir) / "quant.json")


def is_qdir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "quant.json").is_file() and (p / "layers.safetensors").is_file()
