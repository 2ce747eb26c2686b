"""A file's parity verdict: the tolerance it is held to, what it missed, and how a miss reads (within the
simulation's own noise floor, or explained by a rounding the file does and quant.json's simulation does not).

Shared by both exporters (FILE.json `parity`), the CLI and the report; no torch, so the report can read it.
"""

from __future__ import annotations

from collections.abc import Sequence

# The lower bounds of a file's parity, per variant: (its worst output row's cosine, top-1 agreement) against what it
# renders, the PyTorch simulation (fp32 and weight-only: float arithmetic on the same weights, so reassociation only).
TOLERANCE = {"fp32": (0.9999, 0.99), "weight-only": (0.9999, 0.99), "dynamic-int8": (0.99, 0.9), "int4": (0.99, 0.9),
             "int8": (0.97, 0.85), "int16x8": (0.99, 0.9)}
# An encoder's output rows are hidden states (a sentence embedding pools them): which coordinate is largest means
# nothing to its users, and it is the first thing float noise changes. MiniLM-L6's simulation against itself, each
# quantized layer's input perturbed by 1e-6, missed the top-1 bound on 103 of 200 draws at int8 (0.85), 81 at
# dynamic-int8 (0.9) and 195 at int16x8, where no draw missed the cosine's bound but int16x8's (8 of 200;
# benchmarks/noise_floor_minilm_200.md). So an encoder's top-1 agreement is measured and set against the noise floor,
# not bounded.
ENCODER_TOP1 = ("an encoder's rows are hidden states, and no user reads which coordinate is largest: top-1 agreement "
                "is measured and set against the noise floor, not held to a bound (the simulation itself, under 1e-6 "
                "float noise, misses such a bound on 40-98% of draws on MiniLM-L6)")


def row_checks(parity: dict, cos_bound: float, top1_bound: float | None) -> list[tuple[str, float, float]]:
    """(what, measured, lower bound) for the checks `parity` has: the prefill's worst row and top-1 agreement (not
    with `top1_bound` None), a TFLite decode step's worst row from an empty cache and after a prefill."""
    step = parity.get("decode") or {}
    checks = [("cos_min", parity["cos_min"], cos_bound), ("top1_agree", parity["top1_agree"], top1_bound),
              ("decode.cos_min", step.get("cos_min"), cos_bound),
              ("decode.after_prefill.cos_min", (step.get("after_prefill") or {}).get("cos_min"), cos_bound)]
    return [(name, value, bound) for name, value, bound in checks if value is not None and bound is not None]


# How far below the noise floor a measure may sit and still be at it: what float32 outputs resolve (a cosine or a mean
# NLL computed from float32 logits moves by ~1e-7 when they are re-added in another order). Without it, a file that
# computes the simulation to float precision could miss a floor as fine: a tiny-llama int16x8 file against its
# simulation with output grids had cos_min 0.99999999675 where the floor's was 0.99999999677.
FLOAT_SLACK = 1e-6


def within_noise_floor(parity: dict) -> bool | None:
    """Whether a file is no further from the simulation than the simulation is from itself under float noise: each of
    `row_checks` at or above the noise floor's, and for an LM its mean NLL within the floor's NLL spread of the
    simulation's, each to `FLOAT_SLACK`. None without a floor."""
    floor = parity.get("noise_floor")
    if not floor:
        return None
    below, nll_within = _against_floor(parity, floor)
    return not below and nll_within is not False


def _against_floor(parity: dict, floor: dict) -> tuple[list[str], bool | None]:
    """The `row_checks` below the noise floor's, as "what measured < bound", and whether an LM's mean NLL is within the
    floor's NLL spread of the simulation's (None: no NLL to compare), each to `FLOAT_SLACK`."""
    below = [f"{name} {value:.4f} < {bound:.4f}" for name, value, bound in
             row_checks(parity, floor["cos_min"], floor["top1_agree"]) if value < bound - FLOAT_SLACK]
    nll = parity.get("nll")
    if not nll or "nll_spread" not in floor:
        return below, None
    return below, abs(nll["file"] - nll["simulation"]) <= floor["nll_spread"] + FLOAT_SLACK


def tolerance_verdict(parity: dict, variant: str, extra: Sequence[str] = (), kind: str | None = None) -> dict:
    """FILE.json parity's verdict on a file of `variant` (of a model of `kind`): its tolerance, each check missed as
    "what: measured vs bound" (`row_checks`, then the format's own checks missed, `extra`), and `within_noise_floor`.
    An encoder's top-1 agreement has no bound (`ENCODER_TOP1`, said in `tolerance.note`). Merged into `parity`."""
    cos_tol, top1_tol = TOLERANCE[variant]
    tolerance = {"cos_min": cos_tol, "top1_agree": top1_tol}
    if kind == "encoder":
        tolerance.update(top1_agree=None, note=ENCODER_TOP1)
    missed = [f"{name} {value:.4f} < {bound}" for name, value, bound in
              row_checks(parity, tolerance["cos_min"], tolerance["top1_agree"]) if value < bound] + list(extra)
    return {"tolerance": tolerance, "within_tolerance": not missed, "missed": missed,
            "within_noise_floor": within_noise_floor(parity)}


# A file's parity beside the simulation with a rounding the file does and quant.json's simulation does not
# (`tflite._parity_under`): its key in `parity`, and what it is called.
BESIDE = (("runtime_grid", "LiteRT's run-time activation grid"), ("with_output_grids", "the file's output grids"))


def explained_by(parity: dict) -> str | None:
    """The rounding (`BESIDE`) with which the simulation is as near the file as it is to itself under float noise, so
    that rounding makes the difference between the file and quant.json's simulation; None if none does."""
    return next((what for key, what in BESIDE if (parity.get(key) or {}).get("within_noise_floor")), None)


def verdict_text(parity: dict) -> str | None:
    """A file's parity verdict in a few words: within its tolerance, or what it missed and how that reads (within the
    simulation's noise floor; explained by a rounding the file does; else which checks fall below the floor, and
    whether an LM's mean NLL stays within it). None for a FILE.json from before verdicts (ONNX before 2026-12-05)."""
    if "within_tolerance" not in parity:
        return None
    if parity["within_tolerance"]:
        return "within tolerance"
    missed = f"misses {', '.join(parity.get('missed') or [])}"
    floor = parity.get("noise_floor")
    if parity.get("within_noise_floor"):
        return f"{missed}; within the simulation's own noise floor"
    explained = explained_by(parity)
    if explained:
        return f"{missed}; explained by {explained}"
    if not floor:
        return f"{missed}; no noise floor to set it against: check the file"
    below, nll_within = _against_floor(parity, floor)
    return (f"{missed}; below the simulation's noise floor ({', '.join(below) or 'mean NLL'})"
            f"{', mean NLL within it' if nll_within else ''}: check the file")
