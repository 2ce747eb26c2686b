"""`edgeq targets` and `edgeq check`: output and exit codes 0 (native) / 1 (fallback, unsupported) / 2 (bad input)."""

from __future__ import annotations

import json

from edgeq.cli.main import main


def test_targets_list_and_show(profile_dir, capsys):
    assert main(["targets", "list"]) == 0
    out = capsys.readouterr().out
    assert "testboard" in out and "rpi5" in out
    assert main(["targets", "list", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"testboard", "rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "arm64-generic", "x86-64"} <= names
    assert main(["targets", "show", "rpi4"]) == 0
    out = capsys.readouterr().out
    assert "Cortex-A72" in out and "asimddp" in out and "power sensor: none" in out
    assert "runtime onnxruntime-cpu (default for onnx)" in out and "runtime litert-xnnpack (default for tflite)" in out
    assert main(["targets", "show", "jetson-orin-nano", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["power"]["input_rail"] == "VDD_IN" and "tensorrt" in data["runtimes"]


def test_targets_show_unknown_is_exit_2(profile_dir, capsys):
    assert main(["targets", "show", "no-such-board"]) == 2
    assert "not a known target" in capsys.readouterr().err


def test_check_exit_codes(onnx_fixtures, profile_dir, capsys):
    assert main(["check", str(onnx_fixtures["qdq_int8"]), "--target", "testboard"]) == 0
    assert "NATIVE" in capsys.readouterr().out
    assert main(["check", str(onnx_fixtures["matmulnbits"]), "--target", "testboard"]) == 1
    assert "fallback" in capsys.readouterr().out
    assert main(["check", str(onnx_fixtures["int4_block"]), "--target", "testboard", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["status"] == "unsupported" and report["ops"][0]["suggestion"] == "w8"


def test_check_bad_input_is_exit_2(onnx_fixtures, tmp_path, profile_dir, capsys):
    assert main(["check", str(tmp_path / "nothing.onnx"), "--target", "testboard"]) == 2
    assert main(["check", str(onnx_fixtures["float"]), "--target", "no-such-board"]) == 2
    assert main(["check", str(onnx_fixtures["float"]), "--target", "testboard", "--runtime", "lite"]) == 2
    assert main(["check", str(onnx_fixtures["float"])]) == 2  # --target is required
    err = capsys.readouterr().err
    assert "no such file" in err and "not a known target" in err and "runs tflite files, not onnx" in err


def test_check_qdir_every_runtime(tmp_path, profile_dir, capsys):
    qdir = tmp_path / "q"
    qdir.mkdir()
    (qdir / "quant.json").write_text(json.dumps({"layers": [
        {"name": "fc", "kind": "linear", "bits": 8, "granularity": "channel", "activation": {"mode": "dynamic"}}]}))
    # Native with LiteRT (dynamic int8), not described for ORT: at least one runtime runs it natively.
    assert main(["check", str(qdir), "--target", "testboard", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert {r["runtime"]: r["status"] for r in reports} == {"ort": "unsupported", "lite": "native"}
    assert main(["check", str(qdir), "--target", "testboard", "--runtime", "ort"]) == 1


def test_targets_list_says_when_edgeq_profiles_names_no_directory(profile_dir, tmp_path, monkeypatch, capsys):
    """A typo in $EDGEQ_PROFILES hid the profiles it was meant to add, silently."""
    import os

    missing = tmp_path / "no-such-dir"
    monkeypatch.setenv("EDGEQ_PROFILES", os.pathsep.join([str(profile_dir), str(missing)]))
    assert main(["targets", "list"]) == 0
    captured = capsys.readouterr()
    assert "testboard" in captured.out
    assert captured.err == (f"edgeq: note: $EDGEQ_PROFILES names {missing}, which is not a directory: no profiles "
                            "read from it\n")
