"""Mixed precision (`--recipe auto`): budget parsing, the allocator, byte accounting and a seeded toy model."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError
from edgeq.models import ModelBundle
from edgeq.quantize.allocate import Choice, LayerOptions, allocate, closed_form_bits
from edgeq.quantize.budget import parse_budget
from edgeq.quantize.mixed import MixedOptions, allowed_bit_specs, auto_quantize, spec_bytes
from edgeq.quantize.ptq import quantize_model
from edgeq.recipe import QuantRecipe, load_recipe

# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("text, kind, value", [
    ("60MB", "bytes", 60e6), ("60 MiB", "bytes", 60 * 2**20), ("512kB", "bytes", 512e3), ("123456B", "bytes", 123456),
    ("4.5bits", "bits", 4.5), ("3bit", "bits", 3.0), ("25%", "percent", 25.0), ("12.5 %", "percent", 12.5),
])
def test_parse_budget_forms(text, kind, value):
    b = parse_budget(text)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("text, needle", [
    ("", "is not a size"), ("lots", "is not a size"), ("60", "has no unit"), ("60XB", "unit 'XB'"),
    ("0%", "share in (0%, 100%]"), ("150%", "share in (0%, 100%]"), ("0.5bits", "[1, 16] bits"), ("0MB", "positive size"),
    ("-3MB", "is not a size"),
])
def test_parse_budget_errors_are_one_line(text, needle):
    with pytest.raises(EdgeqError) as exc:
        parse_budget(text)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("--budget:") and needle in msg


def test_auto_is_not_a_file_recipe():
    with pytest.raises(EdgeqError, match="computed per model"):
        load_recipe("auto")


# ---------------------------------------------------------------- allocator


def _layers(seed: int, n: int = 6, bits=(2, 3, 4, 8)) -> list[LayerOptions]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        params = rng.choice([1024, 4096, 16384])
        s = 10 ** rng.uniform(-3, 1)
        choices = [Choice(b, params * b // 8 + params // 32 * 4, s * params * 2.0 ** (-2 * b)) for b in bits]
        out.append(LayerOptions(f"l{i}", params, s, choices))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_allocator_respects_budget_and_bit_set(seed):
    layers = _layers(seed)
    lo = sum(c.bytes for layer in layers for c in layer.choices if c.bits == 2)
    hi = sum(c.bytes for layer in layers for c in layer.choices if c.bits == 8)
    budget = 100 + lo + (hi - lo) * random.Random(seed).uniform(0.05, 0.9)
    alloc = allocate(layers, 100, budget)
    assert alloc.total_bytes <= budget
    assert alloc.total_bytes == 100 + sum(c.bytes for c in alloc.picks.values())
    assert all(c.bits in (2, 3, 4, 8) for c in alloc.picks.values())
    # exhaustive optimum over 4^6 plans: the heuristic is within 10% of it and beats the best uniform plan
    best = min(sum(c.loss for c in combo) for combo in itertools.product(*(layer.choices for layer in layers))
               if 100 + sum(c.bytes for c in combo) <= budget)
    assert alloc.predicted_loss <= best * 1.10 + 1e-12
    uniform = [sum(c.loss for layer in layers for c in layer.choices if c.bits == b) for b in (2, 3, 4, 8)
               if 100 + sum(c.bytes for layer in layers for c in layer.choices if c.bits == b) <= budget]
    assert alloc.predicted_loss <= min(uniform) + 1e-12


def test_allocator_rejects_a_budget_below_the_smallest_plan():
    layers = _layers(0)
    lo = sum(c.bytes for layer in layers for c in layer.choices if c.bits == 2)
    with pytest.raises(EdgeqError, match="too small"):
        allocate(layers, 100, 100 + lo - 1)


def test_forced_layers_keep_their_largest_choice():
    layers = _layers(1)
    layers[0].fixed = True
    lo = sum(c.bytes for layer in layers for c in layer.choices if c.bits == 2)
    alloc = allocate(layers, 0, lo + layers[0].choices[-1].bytes)
    assert alloc.picks["l0"].bits == 8


def test_closed_form_follows_importance_and_keeps_the_average():
    layers = _layers(2)
    cf = closed_form_bits(layers, 4.0, 2, 8)
    total = sum(layer.params for layer in layers)
    assert sum(layer.params * cf[layer.name] for layer in layers) / total == pytest.approx(4.0, abs=1e-6)
    by_importance = sorted(layers, key=lambda layer: layer.importance)
    assert [cf[layer.name] for layer in by_importance] == sorted(cf[layer.name] for layer in by_importance)


# ---------------------------------------------------------------- the toy model


class Toy(torch.nn.Module):
    """A residual MLP whose `sens` branch is amplified 20x: errors in it dominate the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.sens = (torch.nn.Linear(128, 128) for _ in range(4))

    def forward(self, x):
        h = x + torch.relu(self.a(x))
        h = h + torch.relu(self.b(h))
        h = h + torch.relu(self.c(h))
        return h + 20.0 * self.sens(x)


