"""Models shared by the export tests, and a check of a QDIR's plan against the file exported from it."""

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


def _grouped_decoder(tmp_path_factory, family: str, gains: tuple[float, float], **config) -> str:
    """A two-layer grouped-query decoder of Hugging Face `family` (the prefix of its config and causal-LM classes) as a
    local Hugging Face directory (MiniLM's tokenizer), its RMSNorm weights drawn uniformly from `gains`; `config`:
    more of its config."""
    import transformers

    tokenizer = load_model("minilm-l6").tokenizer
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **config)
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
def tiny_gemma2(tmp_path_factory) -> str:
    """Gemma 2: sandwich norms (`post_attention_layernorm` normalizes the attention's output; the MLP reads
    `pre_feedforward_layernorm`), a sliding-window layer (window 8) then a full-attention one, and the attention
    scores soft-capped (at 0.5: on random weights the cap hardly moves the logits, so the attention functions are
    checked against Gemma 2's own separately), and so are the logits (at 30, Gemma 2's own: a division after the
    head, which the converter would fold into the head's weight)."""
    return _grouped_decoder(tmp_path_factory, "Gemma2", (-0.5, 0.5), sliding_window=8, query_pre_attn_scalar=16,
                            attn_logit_softcapping=0.5, final_logit_softcapping=30.0)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> str:
    """Mistral with a sliding window of 8 on every layer (its config names no layer types: Hugging Face infers them)."""
    return _grouped_decoder(tmp_path_factory, "Mistral", (0.5, 1.5), sliding_window=8)


@pytest.fixture(scope="session")
def tiny_granite(tmp_path_factory) -> str:
    """Granite: the attention's and MLP's outputs scaled by a residual multiplier, the logits divided by a constant."""
    return _grouped_decoder(tmp_path_factory, "Granite", (0.5, 1.5), embedding_multiplier=12.0, logits_scaling=8.0,
                            residual_multiplier=0.22, attention_multiplier=0.0625)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> str:
    """Phi-3: fused query/key/value (`qkv_proj`) and gate/up (`gate_up_proj`) projections."""
    return _grouped_decoder(tmp_path_factory, "Phi3", (0.5, 1.5), pad_token_id=0)  # (its default, 32000, is past the vocabulary)


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


@pytest.fixture(scope="session")
def tiny_deberta(tmp_path_factory) -> str:
    """A two-layer DeBERTa-v2 encoder (disentangled attention: its relative-position table goes through each layer's
    pos_key_proj / pos_query_proj, whose input is then the same for every input)."""
    import transformers

    tokenizer = load_model("minilm-l6").tokenizer
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                                          relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"])
    return _hf_dir(tmp_path_factory, "tiny-deberta", transformers.DebertaV2Model(config), tokenizer)


@pytest.fixture(scope="session")
def tiny_electra(tmp_path_factory) -> str:
    """A two-layer ELECTRA encoder whose embeddings (width 128) are projected to its hidden width (64) by a linear
    layer, which the converter renders as two identical FULLY_CONNECTEDs on one weight."""
    import transformers

    tokenizer = load_model("minilm-l6").tokenizer
    torch.manual_seed(0)
    config = transformers.ElectraConfig(vocab_size=tokenizer.vocab_size, embedding_size=128, hidden_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                        max_position_embeddings=128)
    return _hf_dir(tmp_path_factory, "tiny-electra", transformers.ElectraModel(config), tokenizer)


@pytest.fixture
def assert_plan_checks_as_written(monkeypatch):
    """A check that on every bundled board's runtimes for a format, a QDIR's plan (`edgeq check QDIR`, the gate of
    `export --target` before converting) gets the verdicts that the file exported from it gets for its quantized layers."""
    from edgeq.targets import check, list_profiles

    monkeypatch.delenv("EDGEQ_PROFILES", raising=False)

    def assert_same(qdir, path, fmt: str) -> None:
        for profile in list_profiles():
            for rt in profile.runtimes_for(fmt):
                plan, written = check(qdir, profile, rt.name), check(path, profile, rt.name)
                layers = [r for r in written.rows if (" w=" in r.signature and " w=fp32" not in r.signature
                                                      and r.op not in ("DequantizeLinear", "DEQUANTIZE"))
                          or (r.op == "Gather" and r.signature in ("act=int8", "act=uint8"))]  # integer table rows
                assert {r.verdict.support for r in plan.rows} == {r.verdict.support for r in layers}, (profile.name, rt.name)

    return assert_same
