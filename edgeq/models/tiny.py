"""`tiny-llama`: a byte-level Llama small enough for tests, trained briefly so its metrics mean something.

Seeded; trained once on the calibration half of the enwiki text and cached. It has RMSNorm,
SwiGLU, grouped-query attention and an untied head like the real Llama family, and widths that
make group sizes 32-128 meaningful (hidden 128, MLP 384).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

TINY_CONFIG = dict(
    vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
)
TRAIN = dict(steps=300, batch=16, seq_len=128, lr=3e-3, seed=0)


def config_hash() -> str:
    return hashlib.sha256(json.dumps([TINY_CONFIG, TRAIN], sort_keys=True).encode()).hexdigest()[:10]


def train_tiny_llama(out_dir: Path) -> None:
    import numpy as np
    import transformers

    from ..data import lm_windows
    from .tokenizers import ByteTokenizer

    torch.manual_seed(TRAIN["seed"])
    config = transformers.LlamaConfig(**TINY_CONFIG)
    model = transformers.LlamaForCausalLM(config)
    windows = lm_windows(ByteTokenizer(), "enwiki", "calibration", TRAIN["seq_len"], TRAIN["steps"] * TRAIN["batch"], seed=TRAIN["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN["lr"], total_steps=TRAIN["steps"], pct_start=0.1)
    model.train()
    for step in range(TRAIN["steps"]):
        batch = torch.from_numpy(np.ascontiguousarray(windows[step * TRAIN["batch"] : (step + 1) * TRAIN["batch"]]))
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps({"config": TINY_CONFIG, "train": TRAIN, "final_loss": loss.item()}))
