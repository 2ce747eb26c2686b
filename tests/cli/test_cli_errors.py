"""CLI user errors: one line on stderr, exit code 2, nothing left behind."""

import re

import pytest

from edgeq.cli.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv,message", [
    (["quantize", "tiny-llama", "--recipe", "w9"], "neither a preset"),
    (["quantize", "no-such-model", "--recipe", "w8"], "is not a built-in name"),
    (["quantize", "factories:broken_factory", "--recipe", "w8"], "factory 'factories:broken_factory' failed"),
    (["quantize", "factories:not_a_module", "--recipe", "w8"], "not a torch.nn.Module"),
    (["quantize", "nosuchpkg.mod:make", "--recipe", "w8"], "cannot import 'nosuchpkg.mod'"),
    (["quantize", "tiny-llama", "--recipe", "w4-g128", "--calib", "/no/such/file.txt"], "is not a built-in corpus"),
    (["quantize", "tiny-llama", "--recipe", "w8", "--budget", "25%"], "--budget applies to --recipe auto"),
    (["quantize", "tiny-llama", "--recipe", "w8", "--target", "rpi5"], "--target applies to --recipe auto"),
    (["quantize", "tiny-llama", "--recipe", "w8", "--runtime", "litert-xnnpack"], "--runtime applies to --recipe auto"),
    (["quantize", "tiny-llama", "--recipe", "w8", "--method", "gptq"], "--method applies to --recipe auto"),
    (["quantize", "tiny-llama", "--recipe", "auto", "--target", "rpi5", "--runtime", "tensorrt", "--budget", "5bits"],
     "--runtime: 'tensorrt' is not a runtime of rpi5"),
    (["export", "tiny-llama", "--format", "onnx", "--cache-len", "8"], "--cache-len applies to --format tflite"),
    (["export", "tiny-llama"], "export: pass --format onnx or tflite (the output"),
    (["export", "tiny-llama", "--format", "tflite", "--accuracy-level", "4"], "--accuracy-level applies to --format onnx"),
    (["export", "tiny-llama", "--format", "tflite", "--int8-weights", "int8"], "--int8-weights applies to --format onnx"),
    (["export", "tiny-llama", "--format", "tflite", "--no-optimize"], "--no-optimize applies to --format onnx"),
    (["export", "tiny-llama", "--format", "onnx", "--fuse"], "--fuse applies to --format tflite"),
    (["export", "tiny-llama", "--format", "tflite", "--output-grids"], "--output-grids applies to --format onnx"),
    (["export", "tiny-llama", "--format", "onnx", "--calib-samples", "4"], "or to onnx with --output-grids"),
    (["qat", "factories:small_cnn", "--recipe", "w4a16", "--steps", "1"], "is not a causal LM (it loads as 'image')"),
    (["qat", "tiny-llama", "--recipe", "w4-g64-litert", "--method", "pb-llm", "--steps", "1", "--seq-len", "32"],
     "method 'pb-llm': the rule matching '.*' stores symmetric 4-bit group weights"),
])
def test_bad_input_exits_2_with_one_line_and_no_output(argv, message, capsys, tmp_path, tiny_llama_ref):
    out = tmp_path / "qdir"
    code, _, err = _run(capsys, *argv, "-o", str(out))
    assert code == 2
    assert message in err
    assert err.strip().count("\n") == 0 and err.startswith("edgeq: error:")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left either


