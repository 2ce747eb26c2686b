"""Evaluation metrics on cases whose answer is known."""

import math

import numpy as np
import pytest

from edgeq.evaluate import perplexity


def test_perplexity_of_a_uniform_predictor_is_the_vocabulary_size():
    vocab = 50
    windows = np.random.default_rng(0).integers(0, vocab, size=(3, 20))
    result = perplexity(lambda ids: np.zeros((1, ids.shape[1], vocab)), windows)
    assert result["ppl"] == pytest.approx(vocab, rel=1e-9)
    assert result["tokens"] == 3 * 19


def test_perplexity_of_a_known_distribution():
    # a predictor that puts probability p on the true next token: ppl = 1/p exactly
    vocab, p = 10, 0.6
    windows = np.random.default_rng(1).integers(0, vocab, size=(2, 30))

    def forward(ids):
        logits = np.full((1, ids.shape[1], vocab), math.log((1 - p) / (vocab - 1)))
        nxt = np.append(ids[0, 1:], 0)
        logits[0, np.arange(ids.shape[1]), nxt] = math.log(p)
        return logits

    assert perplexity(forward, windows)["ppl"] == pytest.approx(1 / p, rel=1e-9)


def test_uniform_lm_factory_through_the_library(tiny_llama_ref):
    from edgeq import data
    from edgeq.models import load_model

    windows = data.lm_windows(load_model(tiny_llama_ref).tokenizer, "enwiki", "evaluation", 32, 2)
    bundle = load_model("factories:UniformLM")
    result = perplexity(lambda ids: bundle.module(__import__("torch").from_numpy(ids)).numpy(), windows)
    assert result["ppl"] == pytest.approx(256, rel=1e-6)


def test_calibration_and_evaluation_windows_are_disjoint(tiny_llama_ref):
    from edgeq import data
    from edgeq.models import load_model

    tok = load_model(tiny_llama_ref).tokenizer
    stream = data.token_stream(tok, "enwiki")
    half = len(stream) // 2
    ev = data.lm_windows(tok, "enwiki", "evaluation", 64, 3)
    assert np.array_equal(ev[0], stream[half : half + 64])
    cal = data.lm_windows(tok, "enwiki", "calibration", 64, 50, seed=3)
    joined = stream[:half].tobytes()
    assert all(w.tobytes() in joined for w in cal[:5])


def test_fixed_length_files_are_recognised_from_their_metadata():
    from edgeq.evaluate import _fixed_seq_len

    assert _fixed_seq_len({"inputs": [{"name": "ids", "shape": [1, 64]}]}) == 64
    assert _fixed_seq_len({"inputs": [{"name": "ids", "shape": ["batch", "sequence"]}]}) is None
    assert _fixed_seq_len({}) is None


def test_image_models_take_their_own_size_and_npy_halves(tmp_path):
    """An image model from a factory calibrates and evaluates at its example input's size (a 16 px CNN was fed 224 px
    photos: a shape error in its classifier). A .npy array of its inputs is read as it is, its first half for
    calibration and its second for evaluation, and an array of another shape is one line."""
    import torch

    from edgeq.errors import EdgeqError
    from edgeq.evaluate import evaluate
    from edgeq.models import load_model
    from edgeq.models.inputs import calibration_batches
    from edgeq.quantize.ptq import quantize_model
    from edgeq.recipe import QuantRecipe

    static = QuantRecipe.from_dict({"rules": [{"match": ".*", "weight": {"bits": 8}, "activation": {"mode": "static"}}]})
    bundle = load_model("factories:small_cnn")
    photos = calibration_batches(bundle, None, 4, 0)
    assert photos[0][0].shape == (4, 3, 16, 16)
    quantize_model(bundle, static, photos)

    rng = np.random.default_rng(0)
    arr = np.concatenate([rng.uniform(0, 0.1, (4, 3, 16, 16)), rng.uniform(0, 10, (3, 3, 16, 16))]).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    bundle = load_model("factories:small_cnn")
    batches = calibration_batches(bundle, str(tmp_path / "x.npy"), 8, 0)
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.from_numpy(arr[:3]))  # the first half, as stored
    qdir = quantize_model(bundle, static, batches).save(tmp_path / "q")
    result = evaluate(str(qdir), data=str(tmp_path / "x.npy"))
    assert result["metrics"]["images"] == 4  # the second half

    np.save(tmp_path / "small.npy", arr[:, :, :8, :8])
    with pytest.raises(EdgeqError, match=r"holds float32 \[7, 3, 8, 8\]; this model takes float \[N, 3, 16, 16\]"):
        calibration_batches(bundle, str(tmp_path / "small.npy"), 8, 0)
    np.save(tmp_path / "one.npy", arr[:1])
    with pytest.raises(EdgeqError, match="needs at least 2"):
        evaluate(str(qdir), data=str(tmp_path / "one.npy"))
