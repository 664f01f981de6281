"""A site's persistent state: its privacy ledger, its private user embeddings, and its
copy of the released item graph.

The first two live on the site's own disk and never leave it:

- ``ledger.json``: every release the site made (statistics, DP-SGD, metrics),
  across runs (:class:`common.privacy.LedgerEntry`). The site appends an entry
  after computing and before replying, so a crash never loses budget that was
  spent, and a later or resumed run composes with everything before it. A
  release recorded twice (the same run, round and release) is one release.
- ``private-user-embeddings.pt``: the ``p_u`` table keyed by user, so users
  keep their rows when the site's user list changes.

The released item graph (public: the server released it) is kept next to the
ledger as ``item-graph-<fingerprint>.npz``, so that later instructions need only
name it (:meth:`SiteState.item_graph`); in simulation the dataset's sites share one
copy. A copy unused for :data:`STALE_RELEASE_SECONDS` is removed when another is
written.

Files are replaced atomically (write, then rename) under an exclusive lock,
and are private to the site's operator (mode 0600, like keys).

**Whose budget a ledger tracks.** Never a set of users: a ledger that follows
who the users are starts again from zero when one user is added, or when a new
partition moves users between sites.

- Deployment: the site's identity, its state folder ``<data-path>/state``.
- Simulation: the dataset. Every simulated site of every run on a dataset
  shares one ledger, ``<site-state-dir>/dataset-<fingerprint>/ledger.json``,
  the fingerprint hashing the catalogue's item ids and nothing else (not the
  seed, the partition, the users, the data path or the rating scale). A new seed
  or partition can move any user to any site, so every user is charged every
  release any site made: each run's largest per-site epsilon, composed over
  runs. Delete the folder to start a fresh budget on synthetic data.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from common.data.site import SiteData
from common.errors import InputError
from common.files import PRIVATE, replacing, write_json
from common.graph.release import ItemGraph
from common.privacy import NEIGHBOURING_RELATION, PRIVACY_UNIT, LedgerEntry

STALE_RELEASE_SECONDS = 3600.0
"""How long an item graph copy stays unused before a newer one replaces it on disk."""


class SiteState:
    """The state of one site (see the module docstring).

    Args:
        folder: the site's own folder (private embeddings; the ledger by default).
        ledger_path: the ledger, when it lives elsewhere (shared in simulation).
    """

    def __init__(self, folder: Path, ledger_path: Path | None = None) -> None:
        self.folder = folder
        self.ledger_path = ledger_path or folder / "ledger.json"
        for path in (folder, self.ledger_path.parent):
            path.mkdir(mode=0o700, parents=True, exist_ok=True)

    @classmethod
    def in_simulation(cls, root: str | Path, site: SiteData) -> SiteState:
        """The state of a simulated site under ``root`` (``site-state-dir``): its folder
        and the dataset's shared ledger."""
        dataset = Path(root).expanduser() / f"dataset-{dataset_fingerprint(site)}"
        return cls(dataset / f"site{site.site_id}", dataset / "ledger.json")

    def ledger(self) -> list[LedgerEntry]:
        if not self.ledger_path.exists():
            return []
        content = json.loads(self.ledger_path.read_text())
        return [LedgerEntry.from_dict(e) for e in content["entries"]]

    def record(self, entry_after: Callable[[list[LedgerEntry]], LedgerEntry]) -> LedgerEntry:
        """Append the entry ``entry_after(earlier entries)`` to the ledger, under the
        ledger's lock, and return it. A release the ledger already holds (same run,
        round and release, as every simulated site of a round records) is kept once:
        a made release replaces a declined one, and is never counted twice."""
        with self._locked():
            entries = self.ledger()
            entry = entry_after(entries)
            same = [e for e in entries if e.same_release(entry)]
            if same and (same[0].trained or not entry.trained):
                return same[0]
            entries = [e for e in entries if not e.same_release(entry)]
            write_json(
                self.ledger_path,
                {
                    "privacy-unit": PRIVACY_UNIT,
                    "neighbouring-relation": NEIGHBOURING_RELATION,
                    "entries": [e.as_dict() for e in [*entries, entry]],
                },
                mode=PRIVATE,
            )
            return entry

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the ledger, across processes (simulated sites run in
        parallel and share it)."""
        lock = self.ledger_path.with_name(self.ledger_path.name + ".lock")
        descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, PRIVATE)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the lock

    def item_graph(self, fingerprint: str, payload: bytes | None) -> Path:
        """The file of the item graph release that an instruction names by ``fingerprint``:
        written from ``payload``, the release's bytes, when the instruction carries them
        (which must hash to ``fingerprint``), else the copy kept from an earlier
        instruction. Raises :class:`InputError` when the bytes do not match, or when
        the site holds no such copy (the server then sends the bytes again with the
        site's next instruction, ``server.item_graph.GraphRelease``)."""
        path = self.ledger_path.parent / f"item-graph-{fingerprint}.npz"
        if payload is not None:
            if ItemGraph.fingerprint(payload) != fingerprint:
                raise InputError(
                    f"instruction: the item graph's bytes do not hash to the fingerprint "
                    f"{fingerprint[:12]} it names; the release was damaged in transit"
                )
            with self._locked():  # simulated sites share the copy
                if not path.exists():
                    with replacing(path) as tmp:
                        tmp.write_bytes(payload)
                    remove_stale_releases(path)
        elif not path.exists():
            raise InputError(
                f"{path}: missing; the instruction names the item graph release "
                f"{fingerprint[:12]} without its bytes, and this site holds no copy of it "
                "(a new or cleared state folder); the server sends the bytes again with "
                "this site's next instruction"
            )
        path.touch()  # in use: not stale
        return path

    @property
    def private_path(self) -> Path:
        return self.folder / "private-user-embeddings.pt"

    def private_embeddings(self, user_keys: np.ndarray, dim: int) -> torch.Tensor:
        """The ``[users, dim]`` table in the order of ``user_keys`` (zeros for new users)."""
        table = torch.zeros(len(user_keys), dim)
        if not self.private_path.exists():
            return table
        saved = torch.load(self.private_path)
        if saved["embedding"].shape[1] != dim:
            raise InputError(
                f"{self.private_path}: private embeddings of size {saved['embedding'].shape[1]}, "
                f"but embedding-dim is {dim}; move the file away to start them afresh"
            )
        row_of = {key: row for row, key in enumerate(saved["user-keys"].tolist())}
        for row, key in enumerate(user_keys.tolist()):
            if key in row_of:
                table[row] = saved["embedding"][row_of[key]]
        return table

    def save_private_embeddings(self, user_keys: np.ndarray, table: torch.Tensor) -> None:
        with replacing(self.private_path, PRIVATE) as tmp:
            torch.save(
                {"user-keys": torch.as_tensor(user_keys), "embedding": table.detach().cpu()}, tmp
            )


def dataset_fingerprint(site: SiteData) -> str:
    """Which dataset a simulated site is cut from: a hash of the catalogue's item ids."""
    return hashlib.sha256(json.dumps(list(site.catalogue.item_ids)).encode()).hexdigest()[:12]


def remove_stale_releases(kept: Path) -> None:
    """Remove the item graph copies beside ``kept`` that no run has used for
    :data:`STALE_RELEASE_SECONDS` (each use touches its copy)."""
    now = time.time()
    for path in kept.parent.glob("item-graph-*.npz"):
        if path != kept and now - path.stat().st_mtime > STALE_RELEASE_SECONDS:
            path.unlink(missing_ok=True)
