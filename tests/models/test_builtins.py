"""The built-in pretrained models are the models their names say (not only loadable)."""

import numpy as np
import torch
from PIL import Image

from edgeq.data import _bundled_photos
from edgeq.models import load_model

DAISY, MONASTERY, BOATHOUSE, BELL_COTE = 985, 663, 449, 442  # ImageNet-1k class indices


def _centre(photo: np.ndarray, size: int = 224) -> torch.Tensor:
    h, w = photo.shape[:2]
    s = min(h, w)
    crop = photo[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    img = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), np.float32) / 255.0
    return torch.from_numpy(((img - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]


def test_efficientnet_lite0_recognises_the_bundled_photos():
    """The package's set_swish() swapped Lite0's ReLU6 for Swish: the daisy came out a bolo tie (451)."""
    bundle = load_model("efficientnet-lite0")
    assert not any(type(m).__name__ in ("Swish", "MemoryEfficientSwish") for m in bundle.module.modules())
    china, flower = _bundled_photos()  # sorted by name
    with torch.no_grad():
        top5 = [bundle.module(_centre(p)).topk(5).indices[0].tolist() for p in (china, flower)]
    assert top5[1][0] == DAISY
    assert {MONASTERY, BOATHOUSE, BELL_COTE} & set(top5[0][:3])


def test_minilm_l6_embeds_paraphrases_close_and_unrelated_sentences_apart():
    """all-MiniLM-L6-v2's mean-pooled sentence embeddings: a paraphrase scores well above an unrelated sentence (the
    model card's example pair scores about 0.76); a wrong pooling or a mis-loaded checkpoint does not."""
    bundle = load_model("minilm-l6")
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
    enc = bundle.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bundle.module(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.7 and sim[0, 2] < 0.2 and sim[1, 2] < 0.2, sim


def test_smollm2_135m_continues_text_as_a_language_model():
    """SmolLM2-135M predicts the next word of a plain English sentence (a random or mis-loaded network does not)."""
    bundle = load_model("smollm2-135m")
    ids = bundle.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = bundle.module(ids).logits[0, -1]
    assert bundle.tokenizer.decode(logits.argmax()).strip() == "Paris"
