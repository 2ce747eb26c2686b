"""Damaged inputs and outputs that are not edgeq's: one line, the right exit code, and nothing of the user's lost.

Each case here was a traceback, an exit 0 on a failure, or a file of the user's replaced before these checks.
"""

import json
import os
import subprocess
import sys

import pytest

from edgeq.cli.main import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(err: str) -> bool:
    return err.startswith("edgeq: error:") and err.strip().count("\n") == 0


@pytest.fixture(scope="module")
def w8_qdir(tmp_path_factory, tiny_llama_ref):
    qdir = tmp_path_factory.mktemp("good") / "w8"
    assert main(["quantize", "tiny-llama", "--recipe", "w8", "-o", str(qdir)]) == 0
    return qdir


def _damaged_copy(qdir, tmp_path, name: str, text: str):
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(qdir, copy)
    (copy / name).write_text(text)
    return copy


@pytest.mark.parametrize("name,text,said", [
    ("quant.json", "{\"layers\": [", "quant.json: not readable JSON"),
    ("quant.json", "[1, 2, 3]", "is damaged (TypeError"),
    ("quant.json", "{}", "is damaged (KeyError: "),
    ("quant.json", "{\"layers\": \"x\", \"model\": \"m\", \"recipe\": \"r\", \"avg_bits\": 8, \"bytes_before\": 1, "
                   "\"bytes_after\": 1, \"size_reduction\": 0}", "is damaged (TypeError"),
    ("model.json", "{\"reference\": ", "model.json: not readable JSON"),
])
@pytest.mark.parametrize("command", ["inspect", "export", "eval"])
def test_a_damaged_quantized_model_directory_is_one_line(command, name, text, said, capsys, tmp_path, w8_qdir):
    copy = _damaged_copy(w8_qdir, tmp_path, name, text)
    if command == "inspect" and name == "model.json":
        pytest.skip("inspect reads quant.json only")
    extra = {"inspect": [], "export": ["-o", tmp_path / "m.onnx"], "eval": ["--count", "1", "--seq-len", "16"]}[command]
    code, out, err = _run(capsys, command, copy, *extra)
    assert code == 2 and _one_line(err) and said in err, err
    assert out == ""  # no half of a table before the error
    assert not (tmp_path / "m.onnx").exists()


def test_eval_of_a_file_that_is_not_what_its_metadata_describes(capsys, tmp_path, tiny_llama_ref):
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "tiny-llama", "-o", str(onnx_file)]) == 0
    capsys.readouterr()
    onnx_file.write_bytes(onnx_file.read_bytes()[:2000])  # truncated after the export
    code, _, err = _run(capsys, "eval", onnx_file, "--count", "1", "--seq-len", "16")
    assert code == 2 and _one_line(err) and "is not the file m.onnx.json describes" in err, err
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    del meta["sha256"]  # metadata that records no hash: ONNX Runtime's refusal, in one line
    (tmp_path / "m.onnx.json").write_text(json.dumps(meta))
    code, _, err = _run(capsys, "eval", onnx_file, "--count", "1", "--seq-len", "16")
    assert code == 2 and _one_line(err) and "ONNX Runtime cannot load" in err, err


def test_export_keeps_the_files_it_would_write_beside_its_output(capsys, tmp_path, tiny_llama_ref):
    onnx_file = tmp_path / "m.onnx"
    for name in ("m.onnx.json", "m.decode.onnx"):
        (tmp_path / name).write_text("mine")
        code, _, err = _run(capsys, "export", "tiny-llama", "-o", onnx_file)
        assert code == 2 and _one_line(err) and f"{tmp_path / name} already exists" in err, err
        assert (tmp_path / name).read_text() == "mine" and not onnx_file.exists()
        (tmp_path / name).unlink()
    (tmp_path / "adir.onnx").mkdir()
    code, _, err = _run(capsys, "export", "tiny-llama", "-o", tmp_path / "adir.onnx", "--overwrite")
    assert code == 2 and "is a directory" in err, err


def test_overwrite_replaces_only_a_quantized_model_directory(capsys, tmp_path, tiny_llama_ref, monkeypatch):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    for out in (mine, tmp_path / "notes.txt"):
        code, _, err = _run(capsys, "quantize", "tiny-llama", "--recipe", "w8", "-o", out, "--overwrite")
        assert code == 2 and _one_line(err) and "is not a quantized-model directory (no quant.json)" in err, err
    monkeypatch.chdir(mine)  # `-o .`: the directory itself, refused before any work (it failed after quantizing)
    code, _, err = _run(capsys, "quantize", "tiny-llama", "--recipe", "w8", "-o", ".", "--overwrite")
    assert code == 2 and f"{mine} is not a quantized-model directory" in err, err
    assert (mine / "chapter1.txt").read_text() == "mine" and (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "thesis"]


