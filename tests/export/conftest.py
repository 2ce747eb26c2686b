"""Models shared by the export tests."""

from __future__ import annotations

import pytest
import torch

from edgeq.models import load_model


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A two-layer BERT encoder with its pooler as a local Hugging Face directory (MiniLM's tokenizer): biased linears
    after LayerNorms, as in MiniLM. Its LayerNorm gains are random, so a gain a converter folded into the next linear
    would change that weight's bytes."""
    import transformers

    tokenizer = load_model("minilm-l6").tokenizer
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128)
    model = transformers.BertModel(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, torch.nn.Linear):
                m.bias.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp("bert") / "tiny-bert"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory) -> str:
    """A two-layer OPT decoder as a local Hugging Face directory (MiniLM's tokenizer): no rotary embedding, and its
    attention scales the query projection's output (`q_proj(x) * scaling`), a constant MUL the converter would fold
    into q_proj's weight. Its head is tied to the embedding table, whose padding row is all zeros."""
    import transformers

    tokenizer = load_model("minilm-l6").tokenizer
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
                                    pad_token_id=tokenizer.pad_token_id)
    model = transformers.OPTForCausalLM(config)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
            elif isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.5)
    assert not model.get_input_embeddings().weight[tokenizer.pad_token_id].any()
    path = tmp_path_factory.mktemp("opt") / "tiny-opt"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