def test_export_format_follows_the_output_suffix(capsys, tmp_path, tiny_llama_ref):
    import json

    assert main(["export", "tiny-llama", "-o", str(tmp_path / "m.onnx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "onnx"
    # without --json, one line whose numbers read alike (top1_agree was printed with every digit of its fraction)
    assert main(["export", "tiny-llama", "-o", str(tmp_path / "n.onnx")]) == 0
    line = capsys.readouterr().out
    assert re.fullmatch(rf"{tmp_path / 'n.onnx'}: onnx fp32, \d+\.\d\d [kM]B, exact=\w+, parity max_abs=\S+ "
                        r"cos_min=\d\.\d{6} top1_agree=\d\.\d{4}\n", line), line


def test_existing_output_is_kept(capsys, tmp_path, tiny_llama_ref):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "quantize", "tiny-llama", "--recipe", "w8", "-o", str(out))
    assert code == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_quantize_then_inspect_and_eval(capsys, tmp_path, tiny_llama_ref):
    import json

    out = tmp_path / "q"
    assert main(["quantize", "tiny-llama", "--recipe", "w4-g128-rtn", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["layers"] == 28 and 4 < result["avg_bits"] < 5
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.3.mlp.down_proj" in table and "w4s-g128" in table
    assert "TFLite: grids held as they are by --variant none (default int4)" in table  # full-range INT4: ORT's grid
    said = json.loads((out / "quant.json").read_text())["tflite"]["variants"]["int4"]
    assert not said["representable"] and "re-quantize with range = 'narrow'" in said["why"]
    assert main(["eval", str(out), "--count", "2", "--seq-len", "64", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["label"] == "sim" and ev["task"] == "ppl" and ev["metrics"]["tokens"] == 2 * 63
    assert main(["eval", str(out), "--task", "top1"]) == 2
    assert "does not apply to a causal-lm" in capsys.readouterr().err


def test_sizes_below_a_megabyte_read_in_kilobytes(capsys, tmp_path):
    """A small CNN's sizes in kB, where two decimals of MB said "0.0 MB -> 0.0 MB"; models in MB read as before."""
    from edgeq.console import size_text

    assert (size_text(539_770_000), size_text(910_000), size_text(7920), size_text(512)) == \
        ("539.77 MB", "910.00 kB", "7.92 kB", "512 B")
    out = tmp_path / "q"
    assert main(["quantize", "factories:small_cnn", "--recipe", "w8-tensor", "-o", str(out)]) == 0
    said = capsys.readouterr().out
    assert " kB -> " in said and " MB" not in said, said
    assert main(["inspect", str(out)]) == 0
    assert " kB -> " in capsys.readouterr().out


def test_recipe_toml_records_the_calibration_that_ran(capsys, tmp_path, tiny_llama_ref):
    """--samples / --seq-len override the recipe's calibration; recipe.toml says what ran, so it re-runs the same."""
    from edgeq.recipe import load_recipe

    out = tmp_path / "q"
    assert main(["quantize", "tiny-llama", "--recipe", "w4-g64", "--calib", "enwiki", "--samples", "2", "--seq-len", "32",
                 "-o", str(out)]) == 0
    written = load_recipe(str(out / "recipe.toml"))
    assert (written.calibration.samples, written.calibration.seq_len) == (2, 32)
    assert load_recipe("w4-g64").calibration.samples == 32


def test_recipes_lists_presets(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("w8a8", "w8", "w4-g128", "w4-g64", "w4-g128-rtn", "auto"):
        assert name in out


def test_w8a16_exports_with_int8_activations_in_onnx_runtime(capsys, tmp_path, tiny_llama_ref):
    """`w8a16` + `--accuracy-level 4`: the file holds edgeq's INT8 weights bitwise and records the level ONNX
    Runtime's MatMulNBits then quantizes activations at; parity is measured with it (level 0 would be float)."""
    import json

    out = tmp_path / "q"
    assert main(["quantize", "tiny-llama", "--recipe", "w8a16", "-o", str(out)]) == 0
    capsys.readouterr()
    onnx_file = tmp_path / "w8.onnx"
    assert main(["export", str(out), "--format", "onnx", "--accuracy-level", "4", "-o", str(onnx_file), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["session_config"] == {"session.qdq_matmulnbits_accuracy_level": "4"} and meta["exact"] is True
    assert meta["parity"]["top1_agree"] >= 0.9 and meta["parity"]["cos_min"] > 0.99


@pytest.mark.parametrize("argv", [
    ["quantize", "tiny-llama", "--recipe", "w8", "-o", "{blocker}/sub/q"],
    ["export", "tiny-llama", "--format", "onnx", "--variant", "fp32", "-o", "{blocker}/m.onnx"],
    ["export", "tiny-llama", "--format", "tflite", "--variant", "fp32", "-o", "{blocker}/m.tflite"],
    ["report", "--db", "{tmp}/none.sqlite", "-o", "{blocker}/report.html"],
    ["eval", "{tmp}/blocker", "--db", "{blocker}/results.sqlite"],
    ["profile", "{tmp}/blocker", "--local", "--db", "{blocker}/results.sqlite"],
])
def test_output_under_a_file_is_refused_before_any_work(argv, capsys, tmp_path, tiny_llama_ref):
    blocker = tmp_path / "blocker"  # a file where a directory would have to be
    blocker.write_text("mine")
    code, out, err = _run(capsys, *[a.format(blocker=blocker, tmp=tmp_path) for a in argv])
    assert code == 2, err
    assert err.startswith("edgeq: error:") and err.strip().count("\n") == 0
    assert f"{blocker} is not a directory" in err
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_an_operating_system_error_is_one_line_exit_1(capsys, tmp_path, monkeypatch):
    import errno
    import os

    import edgeq.report

    target = tmp_path / "report.html"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(edgeq.report, "write_report", full_disk)
    code, _, err = _run(capsys, "report", "-o", str(target))
    assert code == 1
    assert err == f"edgeq: error: {os.strerror(errno.ENOSPC)}: {target}\n"
    monkeypatch.setenv("EDGEQ_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(OSError):
        main(["report", "-o", str(target)])


def test_qdir_whose_source_model_does_not_load_says_so(capsys, tmp_path):
    """A quantized-model directory holds the quantized layers; the rest comes from its source model, so a factory
    that no longer imports (another working directory) is named as the directory's source."""
    import json

    qdir = tmp_path / "q"
    assert main(["quantize", "factories:small_cnn", "--recipe", "w8", "-o", str(qdir)]) == 0
    capsys.readouterr()
    meta = json.loads((qdir / "model.json").read_text())
    (qdir / "model.json").write_text(json.dumps({**meta, "reference": "moved_away:small_cnn"}))
    code, _, err = _run(capsys, "export", str(qdir), "--format", "onnx", "-o", str(tmp_path / "m.onnx"))
    assert code == 2 and err.startswith(f"edgeq: error: quantized model: {qdir} needs its source model "
                                        "'moved_away:small_cnn', which does not load here: model: cannot import")
    assert not (tmp_path / "m.onnx").exists()
