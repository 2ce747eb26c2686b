"""Hardware-aware mixed precision: the `auto` recipe (`edgeq quantize --recipe auto`).

    qm = auto_quantize(bundle, target="rpi5", budget="4.5bits", calib_batches=batches)
    qm.save("out/")   # recipe.toml has one exact-name rule per layer; quant.json["mixed"] the reasons

Stages: `analyze` (fold norms if every candidate format is 8-bit; Fisher sensitivity, weight variance,
input kurtosis and the predicted loss of every layer at every candidate bit-width) -> `plan` (bits per layer under the
budget: closed-form rate-distortion start, integer greedy / Lagrangian refinement; see allocate.py)
-> `quantize_model` with the resulting per-layer recipe -> measured loss (against the uniform plan of the same
budget, also quantized and measured: the lower is kept). `analyze` is separate so
one analysis serves many budgets (tools/bench_mixed.py).

The bit-widths come from the target profile (the weight formats its runtime runs natively for a
Linear, or a convolution, with the chosen activation mode) or from an explicit `allowed_bits` (mixed_formats.py);
which layers are candidates, and at which formats, is the analysis' (mixed_analysis.py): a tied LM head stays float
and shared with the embedding, and on a CNN the plan chooses which convolutions stay float. This module never
changes the core's byte accounting: sizes are computed exactly as quant.json.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from typing import Iterable

import torch

from ..errors import EdgeqError
from ..models import ModelBundle
from ..recipe import CalibOptions, QuantRecipe, WeightSpec
from .allocate import Allocation, Choice, LayerOptions, allocate
from .budget import Budget, parse_budget
# (the analysis' and the formats' names are edgeq.quantize.mixed's too: the CLI, tools and tests import them from here)
from .mixed_analysis import FLOAT_BITS, Analysis, analyze, candidate_layers, spec_bytes  # noqa: F401
from .mixed_formats import (MixedOptions, activation_grid, allowed_bit_specs, conv_bit_specs, embedding_table,  # noqa: F401
                            fit_blocks, parse_bits)
from .qmodel import QuantizedModel
from .sensitivity import Objective, mean_loss, measure_layers
from .transforms import fold_batchnorms, fold_norms

AUTO_RECIPE = "auto"


def _limit(analysis: Analysis, budget: Budget | str) -> tuple[float, int]:
    """The most bytes `budget` allows the whole model, and the candidate layers' parameter count."""
    budget = parse_budget(budget) if isinstance(budget, str) else budget
    params = sum(s.params for s in analysis.layers.values())
    return budget.max_total_bytes(analysis.fixed_bytes, params, analysis.fp32_bytes), params


def plan(analysis: Analysis, budget: Budget | str) -> Allocation:
    """Bits per layer under `budget` from an analysis (no model needed)."""
    limit, _ = _limit(analysis, budget)
    layers = [LayerOptions(name, s.params, max(s.sensitivity * s.variance, 1e-30), analysis.choices(name),
                           fixed=name in analysis.forced) for name, s in analysis.layers.items()]
    try:
        return allocate(layers, analysis.fixed_bytes, limit)
    except EdgeqError as exc:
        convs = analysis.convolutions
        if not convs.get("count"):
            raise
        n = convs["count"]
        raise EdgeqError(f"{exc}; of the float part, {n} convolution{'s' * (n != 1)} that no plan quantizes "
                         f"hold{'s' * (n == 1)} {convs['bytes']:,} bytes: {convs['why']}") from None


def uniform_plan(analysis: Analysis, budget: Budget | str) -> Allocation | None:
    """Every layer at the widest single bit-width the budget holds (forced layers at the widest of all), or None."""
    limit, params = _limit(analysis, budget)
    for bits in sorted(analysis.specs, reverse=True):
        picks = {}
        for name in analysis.layers:
            # a convolution takes its 8 bits at any width
            own = [b for b in analysis.table[name] if b != FLOAT_BITS] or [FLOAT_BITS]
            b = max(own) if name in analysis.forced else bits if bits in own else min(own)
            picks[name] = Choice(b, analysis.bytes_table[name][b], analysis.table[name][b])
        layer_bytes = sum(c.bytes for c in picks.values())
        if analysis.fixed_bytes + layer_bytes <= limit:
            return Allocation(picks, {}, analysis.fixed_bytes + layer_bytes, layer_bytes, sum(c.loss for c in picks.values()),
                              f"uniform {bits}-bit", {"avg_bits": layer_bytes * 8 / max(params, 1)})
    return None


