"""The demo's closing table: ratios against the same format's FP32 row, and a dash for what was not measured."""

from __future__ import annotations

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
