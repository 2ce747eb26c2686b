"""The demo: its closing table (ratios against the same format's FP32 row, a dash for what was not measured) and a
whole run on tiny-llama."""

from __future__ import annotations

import pytest

from edgeq.demo import DemoRow, format_table


def test_table_ratios_and_missing_values():
    rows = [DemoRow("fp32", "tflite", "f.tflite", 4.0, None, None, ppl=10.0, p50_ms=2.0, decode_ms=0.2, status="valid"),
            DemoRow("w8", "tflite", "w.tflite", 1.0, True, 0.98828125, ppl=10.5, p50_ms=1.0, decode_ms=0.05,
                    status="valid"),
            DemoRow("w8", "onnx", "w.onnx", 2.0, True, 1.0, ppl=None, p50_ms=None, status="failed")]
    header, fp32, w8, onnx = format_table(rows).splitlines()
    assert fp32.split()[:8] == ["fp32", "tflite", "4.0", "0%", "10.000", "+0.0%", "-", "-"]
    assert w8.split() == ["w8", "tflite", "1.0", "75%", "10.500", "+5.0%", "True", "0.9883", "1.00", "2.00x", "0.05", "valid"]
    assert onnx.split()[3:] == ["-", "-", "-", "True", "1.0000", "-", "-", "-", "failed"]  # no ONNX FP32 row


@pytest.mark.slow
def test_demo_runs_end_to_end_on_tiny_llama(tmp_path, capsys, tiny_llama_ref):
    """`edgeq demo --model tiny-llama`: every variant quantized, exported, evaluated and profiled on the local agent,
    the report written, and each QDIR's recipe.toml naming the calibration it ran with (16 windows, not the
    recipe's 32). A second run reuses the QDIRs and keeps the results already stored."""
    import sqlite3

    from edgeq.cli.main import main
    from edgeq.recipe import load_recipe

    out = tmp_path / "demo"
    args = ["demo", "--model", "tiny-llama", "--out", str(out), "--eval-windows", "1", "--runs", "2"]
    assert main(args) == 0
    said = capsys.readouterr()
    table = said.out
    assert "quantized tiny-llama with w4-g64" in said.err
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["fp32"], ["w8"], ["w8a8"], ["w4-g64"], ["w4-litert"])]
    assert {(r[0], r[1]) for r in rows} == {("fp32", "onnx"), ("fp32", "tflite"), ("w8", "onnx"), ("w8", "tflite"),
                                           ("w8a8", "onnx"), ("w4-g64", "onnx"), ("w4-litert", "tflite")}
    assert all(r[-1] == "valid" for r in rows)
    assert (out / "report.html").stat().st_size > 0
    assert load_recipe(str(out / "w4-g64.q" / "recipe.toml")).calibration.samples == 16
    assert load_recipe("w4-g64").calibration.samples == 32
    with sqlite3.connect(out / "results.sqlite") as db:
        before = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert before >= len(rows)
    assert main(args) == 0
    assert "quantized tiny-llama" not in capsys.readouterr().err  # the QDIRs are reused
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] > before