def _toy() -> ModelBundle:
    torch.manual_seed(0)
    model = Toy().eval()
    return ModelBundle(model, "generic", "toy", example_inputs=(torch.randn(2, 128),))


def _batches(seed: int, n: int = 4) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 128, generator=g),) for _ in range(n)]


def _output_mse(qmodel, reference, batches) -> float:
    with torch.no_grad():
        return sum(float((qmodel(*b) - reference(*b)).pow(2).mean()) for b in batches) / len(batches)


def _uniform(bits: int, group: int) -> QuantRecipe:
    return QuantRecipe.from_dict({"name": f"w{bits}", "rules": [
        {"match": ".*", "weight": {"bits": bits, "granularity": "group", "group_size": group}}]})


def test_mixed_beats_uniform_at_equal_size_on_the_toy_model(tmp_path):
    reference = _toy().module
    held_out = _batches(99)
    uniform = quantize_model(_toy(), _uniform(4, 32))
    u_sum = uniform.summary()
    u_mse = _output_mse(uniform.model, reference, held_out)

    opts = MixedOptions(group_size=32, measure="layers")
    mixed = auto_quantize(_toy(), None, f"{u_sum['bytes_after']}B", _batches(1), allowed_bits=[2, 3, 4, 8], options=opts)
    m_sum = mixed.summary()
    m_mse = _output_mse(mixed.model, reference, held_out)

    assert m_sum["bytes_after"] <= u_sum["bytes_after"]
    bits = {layer["name"]: layer["weight"]["bits"] for layer in m_sum["layers"]}
    assert set(bits.values()) <= {2, 3, 4, 8}
    assert bits["sens"] == 8 and max(bits[n] for n in "abc") < 4
    assert m_mse < 0.5 * u_mse, (m_mse, u_mse)
    rec = m_sum["mixed"]
    assert rec["layers"]["sens"]["sensitivity"] > 10 * max(rec["layers"][n]["sensitivity"] for n in "abc")
    for entry in rec["layers"].values():
        assert {"bits", "sensitivity", "variance", "predicted_loss", "measured_loss", "input_kurtosis"} <= set(entry)
    # the Fisher prediction tracks the measured single-layer loss on this model
    assert rec["predicted_vs_measured_spearman"] > 0.5
    assert rec["measured_loss_increase"] == pytest.approx(_output_mse(mixed.model, reference, _batches(1)), rel=1e-4)

    # the directory round-trips with the mixed record in quant.json and the same integers
    out = mixed.save(tmp_path / "q")
    data = json.loads((out / "quant.json").read_text())
    assert data["avg_bits"] == m_sum["avg_bits"] and data["mixed"]["layers"]["sens"]["bits"] == 8


def test_budget_in_bits_matches_quant_json_avg_bits():
    qm = auto_quantize(_toy(), None, "3.2bits", _batches(1), allowed_bits=[2, 3, 4, 8],
                       options=MixedOptions(group_size=32, measure="none"))
    s = qm.summary()
    assert s["avg_bits"] <= 3.2
    assert s["mixed"]["bytes_after"] == s["bytes_after"]
    assert "measured_loss" not in s["mixed"]


def test_spec_bytes_is_quant_json_accounting():
    qm = auto_quantize(_toy(), None, "5bits", _batches(1), allowed_bits=[3, 5, 8],
                       options=MixedOptions(group_size=32, symmetric=False, measure="none"))
    s = qm.summary()
    for layer in s["layers"]:
        from edgeq.recipe import WeightSpec

        assert spec_bytes(tuple(layer["shape"]), WeightSpec(**layer["weight"])) == layer["bytes_quant"]
    assert {layer["weight"]["symmetric"] for layer in s["layers"] if layer["weight"]["bits"] < 8} <= {False}


def test_outlier_inputs_force_eight_bits():
    bundle = _toy()
    outliers = torch.where(torch.rand(128, generator=torch.Generator().manual_seed(0)) < 0.02, 50.0, 1.0)
    batches = [(b[0] * outliers,) for b in _batches(1)]
    # a and sens read the outlier input directly; the residual stream dilutes it for b and c
    qm = auto_quantize(bundle, None, "6.5bits", batches, allowed_bits=[2, 3, 8],
                       options=MixedOptions(group_size=32, outlier_kurtosis=170.0, measure="none"))
    rec = qm.summary()["mixed"]["layers"]
    assert rec["a"]["input_kurtosis"] > 170 > rec["b"]["input_kurtosis"]
    for entry in rec.values():
        assert entry["forced_8bit"] == (entry["input_kurtosis"] > 170.0)
        assert entry["bits"] == 8 or not entry["forced_8bit"]
    assert any(e["forced_8bit"] for e in rec.values())


