"""Activation diagnostics: per-layer input kurtosis and the W4A16 / W16A4 / W4A4 error decomposition.

`activation_diagnostics(source, calib)` is what `edgeq inspect MODEL|QDIR --activations --calib DATA`
prints. Kurtosis (Pearson, 3 for a Gaussian) of every quantizable layer's input over the calibration
windows shows where activation outliers live (in Llama-style models: the MLP down-projection /
FC2 input). The decomposition measures the evaluation loss of round-to-nearest fake quantization
with weights only (W4A16), activations only (W16A4), both (W4A4) and both with an 8-bit
down-projection input (W4A4-FC2A8), each as delta = loss - loss(FP) on evaluation windows
disjoint from calibration. For a QDIR the float model it was made from is analysed and the
QDIR's own loss is reported beside it. Nothing here writes files.
"""

from __future__ import annotations

import torch

# FC2, the MLP's second linear (the down-projection), as the families edgeq checks name it: Llama / Mistral / Qwen /
# Gemma / Phi-3 `down_proj`, OPT / Phi `fc2`, GPT-2 `mlp.c_proj`, GPT-NeoX / Falcon `dense_4h_to_h`, BERT / RoBERTa /
# ELECTRA / MPNet / DeBERTa-v2 `layer.N.output.dense` (not `attention.output.dense`), DistilBERT `ffn.lin2`, ALBERT
# `ffn_output`, ModernBERT `mlp.Wo`. The presets w8a8-static-fc2a16 and w4a4-fc2a8 name the same layers.
FC2 = r"(down_proj|fc2|mlp\.c_proj|dense_4h_to_h|layer\.\d+\.output\.dense|ffn\.lin2|ffn_output|mlp\.Wo)$"


def _recipe(name: str, w_bits: int | None, a_bits: int | None, group_size: int | None, fc2_bits: int | None = None):
    from ..recipe import QuantRecipe

    def rule(match, a):
        weight = {"bits": 16} if w_bits is None else {"bits": w_bits, "symmetric": True, **_gran(group_size)}
        act = {} if a is None else {"mode": "dynamic", "bits": a, **_act_gran(group_size)}
        return {"match": match, "weight": weight, "activation": act}

    rules = [{"match": "lm_head$", "skip": True}]
    if fc2_bits is not None:
        rules.append(rule(FC2, fc2_bits))
    rules.append(rule(".*", a_bits))
    # norm gains unfolded, as the w4a16 / w16a4 / w4a4 / w4a4-fc2a8 presets keep them
    return QuantRecipe.from_dict({"name": name, "rules": rules, "fold_norms": False})


def _gran(group_size):
    return {"granularity": "channel"} if group_size is None else {"granularity": "group", "group_size": group_size}


def _act_gran(group_size):
    return {"granularity": "token"} if group_size is None else {"granularity": "group", "group_size": group_size}


class _Moments:
    def __init__(self):
        self.n, self.s1, self.s2, self.s3, self.s4, self.absmax = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1).to(torch.float64)
        self.n += x.numel()
        self.s1 += float(x.sum())
        self.s2 += float((x**2).sum())
        self.s3 += float((x**3).sum())
        self.s4 += float((x**4).sum())
        self.absmax = max(self.absmax, float(x.abs().max()))

    def result(self) -> dict:
        m = self.s1 / self.n
        var = self.s2 / self.n - m**2
        m4 = self.s4 / self.n - 4 * m * self.s3 / self.n + 6 * m**2 * self.s2 / self.n - 3 * m**4
        std = max(var, 1e-30) ** 0.5
        return {"kurtosis": round(m4 / std**4, 3), "absmax_over_std": round(self.absmax / std, 2)}


def input_kurtosis(model: torch.nn.Module, batches) -> dict[str, dict]:
    """name -> {kurtosis, absmax_over_std} of every Linear/Conv2d input over `batches`."""
    from .modules import _QuantBase

    mods = {n: m for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, _QuantBase))}
    from .observers import feed_observing_inputs

    stats = {n: _Moments() for n in mods}
    feed_observing_inputs(model, {m: stats[n].add for n, m in mods.items()}, batches)
    return {n: s.result() for n, s in stats.items() if s.n}


def _loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        total = sum(float(model(input_ids=ids[i : i + 4], labels=ids[i : i + 4]).loss) * len(ids[i : i + 4]) for i in range(0, len(ids), 4))
    return total / len(ids)


