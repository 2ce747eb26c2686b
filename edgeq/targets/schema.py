"""The board-profile schema (version 1): which keys a profile may hold and what each must be.

A profile is data, so the schema is data too: `SPEC` maps every allowed key to a checker. Every
table except the top level is a fact and must carry `source` (a document or release notes named,
as a string or a list of strings). Unknown keys, wrong types and facts without a source are
`EdgeqError`s naming the file, the key path and the problem. This module never imports a runtime.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import EdgeqError

SCHEMA_VERSION = 1
SUPPORT = ("native", "fallback", "unsupported")
FORMATS = ("onnx", "tflite")
# What an op's activations are when it runs: a float dtype, a statically quantized integer
# dtype, `dynamic` (quantized on the fly per inference), or a non-numeric/index dtype.
ACTS = ("fp32", "fp16", "bf16", "fp64", "int8", "uint8", "int16", "uint16", "dynamic",
        "int32", "int64", "bool", "string", "none")
# What an op's constant weight is stored as (`none`: the op has no weight).
WEIGHTS = ("none", "fp32", "fp16", "bf16", "int8", "uint8", "int4", "uint4", "int2", "uint2", "int16", "int32")  # int32: a quantized bias
GRANULARITIES = ("tensor", "channel", "group")
POWER_SENSORS = ("none", "ina3221", "pmic", "rapl", "hwmon")

Check = Callable[[Any, str], Any]


def _fail(where: str, problem: str) -> EdgeqError:
    return EdgeqError(f"{where}: {problem}")


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"expected a non-empty string, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, f"expected a non-negative integer, got {value!r}")
    return value


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _fail(where, f"expected a non-negative number, got {value!r}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, f"expected true or false, got {value!r}")
    return value


def _list_of(item: Check) -> Check:
    def check(value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise _fail(where, f"expected a list, got {type(value).__name__}")
        return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]

    return check


def _choice(allowed: tuple[str, ...]) -> Check:
    def check(value: Any, where: str) -> str:
        if value not in allowed:
            raise _fail(where, f"{value!r} is not one of: {', '.join(allowed)}")
        return value

    return check


def _str_or_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [_str(value, where)]
    return _list_of(_str)(value, where)


def _source(value: Any, where: str) -> list[str]:
    sources = _str_or_list(value, where)
    if not sources:
        raise _fail(where, "a fact needs at least one source (a document or release notes named)")
    return sources


def _table(spec: dict[str, tuple[Check, bool]], fact: bool = True) -> Check:
    """A checker for a table: `spec` maps key -> (checker, required); facts also need `source`."""
    full = dict(spec)
    if fact:
        full.setdefault("source", (_source, True))
        full.setdefault("note", (_str, False))

    def check(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise _fail(where or "top level", f"expected a table, got {type(value).__name__}")
        at = (lambda k: f"{where}.{k}") if where else (lambda k: k)  # noqa: E731
        unknown = sorted(set(value) - set(full))
        if unknown:
            raise _fail(at(unknown[0]), f"unknown key (allowed here: {', '.join(sorted(full))})")
        out = {}
        for key, (checker, required) in full.items():
            if key not in value:
                if key == "source" and required:
                    raise _fail(at(key), "a fact without a source")
                if required:
                    raise _fail(where or "top level", f"required key {key!r} is missing")
                continue
            out[key] = checker(value[key], at(key))
        return out

    return check


def _map_of(item: Check) -> Check:
    def check(value: Any, where: str) -> dict:
        if not isinstance(value, dict) or not value:
            raise _fail(where, "expected a non-empty table of named entries")
        return {k: item(v, f"{where}.{k}") for k, v in value.items()}

    return check


_RULE = _table({
    "op": (_str_or_list, True),
    "act": (_list_of(_choice(ACTS)), False),
    "weight": (_list_of(_choice(WEIGHTS)), False),
    "granularity": (_list_of(_choice(GRANULARITIES)), False),
    "group_sizes": (_list_of(_int), False),
    "support": (_choice(SUPPORT), True),
    "kernel": (_str, False),
    "fallback_to": (_str, False),
    "why": (_str, False),
    "note": (_str, False),
})

_RUNTIME = _table({
    "package": (_str, True),
    "version": (_str, True),
    "format": (_choice(FORMATS), True),
    "provider": (_str, True),
    "default": (_bool, False),
    "install": (_str, False),
    "note": (_str, False),
    "ops": (_list_of(_RULE), True),
})

SPEC = _table({
    "schema": (_int, True),
    "name": (_str, True),
    "title": (_str, True),
    "aliases": (_list_of(_str), False),
    "cpu": (_table({
        "model": (_str, True),
        "cores": (_int, True),
        "arch": (_str, True),
        "features": (_list_of(_str), True),
        "lacks": (_list_of(_str), False),
        "optional": (_list_of(_str), False),
        "clock_ghz": (_num, False),
    }), True),
    "gpu": (_table({
        "model": (_str, True),
        "arch": (_str, True),
        "compute_capability": (_str, False),
        "cuda_cores": (_int, False),
        "tensor_cores": (_bool, False),
        "int8": (_bool, True),
        "fp16": (_bool, True),
    }), False),
    "memory": (_table({
        "ram_gib": (_list_of(_num), True),
        "type": (_str, False),
        "shared_with_gpu": (_bool, False),
    }), True),
    "os": (_table({
        "name": (_str, True),
        "kernel": (_str, False),
        "python": (_str, False),
        "bsp": (_str, False),
    }), True),
    "power": (_table({
        "sensor": (_choice(POWER_SENSORS), True),
        "input_rail": (_str, False),
        "rails": (_list_of(_str), False),
        "read": (_str, False),
        "meter": (_str, False),
    }), True),
    "runtimes": (_map_of(_RUNTIME), True),
}, fact=False)


def validate(data: Any, where: str) -> dict:
    """Validate a parsed profile; `where` (the file) prefixes every error: `FILE: key.path: problem`."""
    try:
        return _validate(data)
    except EdgeqError as exc:
        raise EdgeqError(f"{where}: {exc}") from None


def _validate(data: Any) -> dict:
    out = SPEC(data, "")
    if out["schema"] != SCHEMA_VERSION:
        raise _fail("schema", f"{out['schema']} is not a supported schema version ({SCHEMA_VERSION})")
    power = out["power"]
    if power["sensor"] != "none" and "input_rail" not in power:
        raise _fail("power.input_rail", f"required when sensor = {power['sensor']!r}")
    for rname, rt in out["runtimes"].items():
        for i, rule in enumerate(rt["ops"]):
            at = f"runtimes.{rname}.ops[{i}]"
            if rule["support"] == "fallback" and "fallback_to" not in rule:
                raise _fail(f"{at}.fallback_to", "required when support = 'fallback' (what it falls back to)")
            if rule["support"] != "native" and "why" not in rule:
                raise _fail(f"{at}.why", f"required when support = {rule['support']!r}")
            if "group_sizes" in rule and "group" not in rule.get("granularity", ["group"]):
                raise _fail(f"{at}.group_sizes", "only meaningful with granularity including 'group'")
    return out
