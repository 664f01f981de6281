"""Recommendations out of a completed run: ``load_recommender``, ``fedgraphrec recommend`` and
``fedgraphrec serve``, on runs made by Flower's simulation engine (the ``flwr run .`` and
deployment tests call ``recommend`` on theirs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from flower_helpers import child_environment, free_port, simulate, stop_process_tree, wait_for

from cli import main
from client.recommender import NotFound, Recommender, load_recommender, site_users
from common.config import default_config
from common.data.dataset import Catalogue
from common.errors import InputError
from common.graph.release import ItemGraph

SMALL = {"synthetic_users": 120, "synthetic_items": 60, "min_sites": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A rating run of the default pipeline (the learned model on the item graph, DP) and
    a ranking run of the filter alone, without DP; two sites of synthetic users each."""
    base = tmp_path_factory.mktemp("recommend")
    (base / "messages").mkdir()
    out = {}
    for name, changes in (
        ("rating", {"num_server_rounds": 2}),
        ("ranking", {"task": "ranking", "item_graph": "filter", "dp": False}),
    ):
        config = default_config(
            run_dir=str(base / name), site_state_dir=str(base / "sites"), **SMALL, **changes
        )
        out[name] = simulate(config, 2, base / "messages")
    return out


def a_user(run_dir: Path) -> tuple[str, list]:
    """A user of the run's data, and their interactions as ``(item id, rating)`` pairs."""
    recommender = load_recommender(run_dir)
    users = site_users(recommender)
    person = users.user("0")
    ids = recommender.catalogue.item_ids
    rows = zip(person.train.item, person.train.rating, strict=True)
    return "0", [(ids[i], float(r)) for i, r in rows]


@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_a_site_user_gets_k_unseen_items_best_first_and_predict_agrees(runs, task):
    recommender = load_recommender(runs[task])
    users = site_users(recommender)
    user, seen = a_user(runs[task])
    top = recommender.recommend(users.user(user), k=5)
    assert len(top) == 5 and not {r.item for r in top} & {item for item, _ in seen}
    scores = np.array([r.score for r in top])
    predicted = recommender.predict(users.user(user), [r.item for r in top])
    np.testing.assert_allclose(predicted, scores, rtol=1e-6)
    bound = scores - recommender.offset_standard_error[recommender.indices([r.item for r in top])]
    assert list(bound) == sorted(bound, reverse=True)  # ratings: by the lower bound
    if task == "rating":
        assert all(1.0 <= s <= 5.0 for s in scores)  # the public scale
        assert recommender.model is not None  # filter+gcn: what the run trained
    with_seen = recommender.recommend(users.user(user), k=60, exclude_seen=False)
    assert {r.item for r in with_seen} == set(recommender.catalogue.item_ids)


def test_the_filter_scores_a_folded_in_person_as_the_site_user_with_the_same_items(runs):
    """The filter alone reads nothing but the user's row, so fold-in is exact."""
    recommender = load_recommender(runs["ranking"])
    user, seen = a_user(runs["ranking"])
    site_user = recommender.recommend(site_users(recommender).user(user), k=10)
    assert recommender.recommend(seen, k=10) == site_user


def test_similar_items_come_from_the_released_graph(runs):
    recommender = load_recommender(runs["ranking"])
    item = recommender.catalogue.item_ids[0]
    similar = recommender.similar(item, k=5)
    assert len(similar) == 5 and item not in {r.item for r in similar}
    row = recommender.graph.propagation_matrix(recommender.catalogue.num_items).getrow(0)
    others = row.data[row.indices != 0]
    assert similar[0].score == pytest.approx(others.max())


def test_bad_requests_name_the_problem(runs, tmp_path):
    recommender = load_recommender(runs["rating"])
    users = site_users(recommender)
    with pytest.raises(NotFound, match="user 'nobody': not a user of this site"):
        users.user("nobody")
    with pytest.raises(NotFound, match="item 'no-such-item': not in the run's catalogue"):
        recommender.predict(users.user("0"), ["no-such-item"])
    with pytest.raises(InputError, match="k: expected a positive number of items, got 0"):
        recommender.recommend(users.user("0"), k=0)
    with pytest.raises(InputError, match="the user has no interactions"):
        recommender.recommend([], k=5)
    item = recommender.catalogue.item_ids[0]
    with pytest.raises(InputError, match="a rating is needed"):
        recommender.recommend([item], k=5)
    with pytest.raises(InputError, match=r"rating 9\.0: outside the public scale 1\.\.5"):
        recommender.recommend([(item, 9.0)], k=5)


