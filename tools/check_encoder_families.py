"""Check: small random encoders of several Hugging Face families through quantize and both exporters. Not a test.

    .venv/bin/python tools/check_encoder_families.py --out benchmarks/encoder_families

The encoder side of tools/check_decoder_families.py (same check, same table): two-layer encoders of width 64 with
random weights (LayerNorm gains drawn away from 1) and MiniLM's tokenizer, loaded from a local Hugging Face directory
as users' embedding models are (`AutoModel`, last hidden state), each quantized with every --recipe and exported to
TFLite and ONNX. The families are the text encoders edge embedding and classification models are built on: BERT
(MiniLM, bge-small, e5-small), DistilBERT, RoBERTa, XLM-RoBERTa (multilingual e5), ELECTRA, MPNet (all-mpnet),
ALBERT (shared layers), DeBERTa-v2 (relative attention), ModernBERT and NomicBERT (rotary, gated MLP).
Writes OUT.json and OUT.md (command at the top). Never imported by edgeq.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_decoder_families import WIDTH, main  # noqa: E402


def configs(vocab: int, pad: int) -> dict:
    import transformers as t

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=WIDTH["max_position_embeddings"], pad_token_id=pad)
    return {
        "bert": lambda: t.BertConfig(**common),
        "distilbert": lambda: t.DistilBertConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                 max_position_embeddings=256, pad_token_id=pad),
        "roberta": lambda: t.RobertaConfig(**{**common, "max_position_embeddings": 258}),
        "xlm-roberta": lambda: t.XLMRobertaConfig(**{**common, "max_position_embeddings": 258}),
        "electra": lambda: t.ElectraConfig(**common, embedding_size=128),
        "mpnet": lambda: t.MPNetConfig(**common),
        "albert": lambda: t.AlbertConfig(**common, embedding_size=128),
        "deberta-v2": lambda: t.DebertaV2Config(**common, relative_attention=True, position_buckets=32,
                                                pos_att_type=["p2c", "c2p"]),
        "modernbert": lambda: t.ModernBertConfig(**common, local_attention=16, cls_token_id=101, sep_token_id=102,
                                                 bos_token_id=101, eos_token_id=102),  # MiniLM tokenizer's [CLS] / [SEP]
        "nomic_bert": lambda: t.NomicBertConfig(**common),
    }


if __name__ == "__main__":
    main("check_encoder_families.py", configs, "AutoModel", "encoders")