def test_qat_checkpoints_never_replace_what_is_not_one(capsys, tmp_path, tiny_llama_ref):
    qat = ["qat", "tiny-llama", "--recipe", "w4a16", "--steps", "2", "--seq-len", "16", "--batch", "1"]
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, *qat, "--checkpoint-every", "1", "--checkpoint-dir", tmp_path / "notes.txt",
                        "-o", tmp_path / "q")
    assert code == 2 and _one_line(err) and "--checkpoint-dir:" in err and "not a QAT checkpoint directory" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert _run(capsys, *qat, "--checkpoint-every", "1", "-o", tmp_path / "q")[0] == 0
    assert (tmp_path / "q.ckpt" / "state.json").is_file()  # the step-1 checkpoint of a 2-step run
    code, _, err = _run(capsys, *qat, "--checkpoint-every", "1", "-o", tmp_path / "r",
                        "--checkpoint-dir", tmp_path / "q.ckpt")
    assert code == 2 and "holds a checkpoint of an earlier run: pass --resume" in err, err
    (tmp_path / "q.ckpt" / "state.json").write_text("{\"version\": ")  # damaged: --resume says so in one line
    code, _, err = _run(capsys, *qat, "--resume", "--checkpoint-dir", tmp_path / "q.ckpt", "-o", tmp_path / "r")
    assert code == 2 and _one_line(err) and "state.json: not readable JSON" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,said", [
    (["--rank", "4"], "--rank applies to --method lr-qat, not 'lsq'"),
    (["--alpha", "2", "--base-dtype", "bf16"], "--alpha, --base-dtype apply to --method lr-qat"),
    (["--lr", "inf"], "lr (inf) must be finite and > 0"),
    (["--method", "lr-qat", "--alpha", "nan"], "alpha (nan) must be finite and > 0"),
    (["--method", "lr-qat", "--alpha", "0"], "alpha (0.0) must be finite and > 0"),
])
def test_qat_options_that_cannot_train(args, said, capsys, tmp_path, tiny_llama_ref):
    code, _, err = _run(capsys, "qat", "tiny-llama", "--recipe", "w4a16", "--steps", "1", *args, "-o", tmp_path / "q")
    assert code == 2 and _one_line(err) and said in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_usage_error_is_one_line(capsys):
    code, _, err = _run(capsys, "eval", "tiny-llama", "--count", "0")
    assert code == 2 and _one_line(err), err
    assert err.startswith("edgeq: error: edgeq eval: Invalid value for '--count'") and "'edgeq eval --help'" in err
    code, _, err = _run(capsys, "profile")
    assert code == 2 and _one_line(err) and "Missing argument 'ARTIFACTS...'" in err, err


def test_an_empty_array_file_is_a_data_error_not_an_interrupt(capsys, tmp_path):
    """click turns any EOFError into its Abort, which read as Ctrl-C ("edgeq: aborted", exit 130)."""
    (tmp_path / "empty.npy").write_bytes(b"")
    code, _, err = _run(capsys, "quantize", "factories:small_cnn", "--recipe", "w8a8-static", "--calib",
                        tmp_path / "empty.npy", "-o", tmp_path / "q")
    assert code == 2 and _one_line(err) and "cannot read" in err and "as a .npy array" in err, err


def test_check_refuses_files_that_are_not_whole_models(capsys, tmp_path, w8_qdir):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "tiny.onnx").write_bytes(b"\x08\x07")  # protobuf reads these two bytes as a model with no graph
    for name in ("empty.onnx", "tiny.onnx"):
        code, _, err = _run(capsys, "check", tmp_path / name, "--target", "rpi5")
        assert code == 2 and _one_line(err) and "not an ONNX model (no graph nodes or opset)" in err, err
    tfl = tmp_path / "m.tflite"
    assert main(["export", str(w8_qdir), "-o", str(tfl)]) == 0  # constants past the flatbuffer, at offsets
    assert main(["check", str(tfl), "--target", "rpi5"]) == 0
    capsys.readouterr()
    from edgeq.targets.tflite_graph import schema

    buf = tfl.read_bytes()
    model = schema().Model.GetRootAs(buf, 0)
    first = min(o for o in (model.Buffers(i).Offset() for i in range(model.BuffersLength())) if o)
    tfl.write_bytes(buf[: first + 100])  # the flatbuffer whole, the weights stored after it cut short
    code, _, err = _run(capsys, "check", tfl, "--target", "rpi5")
    assert code == 2 and _one_line(err) and "truncated TFLite file" in err, err


def test_eval_says_when_the_data_holds_fewer_windows_than_asked(capsys, tmp_path, tiny_llama_ref):
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)  # 900 bytes: tiny-llama reads bytes
    code, out, err = _run(capsys, "eval", "tiny-llama", "--data", text, "--count", "100", "--seq-len", "16")
    assert code == 0, err
    windows = int(out.strip().rsplit("windows=", 1)[1])
    assert 0 < windows < 100
    assert f"edgeq: note: --count 100: the evaluation half of {text} holds {windows}; evaluated those" in err


def test_a_write_past_the_file_size_limit_is_one_line_exit_1(tmp_path, tiny_llama_ref):
    """A full disk, as the process sees it: RLIMIT_FSIZE makes writes fail with EFBIG (safetensors raised its own
    error type, a traceback; onnx's write named no file); the directory already there is kept and no temporary
    directory is left."""
    old = tmp_path / "q"
    assert main(["quantize", "tiny-llama", "--recipe", "w8", "-o", str(old)]) == 0
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    def limited(*argv):
        code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
                "from edgeq.cli.main import main; sys.exit(main(sys.argv[1:]))")
        return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                              env={**os.environ, "EDGEQ_DEBUG": ""})

    for argv, written in ((["quantize", "tiny-llama", "--recipe", "w8", "-o", str(old), "--overwrite"],
                           "/layers.safetensors"),
                          (["export", "tiny-llama", "-o", str(tmp_path / "m.onnx")], "/m.onnx")):
        done = limited(*argv)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(f"edgeq: error: {os.strerror(27)}: ") and done.stderr.count("\n") == 1
        assert done.stderr.rstrip().endswith(written), done.stderr  # the file that did not fit, named
        assert {p.name: p.read_bytes() for p in old.iterdir()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
