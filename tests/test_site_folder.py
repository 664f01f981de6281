"""Site data folders (`fedgraphrec partition`), the deployment loader and `fedgraphrec certs`."""

from __future__ import annotations

import ipaddress
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

from cli import main as fedgraphrec
from client.site_round import SiteRound
from common.config import default_config
from common.data import load_dataset, load_site
from common.data.dataset import Catalogue
from common.data.site_folder import (
    load_catalogue_folder,
    load_site_folder,
    write_catalogue_folder,
)
from common.errors import InputError
from common.protocol import instruction_values

OVERRIDES = "synthetic-users=90 synthetic-items=40"
ML_100K = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "ml-100k"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = tmp_path_factory.mktemp("partition") / "sites"
    assert fedgraphrec(["partition", "--sites", "3", "--out", str(out), "-c", OVERRIDES]) == 0
    return out


def by_user_key(site, part):
    return sorted(
        (int(site.user_keys[u]), int(i), float(r))
        for u, i, r in zip(part.user, part.item, part.rating, strict=True)
    )


def test_a_site_folder_holds_exactly_the_sites_users(folders):
    config = default_config(synthetic_users=90, synthetic_items=40)
    dataset = load_dataset(config)
    for site_id in range(3):
        simulated = load_site(config, site_id, 3)
        deployed = load_site_folder(folders / f"site-{site_id}")
        assert deployed.site_id == site_id
        # Same users in the same order, keyed by their original ids in both.
        np.testing.assert_array_equal(deployed.user_keys, simulated.user_keys)
        for name in ("train", "val", "test"):
            assert by_user_key(deployed, getattr(deployed, name)) == by_user_key(
                simulated, getattr(simulated, name)
            )
        np.testing.assert_array_equal(deployed.user_features, simulated.user_features)
    catalogue = load_catalogue_folder(folders / "catalogue")
    assert catalogue.fingerprint() == dataset.catalogue.fingerprint()


@pytest.mark.skipif(not ML_100K.is_dir(), reason=f"MovieLens-100K not found at {ML_100K}")
def test_movielens_site_folders_load_with_their_user_features(tmp_path):
    """The README's walkthrough on MovieLens-100K: users.csv names features like gender:F."""
    out = tmp_path / "fed"
    arguments = ["--dataset", "ml-100k", "--data-path", str(ML_100K), "--sites", "2"]
    assert fedgraphrec(["partition", *arguments, "--out", str(out)]) == 0
    for site_id in range(2):
        site = load_site_folder(out / f"site-{site_id}")
        names = site.catalogue.user_feature_names
        gender = site.user_features[:, [names.index("gender:F"), names.index("gender:M")]]
        np.testing.assert_array_equal(gender.sum(axis=1), 1.0)


def test_a_changed_file_fails_its_checksum(folders, tmp_path):
    copy = tmp_path / "site"
    copy.mkdir()
    for path in (folders / "site-0").rglob("*"):
        target = copy / path.relative_to(folders / "site-0")
        if path.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(path.read_bytes())
    with open(copy / "train.csv", "a") as f:
        f.write("0,0,5.0,0\n")
    with pytest.raises(InputError, match=r"train.csv: differs from the SHA-256 in manifest.json"):
        load_site_folder(copy)


def test_a_missing_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"not a site folder: expected manifest\.json"):
        load_site_folder(tmp_path / "nowhere")


def instruction(fingerprint: str) -> dict:
    return instruction_values(default_config(), "r", fingerprint, server_round=1)


def test_a_site_checks_it_holds_the_servers_catalogue(folders):
    node = {"data-path": str(folders / "site-1")}
    right = load_catalogue_folder(folders / "catalogue").fingerprint()
    site_round = SiteRound.open(node, instruction(right))
    assert site_round.site.site_id == 1
    assert site_round.state.folder == folders / "site-1" / "state"
    with pytest.raises(InputError, match="catalogue differs from the server's"):
        SiteRound.open(node, instruction("0" * 64))
    with pytest.raises(InputError, match="node_config: expected data-path"):
        SiteRound.open({}, instruction(right))