def test_no_target_and_no_bits_is_a_user_error():
    with pytest.raises(EdgeqError, match="--target NAME or an explicit --bits"):
        auto_quantize(_toy(), None, "4bits", _batches(1))
    with pytest.raises(EdgeqError, match="--bits: 7"):
        allowed_bit_specs(None, [4, 7], MixedOptions())
    with pytest.raises(EdgeqError, match="needs calibration data"):
        auto_quantize(_toy(), None, "4bits", [], allowed_bits=[4, 8])


def test_target_bits_come_from_the_profile_and_run_natively():
    from edgeq.targets import load_profile
    from edgeq.targets.plan import plan_uses
    from edgeq.targets.profile import KIND_OPS
    from edgeq.targets.uses import OpUse

    profile = load_profile("rpi5")
    for act in ("none", "dynamic"):
        opts = MixedOptions(activation=act, measure="none")
        native = set(profile.supported_weight_bits(acts=("fp32" if act == "none" else "dynamic",)))
        specs, info = allowed_bit_specs("rpi5", None, opts)
        assert set(specs) and set(specs) <= native and info["name"] == "rpi5"
        if not specs.keys() & {2, 3, 4, 8}:
            continue
    specs, _ = allowed_bit_specs("rpi5", None, MixedOptions(activation="dynamic"))
    qm = auto_quantize(_toy(), "rpi5", "90%", _batches(1), options=MixedOptions(activation="dynamic", measure="none"))
    rt = profile.runtime()
    for use in plan_uses(qm.summary(), rt.format):
        verdicts = {rt.classify(OpUse(op, use.act, use.weight, use.granularity, use.group_size)).support
                    for op in KIND_OPS[rt.format]["linear"]}
        assert "native" in verdicts, use


@pytest.mark.parametrize("board", ["rpi4", "rpi5", "arm64-generic"])
def test_onnx_dynamic_bits_are_judged_as_the_export_renders_them(board):
    """A per-token grid before 4-bit blocks is exported as float ops and a MatMulNBits at accuracy level 0 (CompFp32,
    native on ARMv8.0 too), not as the CompInt8 kernel of level 4: 4 bits are allowed on every board, and every
    allowed format passes the export's gate as the recipe build_recipe writes."""
    from edgeq.targets import gate_export

    specs, info = allowed_bit_specs(board, None, MixedOptions(activation="dynamic", runtime="onnxruntime-cpu", measure="none"))
    assert 4 in specs and info["runtime"] == "onnxruntime-cpu"
    layers = [{"name": f"w{bits}", "kind": "linear", "weight": dict(spec.__dict__),
               "activation": {"mode": "dynamic", "granularity": "token"}} for bits, spec in specs.items()]
    assert gate_export({"layers": layers}, board, fmt="onnx").status == "native"


def test_a_tflite_runtime_plan_holds_litert_grids():
    """`--recipe auto --target rpi5 --runtime litert-xnnpack`: LiteRT's INT4 and INT8 kernels quantize activations per
    row at run time, so the plan's layers take that grid (asymmetric int8 per token) by default, and its INT4 blocks
    bf16-exact scales: every variant's grids are representable in TFLite (before, the CLI could only plan for the
    profile's first runtime, ONNX Runtime, and that plan could not be exported to TFLite)."""
    from edgeq.export.tflite_grids import representability

    opts = MixedOptions(activation=None, runtime="litert-xnnpack", measure="none")
    specs, info = allowed_bit_specs("rpi5", None, opts)
    assert set(specs) == {4, 8} and specs[4].scale_dtype == "bf16" and info["format"] == "tflite"
    qm = auto_quantize(_toy(), "rpi5", "6bits", _batches(1), options=opts)
    layers = qm.summary()["layers"]
    assert {e["weight"]["bits"] for e in layers} == {4, 8}
    for e in layers:
        assert {k: e["activation"][k] for k in ("mode", "bits", "granularity", "symmetric")} == \
            {"mode": "dynamic", "bits": 8, "granularity": "token", "symmetric": False}
    assert representability(qm)["variants"]["int4"]["representable"] is True
    from edgeq.export.tflite_grids import check_representable

    with pytest.raises(EdgeqError, match="needs 8-bit weights with static") as exc:
        check_representable(qm, "int8")  # full integer: refused, without pointing at the runtime it was planned for
    assert "--runtime litert-xnnpack" not in str(exc.value)
    from edgeq.quantize.mixed import quantize_auto

    with pytest.raises(EdgeqError, match="--embedding-bits 6: litert-xnnpack holds 4- or 8-bit embedding tables"):
        quantize_auto("no-such-model", target="rpi5", budget="5bits", options=replace(opts, embedding_bits=6))
    from edgeq.quantize.mixed import fit_blocks

    formats, own = fit_blocks(specs, {"a": 576, "b": 1536}, info)
    assert formats[4].group_size == 64 and own == {}  # SmolLM2: LiteRT has no short last block
    assert fit_blocks(specs, {"a": 128, "b": 512}, info) == (specs, {})
    onnx_plan = allowed_bit_specs("rpi5", None, MixedOptions(activation=None, measure="none"))
    assert onnx_plan[1]["runtime"] == "onnxruntime-cpu" and onnx_plan[1]["activation_grid"] == {"mode": "none"}
    with pytest.raises(EdgeqError, match="runs no signed Linear weight format natively with activations fp32 .*"
                                         "--activation dynamic, --runtime onnxruntime-cpu"):
        allowed_bit_specs("rpi5", None, MixedOptions(activation="none", runtime="litert-xnnpack"))


