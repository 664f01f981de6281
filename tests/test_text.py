"""Item text through the packaged MiniLM model, its cache, and cold-start items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import common.text
from client.train import site_graphs, site_model, train_locally
from common.config import default_config
from common.data import load_site
from common.data.synthetic import generate_synthetic
from common.evaluation import evaluate
from common.privacy import site_mechanism
from common.text import PACKAGED_MODEL, TextEncoder, item_text_vectors, text_dimension

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy.",
    "Heat (1995). Genres: Action, Crime, Thriller.",
    "Sense and Sensibility (1995). Genres: Drama, Romance.",
]


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(PACKAGED_MODEL)


def test_the_packaged_model_loads_offline(monkeypatch, encoder):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    offline = TextEncoder(PACKAGED_MODEL)
    vectors = offline.encode(TEXTS, progress=False)
    assert vectors.shape == (3, text_dimension(PACKAGED_MODEL)) == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_embeddings_are_deterministic_and_batch_independent(encoder):
    once = encoder.encode(TEXTS, progress=False)
    again = encoder.encode(TEXTS, progress=False)
    np.testing.assert_array_equal(once, again)
    encoder.batch_size = 1
    one_by_one = encoder.encode(TEXTS, progress=False)
    np.testing.assert_allclose(once, one_by_one, atol=1e-5)
    # Related texts are closer than unrelated ones.
    similarity = once @ once.T
    assert similarity[0, 1] < similarity[0, 0] and similarity.min() > -1


def test_vectors_are_cached_by_model_and_text(tmp_path, monkeypatch):
    config = default_config(item_graph="none", text_cache_dir=str(tmp_path))
    catalogue = generate_synthetic(num_users=20, num_items=15).catalogue
    first = item_text_vectors(catalogue, config)
    assert len(list(tmp_path.iterdir())) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(common.text, "TextEncoder", no_model)
    np.testing.assert_array_equal(item_text_vectors(catalogue, config), first)
    other = generate_synthetic(num_users=20, num_items=16).catalogue
    with pytest.raises(AssertionError, match="cache was not used"):
        item_text_vectors(other, config)  # other texts: a miss
    assert item_text_vectors(catalogue, config.replace(item_text=False)) is None


def test_cold_start_items_are_ranked_by_their_text():
    """Items held out of all training get scores that find what users like, with text on."""
    config = default_config(item_graph="none", task="ranking", dp=False, cold_item_fraction=0.2)
    site = load_site(config, 0, 1)
    assert len(site.cold_items) == 80 and len(site.cold) > 0
    assert not np.isin(site.train.item, site.cold_items).any()
    torch.manual_seed(0)
    model = site_model(site.catalogue, config)
    graphs = site_graphs(site, config)
    mechanism = site_mechanism(config, model.size)
    for server_round in range(1, 9):
        train_locally(
            model, graphs, config, mechanism=mechanism, server_round=server_round, device="cpu"
        )

    def cold_recall() -> float:
        metrics = evaluate(model, graphs, site.cold, 20, candidates=site.cold_items).metrics()
        return metrics["recall@20"]

    with_text = cold_recall()
    with model.text_disabled():
        without_text = cold_recall()
    chance = 20 / len(site.cold_items)
    assert with_text > without_text + 0.05
    assert with_text > chance + 0.1