def test_partition_refuses_a_folder_in_use(folders, capsys):
    assert fedgraphrec(["partition", "--sites", "2", "--out", str(folders)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_what_was_derived_from_the_data_travels_with_the_catalogue(tmp_path, capsys):
    """Without DP, csv data may lack a catalogue and scale: check-data says so, and the
    catalogue folder records it; under DP (the default) both commands refuse such data."""
    data = tmp_path / "ratings.csv"
    data.write_text("user,item,rating\na,1,4\na,2,3\nb,2,5\nb,3,1\nc,1,2\n")
    keys = f'dataset="csv" data-path="{data}" split-fraction-per="dataset"'
    without_dp = ["--sites", "1", "-c", f"{keys} dp=false"]
    assert fedgraphrec(["check-data", "--sites", "1", "-c", keys]) == 2
    assert 'rating-scale = "1..5"' in capsys.readouterr().err
    assert fedgraphrec(["check-data", *without_dp]) == 0
    assert "derived       item ids, rating scale taken from the data" in capsys.readouterr().out
    out = tmp_path / "sites"
    assert fedgraphrec(["partition", *without_dp, "--out", str(out)]) == 0
    catalogue = load_catalogue_folder(out / "catalogue")
    assert catalogue.derived_from_data == ("item ids", "rating scale")
    assert catalogue.fingerprint() == replace(catalogue, derived_from_data=()).fingerprint()
    assert load_site_folder(out / "site-0").catalogue == catalogue
    public = f'{keys} rating-scale="1..5"'
    assert fedgraphrec(["check-data", "--sites", "1", "-c", f"{public} dp=false"]) == 0
    assert "derived       item ids taken from the data" in capsys.readouterr().out


def test_a_catalogue_folder_written_by_hand(tmp_path):
    (tmp_path / "items.csv").write_text("item\nb\na\n")
    (tmp_path / "catalogue.json").write_text('{"rating-levels": [1, 2, 3]}')
    catalogue = load_catalogue_folder(tmp_path)
    assert (catalogue.item_ids, catalogue.item_text) == (("b", "a"), None)  # the file's order
    assert catalogue.user_feature_names == catalogue.derived_from_data == ()
    (tmp_path / "catalogue.json").write_text('{"rating-levels": [1, 2, 2]}')
    with pytest.raises(InputError, match=r"catalogue.json: field 'rating-levels': .*listed twice"):
        load_catalogue_folder(tmp_path)
    (tmp_path / "catalogue.json").write_text('{"levels": [1, 2]}')
    with pytest.raises(InputError, match=r"catalogue.json: expected JSON with 'rating-levels'"):
        load_catalogue_folder(tmp_path)


def test_certificates_for_tls_and_node_authentication(tmp_path):
    out = tmp_path / "certs"
    hosts = ["127.0.0.1", "localhost", "coordinator.example.org"]
    assert fedgraphrec(["certs", "--out", str(out), "--hosts", *hosts, "--sites", "2"]) == 0
    for private in ("ca.key", "server.key", "sites/site-0", "sites/site-1"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == hosts[1:]
    key = load_ssh_private_key((out / "sites" / "site-0").read_bytes(), None)
    public = load_ssh_public_key((out / "sites" / "site-0.pub").read_bytes())
    assert isinstance(key.curve, ec.SECP384R1) and key.public_key() == public
    assert fedgraphrec(["certs", "--out", str(out), "--hosts", "localhost", "--sites", "1"]) == 2


def test_a_catalogue_folder_keeps_its_items_in_the_order_written(tmp_path):
    """A run's model has one row per item in the catalogue's order (LightGCN's item_list
    is not sorted): reading the folder back must not reorder it."""
    catalogue = Catalogue(("20", "3", "100"), ("c", "a", "b"), (1.0,))
    write_catalogue_folder(catalogue, "ids-unsorted", tmp_path)
    assert load_catalogue_folder(tmp_path) == catalogue
