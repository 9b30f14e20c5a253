"""The seeded SAGE-style user sampler (SPEC section 3)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from psa_adapter.users import SPEC_MARGINALS, expected_marginals, profile_violations, read_users_csv, sample_profiles
from psa_adapter.users.sampler import rule_violations

SHARED = Path(__file__).resolve().parents[2] / "shared"
USERS_CSV = SHARED / "upstream-data" / "users" / "users.csv"
FIELDS = list(SPEC_MARGINALS)


@pytest.fixture(scope="module")
def spec_sample():
    return sample_profiles(10_000, seed=2025)


def marginals(profiles):
    out = {}
    for field in FIELDS:
        counts = Counter(getattr(p, field) for p in profiles)
        out[field] = {v: counts[v] / len(profiles) for v in SPEC_MARGINALS[field]}
    return out


def test_spec_marginals_within_002_over_10000(spec_sample):
    emp = marginals(spec_sample)
    worst = max(abs(emp[f][v] - p) for f in FIELDS for v, p in SPEC_MARGINALS[f].items())
    assert worst <= 0.02, worst
    # Every value actually occurs (no category silently dropped).
    assert all(emp[f][v] > 0 for f in FIELDS for v in SPEC_MARGINALS[f])


def test_no_rejection_rule_violations(spec_sample):
    assert [p.user_id for p in spec_sample if profile_violations(p)] == []
    ref = sample_profiles(2000, seed=1, method="reference")
    assert [p.user_id for p in ref if profile_violations(p)] == []


def test_ages_within_groups_and_ids(spec_sample):
    assert [p.user_id for p in spec_sample[:3]] == ["0000001", "0000002", "0000003"]
    assert min(p.age for p in spec_sample) == 0 and max(p.age for p in spec_sample) == 100


def test_deterministic_and_prefix_stable():
    a = sample_profiles(300, seed=7)
    assert a == sample_profiles(300, seed=7)
    assert a[:50] == sample_profiles(50, seed=7)
    assert a != sample_profiles(300, seed=8)


def test_rules_detect_each_violation():
    assert rule_violations(2, "infants & toddlers", "None", "depression")
    assert not rule_violations(2, "infants & toddlers", "None", "natural disasters")
    assert rule_violations(11, "children", "None", "sexual assault")
    assert rule_violations(17, "adolescents", "None", "war")
    assert not rule_violations(18, "adolescents", "None", "war")
    assert rule_violations(4, "children", "None", "anxiety")
    assert rule_violations(7, "children", "Islam", "healthy")
    assert not rule_violations(8, "children", "Islam", "healthy")


def test_expected_marginals_exact():
    exp = expected_marginals("spec")
    for f in FIELDS:
        for v, p in SPEC_MARGINALS[f].items():
            assert exp[f][v] == pytest.approx(p, abs=1e-9)
    # Plain rejection (the reference) loses most infants: about 0.8 % instead of 5 %.
    assert expected_marginals("reference")["age_group"]["infants & toddlers"] == pytest.approx(0.0083, abs=5e-4)
    with pytest.raises(ValueError, match="unknown sampler method 'x'"):
        sample_profiles(3, method="x")


def test_reference_method_matches_reference_users_csv():
    """Plain rejection explains the reference users' marginals (1,001 users: about 3 standard errors)."""
    if not SHARED.exists():
        pytest.skip("../shared (reference data) is not available")
    ref = marginals(read_users_csv(USERS_CSV))
    exp = expected_marginals("reference")
    worst = max(abs(ref[f][v] - exp[f][v]) for f in FIELDS for v in SPEC_MARGINALS[f])
    assert worst < 0.04, worst


def test_sampler_vocabulary_matches_profile_schema():
    from psa_adapter.users import AGE_GROUPS, GENDERS, MENTAL_CONDITIONS, PHYSICAL_CONDITIONS, RELIGIONS

    vocab = {"age_group": AGE_GROUPS, "gender": GENDERS, "religion": RELIGIONS,
             "physical_condition": PHYSICAL_CONDITIONS, "mental_condition": MENTAL_CONDITIONS}
    for field, values in vocab.items():
        assert set(SPEC_MARGINALS[field]) == set(values), field
        assert sum(SPEC_MARGINALS[field].values()) == pytest.approx(1.0), field
