"""Check: small random decoders of several Hugging Face families through quantize and both exporters. Not a test.

    .venv/bin/python tools/check_decoder_families.py --out benchmarks/decoder_families

Each family is a two-layer decoder of width 64 with random weights (its norm gains drawn away from their initial
values, so a norm applied in the wrong form shows) and MiniLM's tokenizer, saved as a local Hugging Face directory
and loaded the way users' directories are. Each is quantized with every --recipe and exported to TFLite (its default
variant, with a decode signature where edgeq renders one) and to ONNX. Reported per export: the variant, `exact`,
the layers read back out of the quantized ones (TFLite), parity against the simulation (and the TFLite decode
step's; for ONNX, its decode graph against its prefill graph), and any error. Also: the simulation against the float model (cosine of the logits, top-1 agreement), which
parity cannot see. Writes OUT.json and OUT.md (command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from hostinfo import machine, write_result  # noqa: E402

WIDTH = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)


def configs(vocab: int, pad: int) -> dict:
    import transformers as t

    common = dict(vocab_size=vocab, **WIDTH)
    return {
        "llama": lambda: t.LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2),
        "qwen2": lambda: t.Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2),
        "qwen3": lambda: t.Qwen3Config(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        # every layer sliding, as Mistral 7B v0.1's (window 4096): past the window of 16 in the checks' 64 tokens
        "mistral": lambda: t.MistralConfig(**common, intermediate_size=128, num_key_value_heads=2, sliding_window=16),
        "gemma": lambda: t.GemmaConfig(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "phi": lambda: t.PhiConfig(**common, intermediate_size=128),
        "gpt_neox": lambda: t.GPTNeoXConfig(**common, intermediate_size=128),
        "falcon": lambda: t.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
        "opt": lambda: t.OPTConfig(**common, ffn_dim=128, word_embed_proj_dim=64, pad_token_id=pad),
        "gpt2": lambda: t.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256),
        # edge models of 2025-26: Gemma 2 / 3 (sandwich norms, soft-capping, sliding layers), Phi-3 (fused
        # projections), SmolLM3 (layers without rotary embedding), Granite (multipliers), OLMo 2 (post-norms)
        "gemma2": lambda: t.Gemma2Config(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                         sliding_window=16, query_pre_attn_scalar=16),
        "gemma3_text": lambda: t.Gemma3TextConfig(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                                  sliding_window=16, query_pre_attn_scalar=16,
                                                  layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: t.Phi3Config(**common, intermediate_size=128, num_key_value_heads=2, pad_token_id=pad),
        "smollm3": lambda: t.SmolLM3Config(**common, intermediate_size=128, num_key_value_heads=2, no_rope_layer_interval=2,
                                           pad_token_id=pad),
        "granite": lambda: t.GraniteConfig(**common, intermediate_size=128, num_key_value_heads=2, embedding_multiplier=12.0,
                                           logits_scaling=8.0, residual_multiplier=0.22, attention_multiplier=0.0625),
        "olmo2": lambda: t.Olmo2Config(**common, intermediate_size=128, num_key_value_heads=2),
    }


def make(family: str, make_config, tokenizer, path: Path, auto: str = "AutoModelForCausalLM") -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, auto).from_config(make_config())
    gains = (-0.5, 0.5) if family.startswith("gemma") else (0.5, 1.5)  # Gemma's gain is 1 + weight
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if "Norm" in type(m).__name__ and isinstance(w, torch.Tensor):
                w.uniform_(*gains)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / CONFIG_MARK).write_text(make_config().to_json_string(), encoding="utf-8")


CONFIG_MARK = "check-config.json"  # the config a model dir of --work was made from


def stale(path: Path, make_config) -> bool:
    """Whether --work lacks the model or holds one made from another config (the check edited since)."""
    mark = path / CONFIG_MARK
    return not mark.is_file() or mark.read_text(encoding="utf-8") != make_config().to_json_string()


def discard(work: Path, family: str) -> None:
    """A family's model in --work and what was made from it (made again when the check's config changed)."""
    for old in [work / family, *work.glob(f"{family}-*")]:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink(missing_ok=True)


def float_agreement(model_dir: Path, qdir: Path) -> dict:
    import torch

    from edgeq.models import load_model
    from edgeq.quantize.qmodel import load_quantized

    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))

    def output(model) -> torch.Tensor:  # logits, or an encoder's last hidden state; float64: a float32 cosine can exceed 1
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).double()

    quantized = load_quantized(qdir)
    with torch.no_grad():
        a, b = output(load_model(str(model_dir)).module), output(quantized.model)
    lm = quantized.bundle.kind == "causal-lm"
    return {"cos": round(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)), 5),
            "top1_agree": round(float((a.argmax(-1) == b.argmax(-1)).float().mean()), 4) if lm else None}


def check(model_dir: Path, recipe: str, work: Path) -> dict:
    from edgeq.export import export
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import load_recipe

    row: dict = {}
    qdir = work / f"{model_dir.name}-{recipe.replace(':', '-').replace('%', 'pc')}"
    try:
        if recipe.startswith("auto:"):  # auto:BUDGET:ACTIVATION, `--recipe auto` for rpi5's LiteRT runtime
            from edgeq.quantize.mixed import MixedOptions, auto_quantize

            _, budget, activation = recipe.split(":")
            bundle = load_model(str(model_dir))
            row["kind"] = bundle.kind
            options = MixedOptions(runtime="litert-xnnpack", activation=activation)
            batches = calibration_batches(bundle, None, 4, 64, batch_size=1)
            qm = auto_quantize(bundle, "rpi5", budget, batches, options=options)
            qm.save(qdir, overwrite=True)
            row["convolutions_kept_float"] = len(qm.extra["mixed"]["convolutions_kept_float"])
        else:
            bundle, r = load_model(str(model_dir)), load_recipe(recipe)
            row["kind"] = bundle.kind
            # a QDIR of an earlier run is reused only if made with the recipe as it is now (a preset may have changed)
            if not qdir.exists() or load_recipe(qdir / "recipe.toml").to_dict() != r.to_dict():
                batches = calibration_batches(bundle, None, 4, 64) if r.needs_calibration else None
                quantize_model(bundle, r, batches).save(qdir, overwrite=True)
    except Exception as exc:  # a finding, not a crash of the check
        row["error"] = f"quantize: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return row
    row["quantized_layers"] = len(json.loads((qdir / "quant.json").read_text())["layers"])
    row["simulation_vs_float"] = float_agreement(model_dir, qdir)
    for fmt in ("tflite", "onnx"):
        out = work / f"{model_dir.name}-{recipe}.{fmt}"
        out.unlink(missing_ok=True)  # a work file of an earlier run
        try:
            meta = export(qdir, fmt, out)
        except Exception as exc:
            row[fmt] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        parity = meta.get("parity") or {}
        entry = {"variant": meta["variant"], "exact": meta["exact"],
                 "parity": {k: parity.get(k) for k in ("cos_min", "top1_agree", "within_tolerance") if k in parity}}
        if fmt == "onnx":
            entry["decode_vs_prefill_max_abs"] = parity.get("decode_vs_prefill_max_abs")
        if fmt == "tflite":
            entry["layers_read_back"] = (meta.get("readback") or {}).get("layers")
            entry["layers_not_in_file"] = (meta.get("layers_not_in_file") or {}).get("layers")
            entry["decode_cos_min"] = (parity.get("decode") or {}).get("cos_min")
            entry["decode_note"] = (meta.get("graph") or {}).get("decode_note")
        row[fmt] = entry
    return row


def check_families(makers: dict, make_one, families: list[str] | None, recipes: list[str], work: Path) -> dict:
    """The check's rows: each family's model made in `work` by `make_one(family, path)` (again when its config has
    changed), then `check` with each recipe. A family transformers cannot build gets rows saying so."""
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for family in families or list(makers):
        model_dir = work / family
        if stale(model_dir, makers[family]):
            discard(work, family)
            try:
                make_one(family, model_dir)
            except Exception as exc:  # a finding, not a crash of the check
                rows.update({f"{family} {r}": {"error": f"make: {type(exc).__name__}: {exc}"} for r in recipes})
                shutil.rmtree(model_dir, ignore_errors=True)
                continue
        for recipe in recipes:
            print(f"{family} {recipe}", flush=True)
            rows[f"{family} {recipe}"] = check(model_dir, recipe, work)
    return rows


def main(tool: str = "check_decoder_families.py", make_configs=configs, auto: str = "AutoModelForCausalLM",
         kind: str = "decoders") -> None:
    """The check's command line; tools/check_encoder_families.py runs it with its own families."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output stem: writes OUT.json and OUT.md")
    ap.add_argument("--work", default=f"/tmp/edgeq-check-{kind}")
    ap.add_argument("--families", nargs="+", default=None, help="default: all")
    ap.add_argument("--recipe", nargs="+", default=["w8", "w8a8-static", "w4-g64-litert"],
                    help="presets or recipe files; auto:BUDGET:ACTIVATION is --recipe auto for rpi5's LiteRT runtime")
    args = ap.parse_args()
    command = " ".join([f".venv/bin/python tools/{tool}"] + sys.argv[1:])
    from edgeq.models import load_model

    tokenizer = load_model("minilm-l6").tokenizer
    makers = make_configs(tokenizer.vocab_size, tokenizer.pad_token_id)
    rows = check_families(makers, lambda family, path: make(family, makers[family], tokenizer, path, auto),
                          args.families, args.recipe, Path(args.work))
    import transformers

    result = {"command": command, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
              "transformers": transformers.__version__, "width": WIDTH, "kind": kind, "rows": rows}
    write_result(args.out, result, markdown(result))


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return f"error: {entry['error'][:120]}"
    p = entry["parity"]
    text = f"{entry['variant']}, exact {entry['exact']}, cos {p.get('cos_min', float('nan')):.4f}"
    if entry.get("layers_read_back") is not None:
        text += f", {entry['layers_read_back']} read back"
    if entry.get("layers_not_in_file"):
        text += f", dropped {len(entry['layers_not_in_file'])}"
    if p.get("within_tolerance") is False:
        text += ", OUTSIDE tolerance"
    if entry.get("decode_cos_min") is not None:
        text += f", decode cos {entry['decode_cos_min']:.4f}"
    if entry.get("decode_vs_prefill_max_abs") is not None:
        text += f", decode vs prefill {entry['decode_vs_prefill_max_abs']:.1e}"
    return text