def test_a_tflite_plans_embedding_table_is_litert_s():
    """`--embedding-bits 4` on a TFLite runtime stores the table in blocks of 32 with bf16 scales, as the preset
    w4-g64-litert-emb4 does, and the tied head reads its input on LiteRT's per-row grid; the budget counts it so."""
    from edgeq.quantize.mixed import embedding_bytes, embedding_table

    tflite = {"format": "tflite"}
    assert embedding_table(4, tflite)["granularity"] == "group" and embedding_table(4, tflite)["group_size"] == 32
    assert embedding_table(8, tflite)["granularity"] == "channel"
    assert embedding_table(4, tflite)["head_activation"]["symmetric"] is False
    assert embedding_table(4, {"format": "onnx"}) == {"bits": 4, "symmetric": True, "granularity": "channel"}
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(1000, 64)
    assert embedding_bytes(model, None) == 1000 * 64 * 4
    assert embedding_bytes(model, embedding_table(8, tflite)) == 1000 * 64 + 1000 * 4
    assert embedding_bytes(model, embedding_table(4, tflite)) == 1000 * 32 + 1000 * 2 * 2  # two bf16 scales a row


def test_parse_bits():
    from edgeq.quantize.mixed import parse_bits

    assert parse_bits("8,2, 4,4") == [2, 4, 8] and parse_bits(None) is None
    for bad in ("4,x", "7", ""):
        with pytest.raises(EdgeqError, match="^--bits:"):
            parse_bits(bad)


@pytest.mark.slow
def test_quantize_auto_is_what_the_cli_calls(tmp_path):
    from edgeq.quantize.mixed import quantize_auto

    with pytest.raises(EdgeqError, match="needs --budget"):
        quantize_auto("tiny-llama", bits="4,8")
    with pytest.raises(EdgeqError, match="^--budget:"):
        quantize_auto("tiny-llama", budget="lots", bits="4,8")
    qm = quantize_auto("tiny-llama", budget="5bits", calib="enwiki", samples=2, seq_len=64, bits="2,4,8",
                       options=MixedOptions(group_size=32, measure="model"))
    s = qm.summary()
    assert s["avg_bits"] <= 5 and s["recipe"] == "auto"
    assert {layer["weight"]["bits"] for layer in s["layers"]} <= {2, 4, 8}
    assert s["mixed"]["measured_loss"] > 0 and s["mixed"]["base_loss"] > 0
    out = qm.save(tmp_path / "q")
    from edgeq.quantize.qmodel import load_quantized

    again = load_quantized(out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, qm.model(ids).logits)