def build_recipe(analysis: Analysis, allocation: Allocation, options: MixedOptions, name: str = AUTO_RECIPE,
                 calibration: CalibOptions | None = None) -> QuantRecipe:
    """One exact-name rule per layer, in the model's order; `calibration`: what the quantization ran on."""
    import re

    act = (analysis.target or {}).get("activation_grid") or activation_grid(options.activation or "none", None)
    rules = []
    for layer in analysis.layers:
        spec = analysis.spec(layer, allocation.picks[layer].bits)
        if spec is None:
            continue  # a convolution the plan keeps float: no rule decides it
        w = {k: v for k, v in spec.__dict__.items() if v is not None}
        rules.append({"match": f"^{re.escape(layer)}$", "weight": w, "activation": act, "method": options.method})
    bits = sorted({c.bits for c in allocation.picks.values() if c.bits != FLOAT_BITS})
    floats = sum(c.bits == FLOAT_BITS for c in allocation.picks.values())
    extra = {"embedding": embedding_table(options.embedding_bits, analysis.target or {})} \
        if options.embedding_bits is not None else {}
    return QuantRecipe.from_dict({
        "name": name,
        "description": f"auto mixed precision (bits {bits}{f', {floats} convolutions float' if floats else ''}, "
                       f"{allocation.details['avg_bits']:.3f} avg bits) from Fisher sensitivity x weight variance",
        "rules": rules,
        "untie_head": False,
        "fold_norms": analysis.folded_norms,
        **({"calibration": asdict(calibration)} if calibration else {}),
        **extra,
    })


def embedding_bytes(model: torch.nn.Module, table: dict | None) -> int:
    """The input embedding table's stored bytes: fp32 (no table), or as `embedding_table` stores it (quant.json's count)."""
    emb = model.get_input_embeddings()
    if table is None:
        return emb.weight.numel() * 4
    spec = WeightSpec.from_dict({k: v for k, v in table.items() if k != "head_activation"})
    return spec_bytes(tuple(emb.weight.shape), spec)