def markdown(result: dict) -> str:
    m = result["machine"]
    kind = result.get("kind", "decoders")
    lines = [f"# Small {kind} of Hugging Face families through quantize and both exporters (check)", "",
             "```", result["command"], "```", "",
             f"Created {result['created']} on {m.get('cpu', '')}, transformers {result['transformers']}. Two layers, width 64, "
             "random weights (norm gains away from their initial values), MiniLM's tokenizer. sim vs float: the quantized "
             "model's logits (encoders: last hidden state) against the float model's on 64 random tokens (cosine, top-1 "
             "agreement for LMs); TFLite / ONNX: "
             "variant, `exact`, parity cosine against the simulation, TFLite layers read back (of the quantized ones) "
             "and the decode step's parity cosine where there is a decode signature; ONNX: the decode graph's logits against "
             "the prefill graph's (max abs).", ""]
    return "\n".join(lines + table(result)) + "\n"


def table(result: dict) -> list[str]:
    """The checks' table (tools/check_vision_families.py's too): a row per family and recipe."""
    lines = ["| family | recipe | layers | sim vs float | TFLite | ONNX |", "|---|---|---|---|---|---|"]
    for key, row in result["rows"].items():
        family, recipe = key.split(" ", 1)
        if "error" in row:
            lines.append(f"| {family} | {recipe} | - | - | {row['error'][:140]} | - |")
            continue
        sim = row["simulation_vs_float"]
        top1 = "" if sim["top1_agree"] is None else f" / {sim['top1_agree']:.3f}"
        floats = f" ({row['convolutions_kept_float']} convs kept float)" if "convolutions_kept_float" in row else ""
        lines.append(f"| {family} | {recipe} | {row['quantized_layers']}{floats} | {sim['cos']:.4f}{top1} | "
                     f"{_cell(row.get('tflite'))} | {_cell(row.get('onnx'))} |")
    return lines


if __name__ == "__main__":
    main()