def copy_of(run_dir: Path, folder: Path) -> Path:
    subprocess.run(["cp", "-r", str(run_dir), str(folder)], check=True)
    return folder


def test_a_missing_failed_or_newer_run_is_refused_in_one_line(runs, tmp_path):
    with pytest.raises(InputError, match="no such run directory"):
        load_recommender(tmp_path / "missing")
    failed = copy_of(runs["rating"], tmp_path / "failed")
    status = json.loads((failed / "status.json").read_text())
    status |= {"status": "failed", "reason": "no site completed round 3"}
    (failed / "status.json").write_text(json.dumps(status))
    with pytest.raises(InputError, match="the run is failed: no site completed round 3"):
        load_recommender(failed)
    newer = copy_of(runs["rating"], tmp_path / "newer")
    manifest = json.loads((newer / "recommender.json").read_text()) | {"version": 99}
    (newer / "recommender.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="format version 99 is newer than this fedgraphrec"):
        load_recommender(newer)


def test_recommend_prints_a_table_or_json_and_errors_in_one_line(runs, capsys):
    run_dir = str(runs["rating"])
    assert main(["recommend", run_dir, "--data", "--user", "0", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["rank", "item", "predicted", "rating"] and len(table) == 4
    assert main(["recommend", run_dir, "--data", "--user", "0", "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["user"] == "0" and [r["rank"] for r in answer["items"]] == list(range(1, 11))
    assert main(["recommend", run_dir, "--data", "--user", "nobody"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("fedgraphrec: user 'nobody'") and "\n" not in error
    with pytest.raises(SystemExit) as exit_status:
        main(["recommend", run_dir, "--data", "--user", "0", "-k", "0"])
    assert exit_status.value.code == 2
    assert "expected a whole number >= 1" in capsys.readouterr().err


def test_serve_answers_over_http_until_stopped_by_its_pid(runs):
    port = free_port()
    command = [sys.executable, "-m", "cli", "serve", str(runs["ranking"]), "--data"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        env=child_environment(),
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/health").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, 60, "the recommendation service", every=0.5)
        health = httpx.get(f"{base}/health").json()
        assert health["items"] == 60 and health["users"] == 120
        top = httpx.get(f"{base}/users/0/recommendations", params={"k": 4}).json()["items"]
        assert [r["rank"] for r in top] == [1, 2, 3, 4]
        recommender = load_recommender(runs["ranking"])
        _, seen = a_user(runs["ranking"])
        body = {"interactions": [{"item": i, "rating": r} for i, r in seen], "k": 4}
        folded = httpx.post(f"{base}/recommendations", json=body).json()["items"]
        assert [r["item"] for r in folded] == [r["item"] for r in top]  # the filter: exact
        similar = httpx.get(f"{base}/items/{recommender.catalogue.item_ids[0]}/similar")
        assert len(similar.json()["items"]) == 10
        for path, status, message in (
            ("/users/nobody/recommendations", 404, "not a user of this site"),
            ("/items/nothing/similar", 404, "not in the run's catalogue"),
            ("/users/0/recommendations?k=0", 422, "k"),
        ):
            reply = httpx.get(base + path)
            assert reply.status_code == status and message in reply.json()["error"], path
        empty = httpx.post(f"{base}/recommendations", json={"interactions": []})
        assert empty.status_code == 422 and "interactions" in empty.json()["error"]
    finally:
        stop_process_tree(server.pid)
    assert server.wait(timeout=10) is not None


def test_a_rating_list_ranks_by_a_lower_bound_so_one_lucky_rating_does_not_top_it():
    """Item 2's released offset is the largest, from one rating; item 1's, a little
    smaller, from a hundred: item 1 comes first, and both show their predicted rating."""
    catalogue = Catalogue(("a", "b", "c"), None, (1.0, 2.0, 3.0, 4.0, 5.0))
    graph = ItemGraph(
        items=np.arange(3),
        degrees=np.array([100.0, 100.0, 1.0]),
        item_sums=np.array([0.0, 50.0, 0.8]),  # offsets 0, 0.5 and 0.8 (no shrinkage)
        global_mean=3.0,
        covariance=np.zeros((3, 3)),
    )
    config = default_config(item_graph="filter", dp=False)
    recommender = Recommender(config, catalogue, graph, None)
    top = recommender.recommend([("a", 3.0)], k=2)
    assert [r.item for r in top] == ["b", "c"]
    assert top[1].score > top[0].score  # shown: the predictions themselves
    np.testing.assert_allclose([r.score for r in top], recommender.predict([("a", 3.0)], "bc"))