def activation_diagnostics(source: str, calib: str | None = "enwiki", samples: int = 8, seq_len: int = 128, eval_windows: int = 8,
                           w_bits: int = 4, a_bits: int = 4, group_size: int | None = 128, fc2_bits: int = 8,
                           decompose: bool = True) -> dict:
    """Per-layer input kurtosis and, for causal LMs, the WxA16 / W16Ax / WxAx (+ FC2 at `fc2_bits`) loss deltas.

    `source`: a model reference or a quantized-model directory; `group_size` None = per-channel
    weights and per-token activations.
    """
    from ..data import lm_windows
    from ..models import load_model
    from ..models.inputs import calibration_batches
    from .ptq import quantize_model
    from .qmodel import is_qdir, load_quantized

    qdir_loss = None
    if is_qdir(source):
        qm = load_quantized(source)
        ref = qm.bundle.reference
    else:
        qm, ref = None, str(source)
    bundle = load_model(ref)
    if calib is None:
        from ..models.inputs import default_source

        calib = default_source(bundle)
    batches = calibration_batches(bundle, calib, samples, seq_len)
    layers = input_kurtosis(bundle.module, batches)
    out = {"source": str(source), "model": ref, "calib": calib, "samples": samples, "seq_len": seq_len,
           "layers": [{"name": n, **v} for n, v in layers.items()]}
    if not decompose:
        return out
    if not bundle.is_lm:  # the loss-based decomposition is defined for causal LMs only
        out["decomposition_note"] = f"no W/A error decomposition: {ref!r} is {bundle.kind}, not a causal LM"
        return out
    ids = torch.from_numpy(lm_windows(bundle.tokenizer, calib, "evaluation", seq_len, eval_windows))
    fp = _loss(bundle.module, ids)
    if qm is not None:
        qdir_loss = _loss(qm.model, ids)
    g = "c" if group_size is None else f"g{group_size}"
    variants = {
        f"w{w_bits}a16": _recipe(f"w{w_bits}a16-{g}", w_bits, None, group_size),
        f"w16a{a_bits}": _recipe(f"w16a{a_bits}-{g}", None, a_bits, group_size),
        f"w{w_bits}a{a_bits}": _recipe(f"w{w_bits}a{a_bits}-{g}", w_bits, a_bits, group_size),
        f"w{w_bits}a{a_bits}-fc2a{fc2_bits}": _recipe(f"w{w_bits}a{a_bits}-fc2a{fc2_bits}-{g}", w_bits, a_bits, group_size, fc2_bits),
    }
    dec = {"fp": {"loss": round(fp, 6)}}
    for name, recipe in variants.items():
        q = quantize_model(load_model(ref), recipe)
        loss = _loss(q.model, ids)
        dec[name] = {"loss": round(loss, 6), "delta": round(loss - fp, 6)}
    dw, da, dwa = (dec[k]["delta"] for k in list(variants)[:3])
    dfc2 = dec[list(variants)[3]]["delta"]
    out["decomposition"] = dec
    out["eval_windows"] = eval_windows
    out["weight_plus_activation"] = round(dw + da, 6)  # compare with the joint delta: how additive the two parts are
    out["fc2_reduction"] = round(1 - dfc2 / dwa, 4) if dwa > 0 else None
    if qdir_loss is not None:
        out["qdir"] = {"loss": round(qdir_loss, 6), "delta": round(qdir_loss - fp, 6)}
    return out


def activation_report(source: str, calib: str | None = None, **options) -> dict:
    """What `edgeq inspect --activations` calls: `activation_diagnostics` with the model's default data."""
    return activation_diagnostics(source, calib=calib, **options)


def format_diagnostics(result: dict, top: int | None = None) -> str:
    """The human-readable table `edgeq inspect --activations` prints."""
    rows = sorted(result["layers"], key=lambda r: -r["kurtosis"])[: top or None]
    lines = [f"{result['model']}: input kurtosis on {result['calib']} ({result['samples']} x {result['seq_len']} tokens)",
             f"{'layer':48s} {'kurtosis':>10s} {'max/std':>9s}"]
    lines += [f"{r['name']:48s} {r['kurtosis']:10.2f} {r['absmax_over_std']:9.1f}" for r in rows]
    if "decomposition" in result:
        lines.append(f"error decomposition (eval loss on {result['eval_windows']} windows, delta vs FP):")
        for k, v in result["decomposition"].items():
            lines.append(f"  {k:22s} loss {v['loss']:.4f}" + (f"  delta {v['delta']:+.4f}" if "delta" in v else ""))
        red = result["fc2_reduction"]
        red_s = "n/a" if red is None else f"{100 * red:.0f}%"
        lines.append(f"  weight + activation deltas {result['weight_plus_activation']:+.4f}; 8-bit FC2 input removes {red_s} of the W4A4 delta")
        if "qdir" in result:
            lines.append(f"  this QDIR               loss {result['qdir']['loss']:.4f}  delta {result['qdir']['delta']:+.4f}")
    return "\n".join(lines)