def test_one_analysis_serves_many_budgets_and_bit_sets():
    from edgeq.quantize.mixed import analyze, plan

    opts = MixedOptions(group_size=32, measure="none")
    specs, _ = allowed_bit_specs(None, [2, 3, 4, 8], opts)
    analysis = analyze(_toy(), _batches(1), specs, opts)
    narrow = analysis.restrict([4, 8])
    assert set(narrow.specs) == {4, 8} and all(set(t) == {4, 8} for t in narrow.table.values())
    sizes = []
    for budget in ("3bits", "4.5bits", "6bits"):
        alloc = plan(analysis, budget)
        sizes.append(alloc.layer_bytes)
        qm = auto_quantize(_toy(), None, budget, _batches(1), options=opts, analysis=analysis)
        s = qm.summary()
        assert s["bytes_after"] == alloc.total_bytes and s["avg_bits"] <= float(budget[:-4])
    assert sizes == sorted(sizes)
    assert {c.bits for c in plan(narrow, "6bits").picks.values()} <= {4, 8}
    # measured on other batches than the analysis: the base loss is re-measured on those batches
    qm = auto_quantize(_toy(), None, "4bits", _batches(5), options=MixedOptions(group_size=32, measure="model"),
                       analysis=analysis)
    rec = qm.summary()["mixed"]
    assert rec["base_loss"] == 0.0  # the float model against its own outputs
    assert rec["measured_loss_increase"] == pytest.approx(_output_mse(qm.model, _toy().module, _batches(5)), rel=1e-4)
    with pytest.raises(EdgeqError, match="too small"):
        plan(narrow, "3bits")


def test_auto_with_an_integer_embedding_fits_a_share_budget(tmp_path):
    """--embedding-bits: the table is counted at its integer size, so a share-of-fp32 budget holds in quant.json."""
    from edgeq.quantize.mixed import quantize_auto

    qm = quantize_auto("tiny-llama", budget="25%", calib="enwiki", samples=2, seq_len=64, bits="2,4,8",
                       options=MixedOptions(group_size=32, measure="none", embedding_bits=8))
    s = qm.summary()
    emb = next(e for e in s["layers"] if e["kind"] == "embedding")
    assert emb["weight"]["bits"] == 8 and emb["bytes_quant"] == 256 * 128 + 256 * 4
    assert s["bytes_after"] <= 0.25 * s["bytes_before"] and qm.recipe.embedding.bits == 8
    with pytest.raises(EdgeqError, match="embedding-bits"):
        MixedOptions(embedding_bits=1)


