"""Seeded sampler for synthetic SAGE-style users (SPEC section 3).

Each field is drawn independently from its specified distribution (age group first, then the age uniformly within
the group), and a profile that breaks a rejection rule is thrown away and drawn again as a whole.

Rejection changes the marginals: most infants and many children are rejected (they may not have a religion or most
mental conditions), so plain rejection gives about 0.8% infants instead of 5%. That is what the reference did
(its users.csv has 1.1% infants). Two methods:

- ``"spec"`` (default): the proposal weights of age group, religion and mental condition are calibrated once
  (iterative proportional fitting on the exact joint distribution) so that the *accepted* profiles have the
  specified marginals. Every rule still holds; what changes is the dependence between fields (for example an
  adult is a bit more likely to be religious than 70%, because young children never are).
- ``"reference"``: the specified probabilities as proposal weights with plain rejection, as upstream did. Its
  accepted marginals (see expected_marginals) match the reference users.csv, not the specified numbers.
"""

from __future__ import annotations

import numpy as np

from .profile import AGE_GROUPS, MENTAL_CONDITIONS, RELIGIONS, UserProfile

# Specified probabilities (SPEC section 3).
AGE_GROUP_PROBS: dict[str, float] = {
    "infants & toddlers": 0.05,
    "children": 0.20,
    "adolescents": 0.20,
    "young adults": 0.20,
    "middle-aged": 0.20,
    "young elderly": 0.10,
    "elderly": 0.04,
    "long-lived elderly": 0.01,
}
GENDER_PROBS: dict[str, float] = {"male": 0.5, "female": 0.5}
RELIGION_PROBS: dict[str, float] = {"Christianity": 0.3, "Islam": 0.2, "Buddhism": 0.2, "None": 0.3}
PHYSICAL_PROBS: dict[str, float] = {
    "visual impairment": 0.2,
    "hearing impairment": 0.2,
    "intellectual disability": 0.2,
    "healthy": 0.4,
}
MENTAL_PROBS: dict[str, float] = {
    "depression": 0.15,
    "anxiety": 0.15,
    "war": 0.075,
    "sexual assault": 0.075,
    "major accidents": 0.075,
    "natural disasters": 0.075,
    "healthy": 0.4,
}
SPEC_MARGINALS: dict[str, dict[str, float]] = {
    "age_group": AGE_GROUP_PROBS,
    "gender": GENDER_PROBS,
    "religion": RELIGION_PROBS,
    "physical_condition": PHYSICAL_PROBS,
    "mental_condition": MENTAL_PROBS,
}
METHODS = ("spec", "reference")
_CHUNK = 4096  # proposals per round; fixed so that sample_profiles(n)[:k] == sample_profiles(k)


def rule_violations(age: int, age_group: str, religion: str, mental_condition: str) -> list[str]:
    """The SAGE rejection rules that a profile breaks (empty list: the sampler may produce it).

    Rules (SPEC section 3): infants only healthy or natural disasters; children no war or sexual assault; war not
    under 18; sexual assault not under 10; major accidents, depression or anxiety not under 5; no religion under 8.
    These rules describe the synthetic population only; a real person's profile file is not checked against them.
    """
    out = []
    if age_group == "infants & toddlers" and mental_condition not in ("healthy", "natural disasters"):
        out.append(f"infants may only have mental condition healthy or natural disasters, not {mental_condition!r}")
    if age_group == "children" and mental_condition in ("war", "sexual assault"):
        out.append(f"children may not have mental condition {mental_condition!r}")
    if mental_condition == "war" and age < 18:
        out.append(f"mental condition 'war' under age 18 (age {age})")
    if mental_condition == "sexual assault" and age < 10:
        out.append(f"mental condition 'sexual assault' under age 10 (age {age})")
    if mental_condition in ("major accidents", "depression", "anxiety") and age < 5:
        out.append(f"mental condition {mental_condition!r} under age 5 (age {age})")
    if religion != "None" and age < 8:
        out.append(f"religion {religion!r} under age 8 (age {age})")
    return out


def profile_violations(profile: UserProfile) -> list[str]:
    """rule_violations for a UserProfile."""
    return rule_violations(profile.age, profile.age_group, profile.religion, profile.mental_condition)


# ----------------------------------------------------------------------------------------------------------------
# Exact joint distribution over (age, religion, mental condition); gender and physical condition are not touched by
# any rule, so they stay independent with their specified probabilities.

_GROUPS = list(AGE_GROUP_PROBS)
_AGES = np.arange(0, max(hi for _, hi in AGE_GROUPS.values()) + 1)
_GROUP_OF_AGE = np.array([next(i for i, g in enumerate(_GROUPS) if AGE_GROUPS[g][0] <= a <= AGE_GROUPS[g][1])
                          for a in _AGES])
_GROUP_SIZE = np.array([AGE_GROUPS[g][1] - AGE_GROUPS[g][0] + 1 for g in _GROUPS])
_REL = list(RELIGIONS)
_MEN = list(MENTAL_CONDITIONS)
# allowed[a, r, m]: built from rule_violations itself so that the rules live in one place.
_ALLOWED = np.array([[[not rule_violations(int(a), _GROUPS[_GROUP_OF_AGE[a]], r, m) for m in _MEN] for r in _REL]
                     for a in _AGES])


