"""Size budgets for mixed precision: `60MB`, `512KiB`, `4.5bits`, `25%`, parsed into one `Budget`.

Every budget is checked against the same byte accounting as quant.json (`qmodel.layer_bytes`):
packed integers plus scales and zero points, plus every tensor that stays float.
- bytes (`60MB`, `60MiB`, `800kB`, `123456B`): the whole model after quantization (`bytes_after`).
- bits (`4.5bits`): quant.json's `avg_bits` over the quantized layers (scales included).
- percent (`25%`): whole-model size as a share of the fp32 model (`bytes_after / bytes_before`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import EdgeqError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_FORMS = "a size (60MB, 512KiB, 123456B), an average bit-width (4.5bits) or a share of the fp32 size (25%)"
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z%]*)\s*$")


@dataclass(frozen=True)
class Budget:
    """A parsed budget: `kind` is bytes | bits | percent; `value` in bytes, bits or percent."""

    kind: str
    value: float
    text: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "text": self.text}

    def fits(self, total_bytes: int, layer_bytes: int, layer_params: int, fp32_bytes: int) -> bool:
        """Whether a plan with these sizes meets the budget (the accounting of quant.json)."""
        return self.excess(total_bytes, layer_bytes, layer_params, fp32_bytes) <= 0

    def excess(self, total_bytes: int, layer_bytes: int, layer_params: int, fp32_bytes: int) -> float:
        """How far over the budget a plan is, in bytes (negative: slack)."""
        return total_bytes - self.max_total_bytes(total_bytes - layer_bytes, layer_params, fp32_bytes)

    def max_total_bytes(self, fixed_bytes: int, layer_params: int, fp32_bytes: int) -> float:
        """The largest whole-model size allowed, given the float bytes that stay and the quantized params."""
        if self.kind == "bytes":
            return self.value
        if self.kind == "percent":
            return self.value / 100.0 * fp32_bytes
        return fixed_bytes + self.value * layer_params / 8.0


def parse_budget(text: str | float | int) -> Budget:
    """Parse `--budget`; a bad value raises one EdgeqError naming it and the accepted forms."""
    raw = str(text)
    m = _PATTERN.match(raw)
    if not m:
        raise EdgeqError(f"--budget: {raw!r} is not {_FORMS}")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if not 0 < number <= 100:
            raise EdgeqError(f"--budget: {raw!r} is not a share in (0%, 100%]")
        return Budget("percent", number, raw)
    if unit in ("bits", "bit"):
        if not 1 <= number <= 16:
            raise EdgeqError(f"--budget: {raw!r} is not an average bit-width in [1, 16] bits")
        return Budget("bits", number, raw)
    if unit in _UNITS:
        size = number * _UNITS[unit]
        if size < 1:
            raise EdgeqError(f"--budget: {raw!r} is not a positive size")
        return Budget("bytes", size, raw)
    if unit == "":
        raise EdgeqError(f"--budget: {raw!r} has no unit; write e.g. 60MB, 4.5bits or 25%")
    raise EdgeqError(f"--budget: unit {m.group(2)!r} in {raw!r} is not one of: B, kB, MB, GB, KiB, MiB, GiB, bits, %")
