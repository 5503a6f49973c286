"""The kept fraction of the non-private improvement: its arithmetic, its interval and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evaluation.kept import bootstrap_interval, compare, kept_fraction


def test_kept_fraction_for_measures_that_fall_and_that_rise():
    assert kept_fraction(0.30, 0.28, 0.26, better="lower") == (pytest.approx(0.5), None)
    assert kept_fraction(0.40, 0.52, 0.50, better="higher") == (pytest.approx(1.2), None)
    assert kept_fraction(0.30, 0.30, 0.26, better="lower")[0] == 0.0
    # a DP release that made things worse keeps a negative fraction, not zero
    assert kept_fraction(0.30, 0.32, 0.26, better="lower")[0] == pytest.approx(-0.5)


def test_no_fraction_when_the_nonprivate_run_did_not_improve():
    kept, why = kept_fraction(0.30, 0.28, 0.31, better="lower")
    assert kept is None and "did not improve" in why
    assert kept_fraction(0.5, 0.6, 0.5, better="higher")[0] is None
    with pytest.raises(ValueError, match="better"):
        kept_fraction(0.3, 0.2, 0.1, better="smaller")


def test_bootstrap_interval_covers_the_true_fraction_and_shrinks_with_more_images():
    rng = np.random.default_rng(1)

    def scores(n):
        base = rng.normal(1.0, 0.2, n)
        return {"base": base, "dp": base - 0.08 + rng.normal(0, 0.01, n), "nonprivate": base - 0.1 + rng.normal(0, 0.01, n)}

    small, large = bootstrap_interval(scores(50), "lower"), bootstrap_interval(scores(800), "lower")
    assert small[0] < 0.8 < small[1] and large[0] < 0.8 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 2
    # no improvement to speak of: the denominator changes sign across resamples, no interval
    flat = rng.normal(1.0, 0.2, 40)
    assert bootstrap_interval({"base": flat, "dp": flat + rng.normal(0, 0.1, 40),
                               "nonprivate": flat + rng.normal(0, 0.1, 40)}, "lower") is None


def _run_folder(path, *, private: bool, model: str = "assets/emoji-sd"):
    path.mkdir()
    (path / "run_config.json").write_text(json.dumps({"model-path": model, "resolution": 32}))
    (path / "privacy.json").write_text(json.dumps({"private": private, "epsilon": {"prv": 1.0 if private else None}}))
    (path / "learned_embeds.safetensors").write_bytes(b"")
    return path


def test_compare_refuses_runs_in_the_wrong_roles(tmp_path):
    dp, nonprivate = _run_folder(tmp_path / "dp", private=True), _run_folder(tmp_path / "np", private=False)
    other = _run_folder(tmp_path / "other", private=False, model="somewhere/else")
    with pytest.raises(ValueError, match="is not a private run"):
        compare(nonprivate, nonprivate, tmp_path)
    with pytest.raises(ValueError, match="must be non-private"):
        compare(dp, dp, tmp_path)
    with pytest.raises(ValueError, match="different models"):
        compare(dp, other, tmp_path)


def test_the_comparison_is_never_written_into_the_published_dp_folder(tmp_path, capsys):
    from evaluation.kept import main

    dp = _run_folder(tmp_path / "dp", private=True)
    with pytest.raises(SystemExit):
        main([str(dp), str(tmp_path / "np"), "--held-out", str(tmp_path), "--out", str(dp / "kept.json")])
    assert "inside the private run's folder" in capsys.readouterr().err
    assert not (dp / "kept.json").exists()
