"""QuantRecipe: what to quantize and how, as data (TOML or YAML), validated against a schema.

A recipe is an ordered list of rules. Each rule matches module names with a regular expression
(`re.search`), and optionally only layers of some kinds (`kind`: linear, conv2d, depthwise); the first
matching rule decides a layer's weight spec, activation spec, method and range multiplier gamma.
Layers no rule matches stay float. Unknown keys are errors.

Transformer-safe by construction: only weight-bearing layers (Linear, Conv) are ever quantized,
so attention masks, softmax and norms stay float whatever a rule says.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .errors import EdgeqError, choice_error

GRANULARITIES = ("tensor", "channel", "group")
ACT_MODES = ("none", "dynamic", "static")
ACT_GRANULARITIES = ("tensor", "token", "group")
CALIBRATIONS = ("minmax", "percentile", "mse")
SCALE_DTYPES = ("fp32", "bf16")
# what a rule's `kind` may name: a Linear, any Conv2d, or a depthwise one (every output channel reads one input channel)
LAYER_KINDS = ("linear", "conv2d", "depthwise")


def _check_keys(where: str, data: dict, allowed) -> None:
    if not isinstance(data, dict):
        raise EdgeqError(f"{where}: expected a table, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise EdgeqError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _int_in(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise EdgeqError(f"{where}: {value!r} is not an integer in [{lo}, {hi}]")
    return value


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise EdgeqError(f"{where}: {value!r} is not true or false")
    return value


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    scale_dtype: str = "fp32"
    range: str = "narrow"  # symmetric grids: narrow (absmax -> 2^(b-1)-1, LiteRT) | full (all 2^b levels, ONNX only)

    @classmethod
    def from_dict(cls, data: dict, where: str = "weight") -> "WeightSpec":
        _check_keys(where, data, [f.name for f in dataclasses.fields(cls)])
        spec = cls(**data)
        if spec.bits != 16:  # 16 = the weight stays float (W16Ax): no weight quantization at all
            try:
                _int_in(f"{where}.bits", spec.bits, 1, 8)
            except EdgeqError as exc:
                raise EdgeqError(f"{exc}, or 16 (the weight stays float)") from None
        if spec.granularity not in GRANULARITIES:
            raise choice_error(f"{where}.granularity", spec.granularity, GRANULARITIES)
        if spec.granularity == "group":
            _int_in(f"{where}.group_size", spec.group_size, 8, 4096)
            if spec.group_size & (spec.group_size - 1):
                raise EdgeqError(f"{where}.group_size: {spec.group_size} is not a power of two")
        elif spec.group_size is not None:
            raise EdgeqError(f"{where}.group_size: only allowed with granularity = 'group'")
        if spec.scale_dtype not in SCALE_DTYPES:
            raise choice_error(f"{where}.scale_dtype", spec.scale_dtype, SCALE_DTYPES)
        if spec.range not in ("narrow", "full"):
            raise choice_error(f"{where}.range", spec.range, ("narrow", "full"))
        if spec.range == "full" and not (spec.symmetric and 2 <= spec.bits <= 8):
            raise EdgeqError(f"{where}.range: 'full' is for symmetric 2..8-bit grids")
        if spec.bits == 1 and not spec.symmetric:
            raise EdgeqError(f"{where}: 1-bit weights are binary (symmetric = true)")
        return spec

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    @property
    def name(self) -> str:
        if not self.quantized:
            return "w16-float"
        g = {"tensor": "t", "channel": "c"}.get(self.granularity, f"g{self.group_size}")
        kind = ("f" if self.range == "full" else "s") if self.symmetric else "a"
        return f"w{self.bits}{kind}-{g}"


@dataclass(frozen=True)
class ActSpec:
    mode: str = "none"
    bits: int = 8
    granularity: str = "tensor"
    symmetric: bool = False
    calibration: str = "minmax"
    percentile: float = 99.99
    group_size: int | None = None  # only with granularity = "group" (dynamic, per token and group of channels)

    @classmethod
    def from_dict(cls, data: dict, where: str = "activation") -> "ActSpec":
        _check_keys(where, data, [f.name for f in dataclasses.fields(cls)])
        spec = cls(**data)
        if spec.mode not in ACT_MODES:
            raise choice_error(f"{where}.mode", spec.mode, ACT_MODES)
        _int_in(f"{where}.bits", spec.bits, 2, 16)
        if spec.granularity not in ACT_GRANULARITIES:
            raise choice_error(f"{where}.granularity", spec.granularity, ACT_GRANULARITIES)
        if spec.calibration not in CALIBRATIONS:
            raise choice_error(f"{where}.calibration", spec.calibration, CALIBRATIONS)
        if not 50.0 < float(spec.percentile) <= 100.0:
            raise EdgeqError(f"{where}.percentile: {spec.percentile} is not in (50, 100]")
        if spec.mode == "static" and spec.bits > 8 and (spec.bits != 16 or not spec.symmetric):
            raise EdgeqError(f"{where}.bits: static activations are at most 8-bit, or 16-bit symmetric (int16, LiteRT's 16x8 "
                             f"mode; got {spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'}); "
                             "use mode = 'dynamic' for other wide grids")
        if spec.mode == "static" and spec.granularity != "tensor":
            raise EdgeqError(f"{where}: static activations are per-tensor (per-token and group-wise are dynamic)")
        if spec.granularity == "group":
            _int_in(f"{where}.group_size", spec.group_size, 8, 4096)
        elif spec.group_size is not None:
            raise EdgeqError(f"{where}.group_size: only allowed with granularity = 'group'")
        return spec

    @property
    def quantized(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class Rule:
    match: str
    skip: bool = False
    weight: WeightSpec = field(default_factory=WeightSpec)
    activation: ActSpec = field(default_factory=ActSpec)
    method: str = "rtn"
    gamma: float = 1.0
    kind: tuple[str, ...] | None = None  # only layers of these kinds (LAYER_KINDS); None: every layer `match` names

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "Rule":
        _check_keys(where, data, ["match", "kind", "skip", "weight", "activation", "method", "gamma"])
        if "match" not in data:
            raise EdgeqError(f"{where}: missing key 'match' (a regular expression over module names)")
        try:
            re.compile(data["match"])
        except re.error as exc:
            raise EdgeqError(f"{where}.match: {data['match']!r} is not a regular expression ({exc})")
        from .quantize.methods import METHODS

        method = data.get("method", "rtn")
        if method not in METHODS:
            raise choice_error(f"{where}.method", method, sorted(METHODS))
        gamma = float(data.get("gamma", 1.0))
        if not 0.1 <= gamma <= 2.0:
            raise EdgeqError(f"{where}.gamma: {gamma} is not in [0.1, 2.0]")
        kind = data.get("kind")
        if kind is not None:
            kind = (kind,) if isinstance(kind, str) else kind
            if not isinstance(kind, (list, tuple)) or not kind:
                raise EdgeqError(f"{where}.kind: {data['kind']!r} is not a layer kind or a list of them")
            for k in kind:
                if k not in LAYER_KINDS:
                    raise choice_error(f"{where}.kind", k, LAYER_KINDS)
            kind = tuple(kind)
        return cls(
            match=data["match"],
            kind=kind,
            skip=bool(data.get("skip", False)),
            weight=WeightSpec.from_dict(data.get("weight", {}), f"{where}.weight"),
            activation=ActSpec.from_dict(data.get("activation", {}), f"{where}.activation"),
            method=method,
            gamma=gamma,
        )


VALUE_HESSIANS = ("attention", "input")


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    # "attention": a value projection's Hessian is built from its inputs averaged by the attention
    # weights that mix its outputs (what the attention output sees); "input": from its raw inputs
    value_hessian: str = "attention"

    @classmethod
    def from_dict(cls, data: dict, where: str = "gptq") -> "GPTQOptions":
        _check_keys(where, data, [f.name for f in dataclasses.fields(cls)])
        opts = cls(**data)
        if not 0.0 < opts.damp < 1.0:
            raise EdgeqError(f"{where}.damp: {opts.damp} is not in (0, 1)")
        _int_in(f"{where}.block_size", opts.block_size, 1, 4096)
        if opts.value_hessian not in VALUE_HESSIANS:
            raise EdgeqError(f"{where}.value_hessian: {opts.value_hessian!r} is not one of {', '.join(VALUE_HESSIANS)}")
        return opts


PB_CRITERIA = ("magnitude", "hessian")


@dataclass(frozen=True)
class PBLLMOptions:
    """PB-LLM (methods `pb-llm`, `pb-llm-rtn`): the fraction of weights kept at 8 bits and how they are chosen."""

    salient_fraction: float = 0.1
    criterion: str = "hessian"
    damp: float = 0.01
    # where `edgeq qat --method pb-llm` starts: "gptq" = PB-GPTQ's integers (latent weights = the error-compensated
    # values GPTQ binarized), "float" = the float weights binarized as they are (the paper's QAT start)
    qat_init: str = "gptq"

    @classmethod
    def from_dict(cls, data: dict, where: str = "pbllm") -> "PBLLMOptions":
        _check_keys(where, data, [f.name for f in dataclasses.fields(cls)])
        opts = cls(**data)
        if not 0.0 <= float(opts.salient_fraction) <= 0.5:
            raise EdgeqError(f"{where}.salient_fraction: {opts.salient_fraction} is not in [0, 0.5]")
        if opts.criterion not in PB_CRITERIA:
            raise choice_error(f"{where}.criterion", opts.criterion, PB_CRITERIA)
        if not 0.0 < opts.damp < 1.0:
            raise EdgeqError(f"{where}.damp: {opts.damp} is not in (0, 1)")
        if opts.qat_init not in ("gptq", "float"):
            raise choice_error(f"{where}.qat_init", opts.qat_init, ("gptq", "float"))
        return opts


@dataclass(frozen=True)
class CalibOptions:
    samples: int = 32
    seq_len: int = 512
    # true: a transformer is calibrated block by block on the outputs of the blocks already quantized (GPTQ's
    # sequential calibration); false: every statistic (SmoothQuant's channel maxima, activation ranges, Hessians)
    # from one pass of the float model, as `edgeq qat` prepares its layers
    sequential: bool = True

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration") -> "CalibOptions":
        _check_keys(where, data, [f.name for f in dataclasses.fields(cls)])
        opts = cls(**data)
        _int_in(f"{where}.samples", opts.samples, 1, 4096)
        _int_in(f"{where}.seq_len", opts.seq_len, 1, 32768)
        if not isinstance(opts.sequential, bool):
            raise EdgeqError(f"{where}.sequential: {opts.sequential!r} is not true or false")
        return opts


@dataclass(frozen=True)
class QuantRecipe:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    calibration: CalibOptions = field(default_factory=CalibOptions)
    fold_norms: bool = True
    # each BatchNorm after a conv (or linear layer) folded into it before quantizing (transforms.fold_batchnorms); false
    # leaves them to the exporters, which fold a conv's on edgeq's grid (the files' scales then not bitwise edgeq's)
    fold_batchnorms: bool = True
    untie_head: bool = True
    pbllm: PBLLMOptions = field(default_factory=PBLLMOptions)
    smoothing: float = 0.0  # SmoothQuant alpha for layers with quantized activations of <= 8 bits; 0 = off
    # the input embedding's weight grid (rows = tokens; RTN). None keeps it float. A tied LM head without
    # its own rule shares these integers (one stored copy).
    embedding: WeightSpec | None = None
    # that tied head's input grid (`[embedding] head_activation`; float by default): the head is a linear layer
    head_activation: ActSpec = field(default_factory=ActSpec)

    @classmethod
    def from_dict(cls, data: dict, where: str = "recipe") -> "QuantRecipe":
        _check_keys(where, data, ["name", "description", "rules", "gptq", "calibration", "fold_norms", "fold_batchnorms",
                                  "untie_head", "pbllm", "smoothing", "embedding"])
        embedding, head_activation = None, ActSpec()
        if "embedding" in data:
            table = dict(data["embedding"])
            if "head_activation" in table:
                head_activation = ActSpec.from_dict(table.pop("head_activation"), f"{where}.embedding.head_activation")
                if head_activation.mode == "static":
                    raise EdgeqError(f"{where}.embedding.head_activation: a tied head's input grid is dynamic or none "
                                     "(no calibration reaches it); give the head a rule of its own for a static grid")
            embedding = WeightSpec.from_dict(table, f"{where}.embedding")
            if not 2 <= embedding.bits <= 8:
                raise EdgeqError(f"{where}.embedding.bits: embeddings are quantized to 2..8 bits (got {embedding.bits}); "
                                 "leave the table out to keep them float")
        smoothing = data.get("smoothing", 0.0)
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
            raise EdgeqError(f"{where}.smoothing: {smoothing!r} is not a number in [0, 1) (SmoothQuant alpha; 0 = off)")
        rules = data.get("rules")
        if not isinstance(rules, list) or not rules:
            raise EdgeqError(f"{where}.rules: a recipe needs a non-empty list of rules")
        return cls(
            name=str(data.get("name", "custom")),
            description=str(data.get("description", "")),
            rules=tuple(Rule.from_dict(r, f"{where}.rules[{i}]") for i, r in enumerate(rules)),
            gptq=GPTQOptions.from_dict(data.get("gptq", {})),
            calibration=CalibOptions.from_dict(data.get("calibration", {})),
            fold_norms=_flag(f"{where}.fold_norms", data.get("fold_norms", True)),
            fold_batchnorms=_flag(f"{where}.fold_batchnorms", data.get("fold_batchnorms", True)),
            untie_head=_flag(f"{where}.untie_head", data.get("untie_head", True)),
            pbllm=PBLLMOptions.from_dict(data.get("pbllm", {})),
            smoothing=float(smoothing),
            embedding=embedding,
            head_activation=head_activation,
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["rules"] = [_drop_none(r) for r in out["rules"]]
        head_activation = out.pop("head_activation")
        if out["embedding"] is None:
            del out["embedding"]
        else:
            out["embedding"] = _drop_none(out["embedding"])
            if self.head_activation.quantized:
                out["embedding"]["head_activation"] = _drop_none(head_activation)
        return out

    def idle_rules(self, deciding: Iterable[Rule]) -> list[dict]:
        """The quantizing rules not among `deciding` (the rules `rule_for` gave a model's layers): their pattern names
        none of its layers, or an earlier rule takes every layer it names. A preset written for other module names
        then quantizes those layers by a later rule, which the user should know (`w8a8-static-fc2a16`'s 16-bit FC2
        rule once named no BERT layer)."""
        used = {id(rule) for rule in deciding}
        return [{"rule": i, "match": r.match} for i, r in enumerate(self.rules) if not r.skip and id(r) not in used]

    def rule_for(self, module_name: str, kinds: tuple[str, ...] = ("linear",)) -> Rule | None:
        """The first rule matching `module_name` and, where the rule names kinds, one of the layer's `kinds`
        (`layer_kinds`: a depthwise conv is both conv2d and depthwise), or None when the layer stays float."""
        for rule in self.rules:
            if re.search(rule.match, module_name) and (rule.kind is None or set(rule.kind) & set(kinds)):
                return None if rule.skip else rule
        return None

    @property
    def needs_calibration(self) -> bool:
        return self.smoothing > 0 or any(
            not r.skip and (r.method != "rtn" or r.activation.mode == "static") for r in self.rules
        )

    def calibrated(self, samples: int | None = None, seq_len: int | None = None) -> "QuantRecipe":
        """This recipe with the calibration that runs (None keeps the recipe's own), as its recipe.toml records it."""
        calibration = dataclasses.replace(self.calibration, samples=samples or self.calibration.samples,
                                          seq_len=seq_len or self.calibration.seq_len)
        return dataclasses.replace(self, calibration=calibration)


def _drop_none(obj):
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    return obj


# Recipes computed per model rather than read from a file: name -> (entry point, one-line help).
# `edgeq quantize --recipe auto` calls the entry point instead of `load_recipe`.
BUILT_RECIPES = {
    "auto": ("edgeq.quantize.mixed:auto_quantize",
             "hardware-aware mixed precision: bits per layer from sensitivity under --budget (needs --calib; --target or --bits)"),
}


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("edgeq.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(ref: str | Path) -> QuantRecipe:
    """A recipe from a preset name (`w8a8`, `w4-g128`, ...) or a .toml / .yaml file."""
    path = Path(ref)
    if path.suffix.lower() in (".toml", ".yaml", ".yml", ".json"):
        if not path.is_file():
            raise EdgeqError(f"recipe: file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        where = path.name
    elif str(ref) in BUILT_RECIPES:
        raise EdgeqError(f"recipe: {str(ref)!r} is computed per model, not loaded: use edgeq quantize --recipe {ref} "
                         f"(library: {BUILT_RECIPES[str(ref)][0]})")
    elif str(ref) in preset_names():
        text = resources.files("edgeq.recipes").joinpath(f"{ref}.toml").read_text(encoding="utf-8")
        where, path = f"preset {ref}", Path(f"{ref}.toml")
    else:
        raise EdgeqError(f"recipe: {str(ref)!r} is neither a preset ({', '.join(preset_names())}) nor a .toml/.yaml file")
    data = parse_recipe_text(text, path.suffix.lower(), where)
    data.setdefault("name", path.stem)
    return QuantRecipe.from_dict(data, where)


def parse_recipe_text(text: str, suffix: str, where: str) -> dict:
    try:
        if suffix == ".toml":
            return tomllib.loads(text)
        if suffix == ".json":
            import json

            return json.loads(text)
        import yaml

        data = yaml.safe_load(text)
    except Exception as exc:  # parser errors differ per format; all are the user's file
        raise EdgeqError(f"{where}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"{where}: expected a mapping at the top level")
    return data


def dump_recipe_toml(recipe: QuantRecipe) -> str:
    import tomli_w

    return tomli_w.dumps(recipe.to_dict())
