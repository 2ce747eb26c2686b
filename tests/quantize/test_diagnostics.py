"""Activation diagnostics on the toy LM: FC2 inputs carry the outliers; the decomposition is complete."""

import pytest

from edgeq.quantize.diagnostics import activation_diagnostics, format_diagnostics

pytestmark = pytest.mark.slow


def test_kurtosis_and_error_decomposition(tiny_llama_ref):
    r = activation_diagnostics(tiny_llama_ref, samples=2, seq_len=32, eval_windows=2)
    kurt = {x["name"]: x["kurtosis"] for x in r["layers"]}
    top = max(kurt, key=kurt.get)
    assert top.endswith("mlp.down_proj")  # the FC2 input is where the outliers are
    assert min(kurt.values()) > 1.0
    dec = r["decomposition"]
    assert set(dec) == {"fp", "w4a16", "w16a4", "w4a4", "w4a4-fc2a8"}
    assert dec["w4a4"]["delta"] > 0 and dec["w4a4-fc2a8"]["delta"] < dec["w4a4"]["delta"]
    text = format_diagnostics(r, top=3)
    assert "down_proj" in text and "w4a4-fc2a8" in text
