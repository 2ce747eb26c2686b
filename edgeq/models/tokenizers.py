"""A byte-level tokenizer for the built-in toy LM, and one helper that encodes with any tokenizer."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256). No files, no downloads."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens, for byte and Hugging Face tokenizers alike."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
