"""The privacy statement follows from the facts: every fact that weakens the guarantee changes it."""

import itertools

import pytest

from common.config import AGGREGATIONS
from server.statement import SCHEMA_VERSION, PrivacyFacts, claim, log_line, privacy_statement


def facts(**overrides) -> PrivacyFacts:
    base = dict(private=True, units=("record",), epsilon={"record": {"prv": 0.999, "rdp": 1.118}}, delta=1e-5,
                adjacency={"record": "add/remove one image"}, aggregation="central", noise_by="server",
                randomness_secret=True, diagnostics=None, contribution="sum of bounded embeddings")
    return PrivacyFacts(**{**base, **overrides})


def test_a_private_central_release_states_its_epsilon_and_whom_it_trusts():
    out = privacy_statement(facts(), "This embedding")
    assert out["schema_version"] == SCHEMA_VERSION and out["dp_guarantee"] is True
    assert "(0.999, 1e-05)-differentially private at the level of **one image**" in out["statement"]
    assert "RDP accountant gives the looser epsilon 1.118" in out["statement"]
    assert "trusted" in out["statement"] and out["server_trusted_for"] == [
        "each site's sum of bounded embeddings (seen before the noise is added)"]
    assert out["privacy_randomness"] == "os" and out["noise_added_by"] == "server"


def test_a_seeded_run_claims_no_dp():
    out = privacy_statement(facts(randomness_secret=False), "This embedding")
    assert out["dp_guarantee"] is False and out["privacy_randomness"] == "seeded-insecure"
    text = out["statement"]
    assert text.startswith("**Not differentially private.**")
    assert "regenerate the noise" in text and "not a guarantee for this release" in text
    assert "differentially private at the level" not in text
    assert log_line({"private": True, "dp_guarantee": False, "epsilon": {"prv": 1.0, "rdp": 1.1}, "unit": "record",
                     "delta": 1e-5}).startswith("NOT PRIVATE")


def test_distributed_noise_refuses_seeded_randomness():
    with pytest.raises(ValueError, match="OS CSPRNG"):
        facts(aggregation="distributed", noise_by="sites", randomness_secret=False)


def test_diagnostics_are_named_as_not_covered():
    out = privacy_statement(facts(diagnostics="its mean loss"), "This embedding")
    assert "**not** covered" in out["statement"] and out["site_diagnostics"] is True
    assert "its mean loss" in out["statement"] and "its mean loss" in out["not_covered"]
    assert any("diagnostics" in item for item in out["server_trusted_for"])


def test_non_private_run():
    out = privacy_statement(facts(private=False), "This embedding")
    assert out["dp_guarantee"] is False and out["statement"].startswith("**No privacy guarantee.**")
    assert out["noise_added_by"] == "nobody"


def test_every_fact_changes_the_sentence():
    """No two different trust settings share a statement: nothing changes silently."""
    seen: dict[str, tuple] = {}
    for aggregation, secret, diagnostics, dropped in itertools.product(
            AGGREGATIONS, (True, False), ("its mean loss", None), (None, 1.7)):
        if aggregation == "distributed" and not secret:
            continue
        if dropped is not None and aggregation != "distributed":
            continue
        f = facts(aggregation=aggregation, noise_by="sites" if aggregation == "distributed" else "server",
                  randomness_secret=secret, diagnostics=diagnostics, smallest_noise_multiplier=dropped)
        text = claim(f, "This embedding")
        key = (aggregation, secret, diagnostics, dropped)
        if not secret:  # a seeded run says only that it is not private
            assert "Not differentially private" in text
            continue
        assert text not in seen, f"{key} and {seen.get(text)} give the same statement"
        seen[text] = key


def test_site_and_record_units_and_an_empirical_defense():
    f = facts(units=("site", "record"), epsilon={"site": {"prv": 0.9, "rdp": 1.0}, "record": {"prv": 2.5, "rdp": 3.0}},
              adjacency={"site": "add/remove one site", "record": "add/remove one image"}, contribution="clipped delta")
    text = claim(f, "This LoRA adapter")
    assert "**one site**" in text and "**one image**" in text and "2.500" in text
    assert "without trusting the server" not in text
    local = claim(PrivacyFacts(**{**f.__dict__, "record_noise_on_sites": True}), "This LoRA adapter")
    assert "(2.500, 1e-05)-DP at the level of **one image** (adjacency: add/remove one image; RDP: 3.000) without " \
           "trusting the server" in local
    smp = claim(facts(units=("site",), epsilon={"site": {"prv": 0.9, "rdp": 1.0}}, empirical_defense="SMP-LORA"),
                "This LoRA adapter")
    assert "empirical defence" in smp and "no formal guarantee" in smp
