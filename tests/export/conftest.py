"""Models shared by the export tests."""

from __future__ import annotations

import pytest
import torch

from edgeq.models import load_model


def _hf_dir(tmp_path_factory, name: str, model, tokenizer) -> str:
    """`model` saved with `tokenizer` as a local Hugging Face directory: a model reference."""
    path = tmp_path_factory.mktemp(name) / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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
    return _hf_dir(tmp_path_factory, "tiny-bert", model, tokenizer)


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
    return _hf_dir(tmp_path_factory, "tiny-opt", model, tokenizer)


def _grouped_decoder(tmp_path_factory, family: str, gains: tuple[float, float]) -> str:
    """A two-layer grouped-query decoder of Hugging Face `family` (the prefix of its config and causal-LM classes) as a
    local Hugging Face directory (MiniLM's tokenizer), its RMSNorm weights drawn uniformly from `gains`."""
    import transformers

    tokenizer = load_model("minilm-l6").tokenizer
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    model = getattr(transformers, f"{family}ForCausalLM")(config)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(*gains)
    return _hf_dir(tmp_path_factory, f"tiny-{family.lower()}", model, tokenizer)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> str:
    """Gemma: its RMSNorms scale by (1 + weight), not by the weight as Llama's do; gains away from 1 show the
    difference."""
    return _grouped_decoder(tmp_path_factory, "Gemma", (-0.5, 0.5))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """Qwen3: a per-head RMSNorm on queries and keys before the rotary embedding."""
    return _grouped_decoder(tmp_path_factory, "Qwen3", (0.5, 1.5))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    """A two-layer GPT-2 as a local Hugging Face directory (MiniLM's tokenizer): its projections are transformers'
    Conv1D (x @ W + b), its class GPT2LMHeadModel (no "ForCausalLM" in the name)."""
    import transformers

    tokenizer = load_model("minilm-l6").tokenizer
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return _hf_dir(tmp_path_factory, "tiny-gpt2", transformers.GPT2LMHeadModel(config), tokenizer)