def _joint(group_w: np.ndarray, rel_w: np.ndarray, men_w: np.ndarray) -> np.ndarray:
    """Accepted joint probability over (age, religion, mental), shape (101, 4, 7), for given proposal weights."""
    age_w = group_w[_GROUP_OF_AGE] / _GROUP_SIZE[_GROUP_OF_AGE]
    joint = age_w[:, None, None] * rel_w[None, :, None] * men_w[None, None, :] * _ALLOWED
    return joint / joint.sum()


def _spec_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.array([AGE_GROUP_PROBS[g] for g in _GROUPS]), np.array([RELIGION_PROBS[r] for r in _REL]),
            np.array([MENTAL_PROBS[m] for m in _MEN]))


def _calibrated_weights(tol: float = 1e-12, max_iter: int = 10_000):
    """Proposal weights whose accepted marginals equal the specified ones (iterative proportional fitting)."""
    target_g, target_r, target_m = _spec_weights()
    g, r, m = target_g.copy(), target_r.copy(), target_m.copy()
    for _ in range(max_iter):
        joint = _joint(g, r, m)
        cur_g = np.bincount(_GROUP_OF_AGE, weights=joint.sum(axis=(1, 2)), minlength=len(_GROUPS))
        cur_r, cur_m = joint.sum(axis=(0, 2)), joint.sum(axis=(0, 1))
        err = max(abs(cur_g - target_g).max(), abs(cur_r - target_r).max(), abs(cur_m - target_m).max())
        if err < tol:
            return g / g.sum(), r / r.sum(), m / m.sum()
        g, r, m = g * target_g / cur_g, r * target_r / cur_r, m * target_m / cur_m
    raise RuntimeError(f"sampler calibration did not converge (max marginal error {err:.2e} after {max_iter} steps)")


_WEIGHTS_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _weights(method: str):
    if method not in METHODS:
        raise ValueError(f"unknown sampler method {method!r}; expected one of {list(METHODS)}")
    if method not in _WEIGHTS_CACHE:
        _WEIGHTS_CACHE[method] = _calibrated_weights() if method == "spec" else _spec_weights()
    return _WEIGHTS_CACHE[method]


def expected_marginals(method: str = "spec") -> dict[str, dict[str, float]]:
    """Exact marginals of the accepted profiles for a method: {field: {value: probability}}."""
    joint = _joint(*_weights(method))
    groups = np.bincount(_GROUP_OF_AGE, weights=joint.sum(axis=(1, 2)), minlength=len(_GROUPS))
    return {
        "age_group": dict(zip(_GROUPS, groups.tolist())),
        "gender": dict(GENDER_PROBS),
        "religion": dict(zip(_REL, joint.sum(axis=(0, 2)).tolist())),
        "physical_condition": dict(PHYSICAL_PROBS),
        "mental_condition": dict(zip(_MEN, joint.sum(axis=(0, 1)).tolist())),
    }


def sample_profiles(n: int, seed: int = 2025, *, method: str = "spec", start_id: int = 1) -> list[UserProfile]:
    """Draw `n` synthetic users (no banned list yet), ids f"{start_id + i:07d}".

    Deterministic for a given (seed, method); a longer draw extends a shorter one (the first k of n users equal
    sample_profiles(k)). See the module docstring for the two methods.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if start_id < 0 or start_id + n - 1 > 9_999_999:
        raise ValueError(f"user ids {start_id}..{start_id + n - 1} do not fit in 7 digits")
    group_w, rel_w, men_w = _weights(method)
    rng = np.random.default_rng(seed)
    lo = np.array([AGE_GROUPS[g][0] for g in _GROUPS])
    genders, physical = list(GENDER_PROBS), list(PHYSICAL_PROBS)
    gender_p, physical_p = np.array(list(GENDER_PROBS.values())), np.array(list(PHYSICAL_PROBS.values()))
    out: list[UserProfile] = []
    while len(out) < n:
        # One chunk of proposals, one field at a time in the spec's order.
        g = rng.choice(len(_GROUPS), size=_CHUNK, p=group_w)
        age = lo[g] + rng.integers(0, _GROUP_SIZE[g])
        sex = rng.choice(len(genders), size=_CHUNK, p=gender_p)
        rel = rng.choice(len(_REL), size=_CHUNK, p=rel_w)
        phy = rng.choice(len(physical), size=_CHUNK, p=physical_p)
        men = rng.choice(len(_MEN), size=_CHUNK, p=men_w)
        for i in np.flatnonzero(_ALLOWED[age, rel, men]):
            if len(out) == n:
                break
            out.append(UserProfile(
                user_id=f"{start_id + len(out):07d}",
                age=int(age[i]),
                age_group=_GROUPS[g[i]],
                gender=genders[sex[i]],
                religion=_REL[rel[i]],
                physical_condition=physical[phy[i]],
                mental_condition=_MEN[men[i]],
            ))
    return out
