"""Activation diagnostics on the toy LM: FC2 inputs carry the outliers; the decomposition is complete."""

import pytest

from edgeq.quantize.diagnostics import activation_diagnostics, format_diagnostics

pytestmark = pytest.mark.slow


def test_kurtosis_and_error_decomposition(tiny_llama_ref):
    # 8 x 128 evaluation tokens: on 2 x 32 the deltas are within float noise across CPUs (fc2a8 came out above w4a4)
    r = activation_diagnostics(tiny_llama_ref, samples=2, seq_len=128, eval_windows=8)
    kurt = {x["name"]: x["kurtosis"] for x in r["layers"]}
    top = max(kurt, key=kurt.get)
    assert top.endswith("mlp.down_proj")  # the FC2 input is where the outliers are
    assert min(kurt.values()) > 1.0
    dec = r["decomposition"]
    assert set(dec) == {"fp", "w4a16", "w16a4", "w4a4", "w4a4-fc2a8"}
    assert dec["w4a4"]["delta"] > 0 and dec["w4a4-fc2a8"]["delta"] < dec["w4a4"]["delta"]
    assert r["fc2_reduction"] > 0.25  # 8-bit FC2 inputs take a good part of the W4A4 error away (0.52 measured)
    text = format_diagnostics(r, top=3)
    assert "down_proj" in text and "w4a4-fc2a8" in text