def test_embedding_bits_needs_auto(tmp_path, capsys):
    from edgeq.cli.main import main

    out = tmp_path / "q"
    code = main(["quantize", "tiny-llama", "--recipe", "w8", "--embedding-bits", "8", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--embedding-bits is for --recipe auto" in err and not out.exists()


def test_auto_folds_norm_gains_only_when_every_format_is_8_bit(tmp_path):
    """A gain folded into 4-bit groups widens each group's range (the INT4 presets keep gains unfolded; on SmolLM2
    a folded 80 MB TFLite plan gave ppl 29.79 against 26.68 unfolded). recipe.toml says which, and how it was
    calibrated, so that re-running it reproduces the directory."""
    from edgeq.models import load_model
    from edgeq.quantize.mixed import quantize_auto
    from edgeq.quantize.qmodel import load_quantized

    gains = {n: p.detach().clone() for n, p in load_model("tiny-llama").module.named_parameters() if "norm" in n}
    assert all(not torch.equal(g, torch.ones_like(g)) for g in gains.values())
    for bits, folded in (("4,8", False), ("8", True)):
        qm = quantize_auto("tiny-llama", budget="60%", calib="enwiki", samples=3, seq_len=32, bits=bits,
                           options=MixedOptions(group_size=32, measure="none"))
        assert qm.recipe.fold_norms is folded
        params = dict(qm.model.named_parameters())
        unchanged = [n for n, g in gains.items() if "layers" in n and torch.equal(params[n], g)]
        assert len(unchanged) == (0 if folded else sum("layers" in n for n in gains))
        out = qm.save(tmp_path / bits)
        again = load_recipe(str(out / "recipe.toml"))
        assert again.fold_norms is folded
        assert (again.calibration.samples, again.calibration.seq_len) == (3, 32)
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            assert torch.equal(load_quantized(out).model(ids).logits, qm.model(ids).logits)
    forced = quantize_auto("tiny-llama", budget="60%", calib="enwiki", samples=2, seq_len=32, bits="4,8",
                           options=MixedOptions(group_size=32, measure="none", fold_norms=True))
    assert forced.recipe.fold_norms is True


def test_a_mixed_plan_measured_worse_than_the_uniform_one_is_not_kept():
    """The allocator trusts predicted losses; both it and the uniform plan of the same budget are measured and the
    lower kept. With the analysis' predictions turned upside down (the sensitive layer looks the safest to cut) the
    mixed plan measures worse and the uniform one is kept; with the true ones the mixed plan is."""
    from edgeq.quantize.mixed import analyze

    opts = MixedOptions(group_size=32, measure="model")
    specs, _ = allowed_bit_specs(None, [2, 3, 4, 8], opts)
    true = analyze(_toy(), _batches(1), specs, opts)
    upside_down = replace(true, table={n: {b: 1.0 / max(v, 1e-12) for b, v in t.items()} for n, t in true.table.items()},
                          layers={n: replace(s, fisher=1.0 / s.fisher.clamp_min(1e-12)) for n, s in true.layers.items()})
    for analysis, uniform_kept in ((true, False), (upside_down, True)):
        qm = auto_quantize(_toy(), None, "4.3bits", _batches(1), options=opts, analysis=analysis)
        s = qm.summary()
        m, other = s["mixed"], s["mixed"]["measured_alternative"]
        assert m["allocation"]["strategy"].startswith("uniform") is uniform_kept
        assert other["strategy"].startswith("uniform") is not uniform_kept
        assert m["measured_loss"] < other["measured_loss"] and s["avg_bits"] <= 4.3
        bits = {layer["weight"]["bits"] for layer in s["layers"]}
        assert (len(bits) == 1) is uniform_kept
        assert m["measured_loss_increase"] == pytest.approx(_output_mse(qm.model, _toy().module, _batches(1)), rel=1e-4)
    none = auto_quantize(_toy(), None, "4.3bits", _batches(1), options=replace(opts, measure="none"), analysis=true)
    assert "measured_alternative" not in none.summary()["mixed"]


def test_cli_says_which_measured_plan_it_kept(tmp_path, capsys):
    from edgeq.cli.main import main

    out = tmp_path / "q"
    assert main(["quantize", "tiny-llama", "--recipe", "auto", "--bits", "2,3,4,8", "--budget", "4.3bits", "--calib", "enwiki",
                 "--samples", "2", "--seq-len", "32", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    mixed = json.loads((out / "quant.json").read_text())["mixed"]
    kept, other = mixed["allocation"]["strategy"], mixed["measured_alternative"]["strategy"]
    assert f"kept the {kept} plan" in err and f"over the {other} one" in err and "uniform" in kept + other


def _images(tmp_path, n: int = 8):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32))
    return str(tmp_path / "x.npy")


def test_convolutions_stay_float_where_the_runtime_runs_none(tmp_path, capsys):
    """On the target's default runtime with its default weight-only plan (ONNX Runtime runs a Conv on integer kernels
    only with static activations) the convolutions stay float: the CLI says so and why, and a budget they alone exceed
    is refused saying so (EfficientNet's "too small" named no cause)."""
    from edgeq.cli.main import main

    common = ["quantize", "factories:small_cnn", "--recipe", "auto", "--target", "rpi5", "--calib", _images(tmp_path)]
    assert main([*common, "--budget", "6bits", "-o", str(tmp_path / "q")]) == 0
    convs = 3 * 8 * 9 + 8 * 16 * 9  # conv1 and conv2 weights
    left = json.loads((tmp_path / "q" / "quant.json").read_text())["mixed"]["convolutions_left_float"]
    assert left["count"] == 2 and left["bytes"] == 4 * convs
    assert "onnxruntime-cpu runs no 8-bit per-channel convolution natively with activations fp32" in left["why"]
    err = capsys.readouterr().err
    assert "edgeq: note: --recipe auto: 2 convolutions (5.47 kB) stay float whatever the budget: onnxruntime-cpu" in err
    assert "--allow-fallback" in err
    assert main([*common, "--budget", "10%", "-o", str(tmp_path / "small")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeq: error: --budget: too small")
    assert f"2 convolutions that no plan quantizes hold {4 * convs:,} bytes" in err
    assert not (tmp_path / "small").exists()


def test_auto_plans_plain_convolutions_at_8_bits_or_float(tmp_path, capsys):
    """On a TFLite runtime a plain convolution is a candidate at 8 bits per channel or float, after its BatchNorm is
    folded in; the depthwise one stays float (XNNPACK has no dynamic depthwise kernel). The QDIR records the folds the
    analysis made, so it loads computing bitwise what was quantized, and its TFLite file holds edgeq's integers."""
    from edgeq.cli.main import main
    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.quantize.qmodel import load_quantized

    x = torch.from_numpy(np.load(_images(tmp_path)))
    # measure="none": the allocator's plan, not the measured check's choice
    options = MixedOptions(runtime="litert-xnnpack", activation=None, measure="none")
    floats = []
    for budget in ("30%", "40%", "80%"):  # every candidate convolution float: 81% of fp32
        qm = auto_quantize(load_model("factories:batchnorm_cnn"), "rpi5", budget, [(x[i : i + 1],) for i in range(8)],
                           options=options)
        out = tmp_path / budget.rstrip("%")
        qm.save(out)
        q = json.loads((out / "quant.json").read_text())
        m = q["mixed"]
        assert q["folded_batchnorms"] == {"stem": "stem_bn", "dw": "dw_bn", "pw": "pw_bn", "head": "head_bn"}
        assert set(m["layers"]) == {"stem", "pw", "head", "fc"} and m["conv_formats"] == {"8": "w8s-c"}
        assert m["convolutions_left_float"]["count"] == 1 and "depthwise" in m["convolutions_left_float"]["why"]
        assert q["bytes_after"] == m["planned_bytes"] <= m["budget_max_bytes"]  # the folded norms' tensors are gone
        plan = {n: e["bits"] for n, e in m["layers"].items()}
        assert {b for n, b in plan.items() if n != "fc"} <= {8, 32}
        assert sorted(n for n, b in plan.items() if b == 32) == m["convolutions_kept_float"]
        assert {e["name"] for e in q["layers"]} == {n for n, b in plan.items() if b != 32}
        floats.append(len(m["convolutions_kept_float"]))
        with torch.no_grad():
            assert torch.equal(load_quantized(out).model(x), qm.model(x))  # a fold not made again would differ
    assert floats == [0, 1, 2]  # more budget, more float convolutions
    with torch.no_grad():
        ref = load_model("factories:batchnorm_cnn").module(x)
        assert torch.nn.functional.cosine_similarity(load_quantized(tmp_path / "40").model(x), ref).min() > 0.99
    meta = export(tmp_path / "40", "tflite", tmp_path / "m.tflite")
    assert meta["exact"] is True and meta["parity"]["within_tolerance"] is True

    assert main(["quantize", "factories:batchnorm_cnn", "--recipe", "auto", "--target", "rpi5", "--runtime", "litert-xnnpack",
                 "--calib", str(tmp_path / "x.npy"), "--budget", "40%", "-o", str(tmp_path / "cli")]) == 0
    err = capsys.readouterr().err
    assert ("edgeq: note: --recipe auto: 1 convolution (576 B) stays float whatever the budget: XNNPACK has no "
            "dynamically quantized depthwise kernel") in err
    m = json.loads((tmp_path / "cli" / "quant.json").read_text())["mixed"]
    kept = m["convolutions_kept_float"]
    assert kept == sorted(n for n, e in m["layers"].items() if e["bits"] == 32)
    assert (f"the plan keeps {len(kept)} convolution" in err) is bool(kept)
    assert main(["inspect", str(tmp_path / "cli")]) == 0
    assert f"float: {len(kept)} convolution" in capsys.readouterr().out  # the table lists quantized layers only


def test_a_convolution_s_fisher_predicts_its_measured_loss():
    """A convolution's Fisher is its weight's squared gradient per batch (its per-position gradients are not at hand):
    quantizing each convolution alone to 8 bits raises the loss by what it predicts, within a factor of 2 here
    (EfficientNet-Lite0's 33 plain convolutions: median ratio 1.03, Spearman 0.91 on 8 images)."""
    from edgeq.models import load_model
    from edgeq.quantize.mixed import analyze
    from edgeq.quantize.mixed_formats import conv_bit_specs
    from edgeq.quantize.sensitivity import Objective, mean_loss, measure_layers

    bundle = load_model("factories:batchnorm_cnn")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(1, 3, 16, 16, generator=g),) for _ in range(8)]
    opts = MixedOptions(activation="none")
    specs, info = allowed_bit_specs(None, [4, 8], opts)
    conv_specs, why = conv_bit_specs(info, opts, [4, 8])
    assert why is None
    analysis = analyze(bundle, batches, specs, opts, conv_specs=conv_specs)
    convs = [n for n in analysis.layers if analysis.is_conv(n)]
    assert convs == ["stem", "pw", "head"] and all(analysis.table[n][32] == 0.0 for n in convs)
    objective = Objective(False)
    measured = measure_layers(bundle.module, {n: conv_specs[8] for n in convs}, batches, objective,
                              mean_loss(bundle.module, batches, objective))
    for n in convs:
        assert 0.5 < analysis.table[n][8] / measured[n] < 2.0, n


def test_measuring_each_layer_alone_skips_the_convolutions_kept_float(tmp_path):
    from edgeq.models import load_model

    x = torch.from_numpy(np.load(_images(tmp_path)))
    qm = auto_quantize(load_model("factories:batchnorm_cnn"), "rpi5", "40%", [(x[i : i + 1],) for i in range(8)],
                       options=MixedOptions(runtime="litert-xnnpack", activation=None, measure="layers"))
    layers = qm.extra["mixed"]["layers"]
    kept = {n for n, e in layers.items() if e["bits"] == 32}
    assert kept and all(("measured_loss" in e) is (n not in kept) for n, e in layers.items())


@pytest.mark.parametrize("runtime, fmt", [("litert-xnnpack", "tflite"), ("onnxruntime-cpu", "onnx")])
def test_static_activations_plan_a_full_integer_cnn_with_its_depthwise_convolutions(tmp_path, runtime, fmt):
    """With `--activation static` every layer takes the w8a8-static grid and depthwise convolutions are candidates too
    (XNNPACK and ONNX Runtime run them on int8 kernels): the file is full integer and holds edgeq's grids. ONNX
    Runtime, which runs no weight-only convolution natively, gets its convolutions planned this way."""
    from edgeq.export import export
    from edgeq.models import load_model

    x = torch.from_numpy(np.load(_images(tmp_path)))
    batches = [(x[i : i + 1],) for i in range(8)]
    options = MixedOptions(runtime=runtime, activation="static", measure="none")
    qm = auto_quantize(load_model("factories:batchnorm_cnn"), "rpi5", "45%", batches, options=options)
    m = qm.extra["mixed"]
    assert set(m["layers"]) == {"stem", "dw", "pw", "head", "fc"} and m["convolutions_left_float"]["count"] == 0
    assert m["convolutions_kept_float"]  # the budget leaves room for some
    assert qm.summary()["bytes_after"] == m["planned_bytes"]  # static grids' scales and zero points counted
    assert {d.activation.mode for d in (layer.decision for layer in qm.layers().values())} == {"static"}
    qm.save(tmp_path / "q")
    meta = export(tmp_path / "q", fmt, tmp_path / f"m.{fmt}")
    assert meta["variant"] == "int8" and meta["exact"] is True and meta["parity"]["cos_min"] > 0.99

    gptq = auto_quantize(load_model("factories:batchnorm_cnn"), "rpi5", "45%", batches,
                         options=replace(options, method="gptq"))
    left = gptq.extra["mixed"]["convolutions_left_float"]
    assert left["count"] == 1 and left["why"] == "gptq takes no depthwise convolution (--method rtn does)"


def test_layers_no_common_block_fits_take_their_own_litert_format(tmp_path):
    """On a TFLite runtime a layer whose input width the plan's INT4 block does not divide (LiteRT has no short last
    block) takes the largest block that divides it, else INT4 per row, which LiteRT runs too; before, the whole plan
    was refused when no block size divided every width (ConvNeXt, Swin, MobileViT and LeViT in
    benchmarks/vision_families.md). The file holds every layer's integers as planned."""
    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.quantize.mixed_formats import fit_blocks

    opts = MixedOptions(runtime="litert-xnnpack", activation=None, measure="none")
    specs, info = allowed_bit_specs("rpi5", None, opts)
    formats, own = fit_blocks(specs, {"a": 576, "b": 100, "c": 96, "d": 160}, info)
    assert formats[4].group_size == 32 and formats[8] == specs[8]  # 32 divides the most widths (576, 96, 160)
    assert own == {"b": {4: replace(specs[4], granularity="channel", group_size=None, scale_dtype="fp32")}}

    x = torch.from_numpy(np.load(_images(tmp_path)))
    qm = auto_quantize(load_model("factories:odd_width_cnn"), "rpi5", "50%", [(x[i : i + 1],) for i in range(8)],
                       allowed_bits=[4], options=opts)  # every Linear at 4 bits
    m = qm.extra["mixed"]
    assert m["layer_formats"] == {"fc1": {"4": "w4s-c"}, "fc3": {"4": "w4s-c"}}
    layers = {e["name"]: e["weight"] for e in qm.summary()["layers"]}
    assert {n: (w["bits"], w["granularity"], w["group_size"]) for n, w in layers.items() if n.startswith("fc")} == {
        "fc1": (4, "channel", None), "fc2": (4, "group", 32), "fc3": (4, "channel", None)}
    qm.save(tmp_path / "q")
    meta = export(tmp_path / "q", "tflite", tmp_path / "m.tflite")
    assert meta["variant"] == "int4" and meta["exact"] is True


def test_bits_without_8_leave_convolutions_float():
    opts = MixedOptions()
    from edgeq.quantize.mixed_formats import conv_bit_specs

    _, info = allowed_bit_specs(None, [2, 4], opts)
    specs, why = conv_bit_specs(info, opts, [2, 4])
    assert specs == {} and why.startswith("--bits has no 8")
    litert = replace(opts, runtime="litert-xnnpack", activation=None)
    _, info = allowed_bit_specs("rpi5", None, litert)
    specs, why = conv_bit_specs(info, litert)
    assert set(specs) == {8} and specs[8].granularity == "channel" and why is None
