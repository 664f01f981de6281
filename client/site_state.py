"""A site's persistent state: its privacy ledger and its private user embeddings.

Both live in one folder on the site's own disk and never leave it:

- ``ledger.json``: every round the site took part in, across runs
  (:class:`common.privacy.LedgerEntry`). The site appends an entry after
  training and before replying, so a crash never loses budget that was spent,
  and a later or resumed run composes with everything before it.
- ``private-user-embeddings.pt``: the ``p_u`` table keyed by user, so users
  keep their rows when the site's user list changes.

Files are replaced atomically (write, then rename).

Files are private to the site's operator (mode 0600, like keys).

In simulation the folder is ``<site-state-dir>/site<id>-<fingerprint>``: the
fingerprint hashes the catalogue's item ids and the site's user keys, and
nothing else (not the seed, the data path or the rating scale), so every later
run on the same users continues the same ledger (delete the folder to start a
fresh budget on synthetic data). A different partition gives other users to a
site and a new ledger, so in simulation a user's budget is only tracked while
they stay at one site.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from common.data.site import SiteData
from common.errors import InputError
from common.files import PRIVATE, replacing, write_json
from common.privacy import NEIGHBOURING_RELATION, PRIVACY_UNIT, LedgerEntry


class SiteState:
    """The state folder of one site (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @classmethod
    def in_simulation(cls, root: str | Path, site: SiteData) -> SiteState:
        """The state folder of a simulated site under ``root`` (``site-state-dir``)."""
        return cls(Path(root).expanduser() / f"site{site.site_id}-{users_fingerprint(site)}")

    @property
    def ledger_path(self) -> Path:
        return self.folder / "ledger.json"

    def ledger(self) -> list[LedgerEntry]:
        if not self.ledger_path.exists():
            return []
        content = json.loads(self.ledger_path.read_text())
        return [LedgerEntry.from_dict(e) for e in content["entries"]]

    def record(self, entry: LedgerEntry) -> None:
        """Append ``entry`` to the ledger, atomically."""
        write_json(
            self.ledger_path,
            {
                "privacy-unit": PRIVACY_UNIT,
                "neighbouring-relation": NEIGHBOURING_RELATION,
                "entries": [e.as_dict() for e in [*self.ledger(), entry]],
            },
            mode=PRIVATE,
        )

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


def users_fingerprint(site: SiteData) -> str:
    """Who the site's users are: a hash of the catalogue's item ids (which dataset) and of
    the site's sorted user keys (which people in it), and of nothing else."""
    digest = hashlib.sha256(json.dumps(list(site.catalogue.item_ids)).encode())
    digest.update(np.sort(np.asarray(site.user_keys, dtype=np.int64)).tobytes())
    return digest.hexdigest()[:12]