def auto_quantize(bundle: ModelBundle, target: str | None, budget: str | Budget, calib_batches,
                  allowed_bits: Iterable[int] | None = None, options: MixedOptions = MixedOptions(),
                  analysis: Analysis | None = None, progress=None) -> QuantizedModel:
    """Quantize `bundle` (in place) with per-layer bits chosen under `budget` from the target's bit set.

    When the final loss is measured and a uniform plan fits the budget too, that plan is quantized from a copy and
    measured on the same batches; the lower measured loss is kept (quant.json `mixed.measured_alternative` records
    the other), so `auto` is never measurably worse than one bit-width everywhere.

    `budget`: "60MB" | "4.5bits" | "25%" (see budget.py). `target`: a profile name, or None with
    `allowed_bits`. `analysis`: a previous `analyze` result for the same model (skips the Fisher pass).
    quant.json gets a `mixed` table: per-layer bits, sensitivity, variance, kurtosis, predicted and
    measured loss, the budget and the solver's record. recipe.toml records how many calibration windows (and of
    what length) the batches held, so that the recipe re-runs as it ran.
    """
    from .ptq import quantize_model

    budget = parse_budget(budget) if not isinstance(budget, Budget) else budget
    batches = list(calib_batches or [])
    measure_set = batches[: options.sensitivity_batches] if options.sensitivity_batches else batches
    objective = Objective(bundle.is_lm)
    base = None
    if analysis is None:
        specs, target_info = allowed_bit_specs(target, allowed_bits, options)
        conv_specs, conv_why = conv_bit_specs(target_info, options, allowed_bits)
        widths = {n: bundle.module.get_submodule(n).in_features for n in candidate_layers(bundle.module, options)}
        specs, layer_specs = fit_blocks(specs, widths, target_info)
        analysis = analyze(bundle, batches, specs, options, progress, conv_specs, conv_why, layer_specs)
        analysis.target = target_info
        base = analysis.base_loss  # measured on the same batches as measure_set
    else:
        if analysis.folded_norms:
            fold_norms(bundle.module)  # the analysis was made on a folded model; folding twice is exact
        unfolded = {c: n for c, n in analysis.folded_batchnorms.items()
                     if isinstance(bundle.module.get_submodule(n), torch.nn.modules.batchnorm._BatchNorm)}
        fold_batchnorms(bundle.module, (), unfolded)  # as the analysed model was (a second fold would not be exact)
    if options.embedding_bits is not None:
        # the table leaves the float part of the budget at its integer size (what quant.json will count)
        table = embedding_table(options.embedding_bits, analysis.target or {})
        analysis = replace(analysis, fixed_bytes=analysis.fixed_bytes - embedding_bytes(bundle.module, None)
                                       + embedding_bytes(bundle.module, table))
    allocation = plan(analysis, budget)
    # the sensitivity model adds up layers' predicted losses, which can favour a mixed plan a uniform one of the same
    # size beats (SmolLM2, 2-8 bits at INT4 g128's size: 29.0 against 26.8); both are measured and the better kept
    uniform = uniform_plan(analysis, budget) if options.measure != "none" else None
    if uniform is not None and {n: c.bits for n, c in uniform.picks.items()} == {n: c.bits for n, c in allocation.picks.items()}:
        uniform = None
    spare = copy.deepcopy(bundle.module) if uniform is not None else None  # quantize_model changes the module in place
    calibration = _calibration_of(bundle, batches)
    recipe = build_recipe(analysis, allocation, options, calibration=calibration)
    alone = {}
    if options.measure != "none" and (base is None or not bundle.is_lm):
        # the float loss on these batches; for non-LMs this also records the float outputs the loss compares with
        base = mean_loss(bundle.module, measure_set, objective)
    if options.measure == "layers":
        plan_specs = {n: analysis.spec(n, c.bits) for n, c in allocation.picks.items() if c.bits != FLOAT_BITS}
        alone = measure_layers(bundle.module, plan_specs, measure_set, objective, base, progress)
    qm = _with_batchnorms(quantize_model(bundle, recipe, batches, progress), analysis)
    summary = qm.summary()
    measured = mean_loss(qm.model, measure_set, objective) if options.measure != "none" else None
    alternative = None
    if uniform is not None:
        other = _with_batchnorms(quantize_model(replace(bundle, module=spare), build_recipe(
            analysis, uniform, options, calibration=calibration), batches, progress), analysis)
        other_loss = mean_loss(other.model, measure_set, objective)
        if other_loss < measured:
            alternative = _alternative(allocation, measured)
            qm, allocation, measured, alone, summary = other, uniform, other_loss, {}, other.summary()
        else:
            alternative = _alternative(uniform, other_loss)
    qm.extra["mixed"] = _record(analysis, allocation, budget, options, summary, measured, alone, base)
    if alternative is not None:
        qm.extra["mixed"]["measured_alternative"] = alternative
    return qm


def _with_batchnorms(qm: QuantizedModel, analysis: Analysis) -> QuantizedModel:
    """The BatchNorms the analysis folded, which `quantize_model` found folded already, are the QDIR's folds too: a
    directory loads by folding them again (quant.json `folded_batchnorms`)."""
    qm.folded_batchnorms = {**analysis.folded_batchnorms, **qm.folded_batchnorms}
    return qm


def _alternative(allocation: Allocation, measured: float) -> dict:
    """quant.json's record of the measured plan that was not kept."""
    return {"strategy": allocation.strategy, "avg_bits": allocation.details["avg_bits"],
            "predicted_loss": allocation.predicted_loss, "measured_loss": measured}


def _calibration_of(bundle: ModelBundle, batches: list) -> CalibOptions:
    """What the calibration batches hold: their sample count, and a causal LM's window length."""
    samples = sum(len(b[0]) for b in batches)
    return CalibOptions(samples=samples, seq_len=batches[0][0].shape[-1]) if bundle.is_lm else CalibOptions(samples=samples)


