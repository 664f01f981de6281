"""The released item graph travels to each site once: later instructions name it by its
fingerprint, the site keeps a copy in its state folder, and a site that failed gets the
bytes again."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message
from flwr.common import FitIns, Parameters
from flwr.supercore.task_identity import TaskIdentity
from test_malicious_sites import release_for
from test_strategy import global_arrays, metadata_from, reply_from, site_update

from client.site_state import STALE_RELEASE_SECONDS, SiteState
from common.errors import InputError
from common.graph.release import ItemGraph, contribution
from common.model import build_model
from common.protocol import ITEM_GRAPH, ITEM_GRAPH_FINGERPRINT
from server.round_book import RoundBook
from server.secure_aggregation import SecureSumStrategy
from server.strategy import ItemSideFedAvg

NODES = (1, 2, 3)


class Grid:
    """What ``ItemSideFedAvg.configure_train`` asks of Flower's grid: the connected nodes."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def released(release, server_round: int, sites) -> None:
    """Release round ``server_round`` from the sites' exact statistics."""
    config = release.config
    total = sum(contribution(config, site, server_round, release.graph) for site in sites)
    release.add(server_round, total, len(sites))


def instructions(strategy: ItemSideFedAvg, server_round: int) -> dict[int, Message]:
    config = ConfigRecord({"server-round": server_round})
    messages = strategy.configure_train(server_round, global_arrays(), config, Grid())
    return {m.metadata.dst_node_id: m for m in messages}


def carries_bytes(message: Message) -> bool:
    return ITEM_GRAPH in message.content["config"]


def test_the_release_travels_once_to_each_site_and_again_after_a_failure(tmp_path, monkeypatch):
    for key in ("_run_id", "_node_id", "_task_id"):  # a ServerApp's run sets them
        monkeypatch.setattr(TaskIdentity, key, 1)
    release, sites = release_for(tmp_path, task="ranking", dp=False)
    strategy = ItemSideFedAvg(
        global_arrays(), dp=False, min_sites=len(NODES), book=RoundBook(), release=release
    )
    assert all(
        ITEM_GRAPH_FINGERPRINT not in m.content["config"]
        for m in instructions(strategy, 1).values()
    )

    released(release, 1, sites)
    first = instructions(strategy, 2)
    assert all(carries_bytes(m) for m in first.values())
    assert first[1].content is first[2].content  # serialised and hashed once
    fingerprint = first[1].content["config"][ITEM_GRAPH_FINGERPRINT]
    assert fingerprint == ItemGraph.fingerprint(first[1].content["config"][ITEM_GRAPH])
    failed = Message(Error(code=0, reason="boom"), metadata=metadata_from(2, reply_to="to-2"))
    strategy.received(2, [reply_from(1, site_update(1.0), {"site-id": 0}), failed])  # 3: silent

    later = instructions(strategy, 3)
    assert {n: carries_bytes(m) for n, m in later.items()} == {1: False, 2: True, 3: True}
    assert all(m.content["config"][ITEM_GRAPH_FINGERPRINT] == fingerprint for m in later.values())
    assert "server-round" in later[1].content["config"] and "arrays" in later[1].content
    strategy.received(3, [reply_from(n, site_update(1.0), {"site-id": n}) for n in NODES])
    assert not any(carries_bytes(m) for m in instructions(strategy, 4).values())
    failed = Message(Error(code=0, reason="lost"), metadata=metadata_from(1, reply_to="to-1"))
    strategy.received(4, [failed] + [reply_from(n, site_update(1.0), {}) for n in (2, 3)])
    after = instructions(strategy, 5)  # a site that held the release and failed may have lost it
    assert {n: carries_bytes(m) for n, m in after.items()} == {1: True, 2: False, 3: False}

    released(release, 2, sites)  # a new release: every site needs its bytes
    newest = instructions(strategy, 6)
    assert all(carries_bytes(m) for m in newest.values())
    assert newest[1].content["config"][ITEM_GRAPH_FINGERPRINT] != fingerprint


def test_the_secure_sum_strategy_sends_the_release_once_to_each_site_too(tmp_path):
    release, sites = release_for(tmp_path, task="ranking", dp=False)
    model = build_model(release.catalogue, release.config)
    strategy = SecureSumStrategy(
        model,
        release.config,
        release.mechanism,
        {"run-name": "r"},
        release.out,
        RoundBook(),
        release,
    )
    released(release, 1, sites)
    proxies = {n: SimpleNamespace(node_id=n) for n in NODES}
    every = [(proxy, FitIns(Parameters([], ""), {"server-round": 2})) for proxy in proxies.values()]

    def carrying(instructions) -> dict[int, bool]:
        return {proxy.node_id: ITEM_GRAPH in ins.config for proxy, ins in instructions}

    assert carrying(strategy.with_graph(every)) == {1: True, 2: True, 3: True}
    strategy.replied([(proxies[1], None), (proxies[3], None)])  # 2 dropped out
    later = strategy.with_graph(every)
    assert carrying(later) == {1: False, 2: True, 3: False}
    assert all(ins.config["server-round"] == 2 for _, ins in later)


def test_a_site_keeps_the_release_and_reads_it_back_by_fingerprint(tmp_path):
    payload = ItemGraph(degrees=np.arange(5.0)).to_bytes()
    fingerprint = ItemGraph.fingerprint(payload)
    state = SiteState(tmp_path / "site")
    path = state.item_graph(fingerprint, payload)
    assert path.read_bytes() == payload
    assert state.item_graph(fingerprint, None) == path  # a later instruction names it only
    np.testing.assert_array_equal(ItemGraph.from_bytes(path.read_bytes()).degrees, np.arange(5.0))

    with pytest.raises(InputError, match="do not hash to the fingerprint"):
        state.item_graph(fingerprint, payload + b"x")
    with pytest.raises(InputError, match=r"missing; .* sends the bytes again"):
        SiteState(tmp_path / "new site").item_graph(fingerprint, None)


def test_a_new_release_removes_copies_no_run_has_used_for_an_hour(tmp_path):
    state = SiteState(tmp_path / "site")
    old, recent = (tmp_path / "site" / f"item-graph-{name}.npz" for name in ("old", "recent"))
    for path in (old, recent):
        path.write_bytes(b"")
    stale = time.time() - STALE_RELEASE_SECONDS - 60
    os.utime(old, (stale, stale))
    payload = ItemGraph(degrees=np.ones(3)).to_bytes()
    kept = state.item_graph(ItemGraph.fingerprint(payload), payload)
    assert kept.exists() and recent.exists() and not old.exists()
