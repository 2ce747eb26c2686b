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