def _record(analysis: Analysis, allocation: Allocation, budget: Budget, options: MixedOptions, summary: dict,
            measured: float | None, alone: dict, base: float | None) -> dict:
    layers = {}
    for name, s in analysis.layers.items():
        c = allocation.picks[name]
        layers[name] = {
            "bits": c.bits,  # FLOAT_BITS (32): a convolution the plan keeps float
            **({"kind": "conv2d"} if analysis.is_conv(name) else {}),
            "closed_form_bits": round(allocation.closed_form_bits.get(name, float(c.bits)), 4),
            "forced_8bit": name in analysis.forced,
            "sensitivity": s.sensitivity,
            "variance": s.variance,
            "importance": s.sensitivity * s.variance,
            "input_kurtosis": round(s.kurtosis, 3),
            "predicted_loss": c.loss,
            "predicted_loss_by_bits": {str(b): v for b, v in analysis.table[name].items()},
            **({"measured_loss": alone[name]} if name in alone else {}),
        }
    out = {
        "budget": budget.to_dict(),
        "budget_max_bytes": _limit(analysis, budget)[0],
        "planned_bytes": allocation.total_bytes,  # the plan's size by the analysis' accounting (= bytes_after)
        "target": analysis.target,
        "bit_formats": {str(b): s.name for b, s in analysis.specs.items()},
        "conv_formats": {str(b): s.name for b, s in analysis.conv_specs.items()},
        "layer_formats": {n: {str(b): s.name if s else None for b, s in t.items()}
                          for n, t in analysis.layer_specs.items()},
        "options": {k: v for k, v in options.__dict__.items()},
        "objective": analysis.objective,
        "convolutions_left_float": analysis.convolutions,  # those no plan quantizes
        "convolutions_kept_float": sorted(n for n, c in allocation.picks.items() if c.bits == FLOAT_BITS),
        "sensitivity_method": "empirical Fisher diagonal from per-token gradients (hooks; a convolution's from its "
                              "weight's gradient per batch), predicted loss = 0.5*sum F*(Wq-W)^2 for RTN",
        "allocation": {"strategy": allocation.strategy, **allocation.details},
        "avg_bits": summary["avg_bits"],
        "bytes_after": summary["bytes_after"],
        "analysis_base_loss": analysis.base_loss,
        "predicted_loss_increase": allocation.predicted_loss,
        "layers": layers,
    }
    if measured is not None:
        out["base_loss"] = base  # the float model on the same batches as measured_loss
        out["measured_loss"] = measured
        out["measured_loss_increase"] = measured - base
    if alone:
        out["predicted_vs_measured_spearman"] = _spearman([layers[n]["predicted_loss"] for n in alone], list(alone.values()))
    return out


def _spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = torch.tensor(a).argsort().argsort().float(), torch.tensor(b).argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den else None


def quantize_auto(model: str, target: str | None = None, budget: str | None = None, calib: str | None = None,
                  samples: int | None = None, seq_len: int | None = None, bits: str | Iterable[int] | None = None,
                  options: MixedOptions | None = None, progress=None) -> QuantizedModel:
    """What `edgeq quantize MODEL --recipe auto` runs: load, calibrate, `auto_quantize`."""
    from ..models import load_model
    from ..models.inputs import calibration_batches

    if not budget:
        raise EdgeqError("--recipe auto needs --budget: a size (60MB), an average bit-width (4.5bits) or a share of fp32 (25%)")
    parsed = parse_budget(budget)  # fail fast, before loading the model
    allowed = parse_bits(bits)
    options = options or MixedOptions()
    _, info = allowed_bit_specs(target, allowed, options)  # a bad --target / --bits fails before the model loads
    if info.get("format") == "tflite" and options.embedding_bits not in (None, 4, 8):
        raise EdgeqError(f"--embedding-bits {options.embedding_bits}: {info['runtime']} holds 4- or 8-bit embedding tables")
    bundle = load_model(model)
    # batch size 1: the Fisher pass keeps every layer's input for one batch in memory
    batches = calibration_batches(bundle, calib, samples or 8, seq_len or 512, batch_size=1)
    return auto_quantize(bundle, target, parsed, batches, allowed, options, progress=progress)
