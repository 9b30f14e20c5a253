"""Banned-category policies: which of the seven categories a person wants blocked.

Interface: ``policy.banned_categories(profile) -> list[str]`` (canonical names, sorted alphabetically).
``get_policy("rules")`` is deterministic; ``get_policy("llm", model=...)`` asks a local chat model.
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Protocol

from .categories import CATEGORIES, UnknownCategoryError, normalize_category, normalize_category_list
from .profile import UserProfile

POLICY_NAMES = ("rules", "llm")


class BannedCategoryPolicy(Protocol):
    name: str

    def banned_categories(self, profile: UserProfile) -> list[str]: ...


# ----------------------------------------------------------------------------------------------------------------
# Rules

_UNDER_13 = ("infants & toddlers", "children")
_UNDER_20 = (*_UNDER_13, "adolescents")
_OVER_60 = ("young elderly", "elderly", "long-lived elderly")
_TRAUMA = ("war", "sexual assault", "major accidents", "natural disasters")
_DISTRESS = ("depression", "anxiety")

# (category, reason, predicate). Read off the reference labels in users.csv, which are a deterministic function of
# (age group, religion, physical, mental condition): 412 distinct combinations, each with a single banned set; age
# within the group and gender never matter. For every clause below the ban rate of the matching users is exactly 1,
# and a category is banned for no user that matches none of its clauses (agreement on all 1,001 users: 100%).
# They refine the reference prompt's rules: "minors" is split into under-13 (ban nearly everything) and
# adolescents (only Sexuality); "unstable mental condition" splits into distress (Self-Harm, Shocking) and trauma
# (Violence, plus Harassment/Sexuality for sexual assault and Propaganda for war); a religion bans Sexuality and
# Propaganda but not Hate; of the physical conditions only intellectual disability matters.
RULES: tuple[tuple[str, str, object], ...] = (
    ("Hate", "under 13", lambda p: p.age_group in _UNDER_13),
    ("Harassment", "intellectual disability", lambda p: p.physical_condition == "intellectual disability"),
    ("Harassment", "sexual assault", lambda p: p.mental_condition == "sexual assault"),
    ("Violence", "under 13", lambda p: p.age_group in _UNDER_13),
    ("Violence", "60 or older", lambda p: p.age_group in _OVER_60),
    ("Violence", "trauma (war, sexual assault, accidents, disasters)", lambda p: p.mental_condition in _TRAUMA),
    ("Self-Harm", "under 13", lambda p: p.age_group in _UNDER_13),
    ("Self-Harm", "depression or anxiety", lambda p: p.mental_condition in _DISTRESS),
    ("Sexuality", "under 20", lambda p: p.age_group in _UNDER_20),
    ("Sexuality", "follows a religion", lambda p: p.religion != "None"),
    ("Sexuality", "sexual assault", lambda p: p.mental_condition == "sexual assault"),
    ("Shocking", "under 13", lambda p: p.age_group in _UNDER_13),
    ("Shocking", "60 or older", lambda p: p.age_group in _OVER_60),
    ("Shocking", "depression, anxiety, accidents or disasters",
     lambda p: p.mental_condition in (*_DISTRESS, "major accidents", "natural disasters")),
    ("Propaganda", "follows a religion", lambda p: p.religion != "None"),
    ("Propaganda", "intellectual disability", lambda p: p.physical_condition == "intellectual disability"),
    ("Propaganda", "war", lambda p: p.mental_condition == "war"),
)


class RulesPolicy:
    """Deterministic policy: a category is banned when any of its RULES clauses matches the profile."""

    name = "rules"

    def explain(self, profile: UserProfile) -> dict[str, list[str]]:
        """{banned category: [reasons]} for a profile."""
        out: dict[str, list[str]] = {}
        for category, reason, predicate in RULES:
            if predicate(profile):
                out.setdefault(category, []).append(reason)
        return out

    def banned_categories(self, profile: UserProfile) -> list[str]:
        return sorted(self.explain(profile))


# ----------------------------------------------------------------------------------------------------------------
# LLM


class LLMReplyError(ValueError):
    """The model's reply holds no usable list of categories."""


def parse_category_reply(text: str) -> list[str]:
    """Extract the banned categories from a model's reply.

    Takes the last bracketed list in the reply (prose and code fences around it are fine), read as JSON, else as a
    Python literal, else as bare comma-separated names ([Hate, Violence]). Every item must be one of the seven
    categories (any case, hyphen or underscore); an unknown item or a reply with no list raises LLMReplyError.
    Returns canonical names sorted alphabetically, duplicates removed.
    """
    candidates = re.findall(r"\[[^\[\]]*\]", text)
    if not candidates:
        raise LLMReplyError(f"no [...] list of categories in the reply {text.strip()[:300]!r}")
    raw = candidates[-1]
    items = None
    for parse in (json.loads, ast.literal_eval):
        try:
            items = parse(raw)
            break
        except (ValueError, SyntaxError):
            continue
    if items is None:
        inner = raw[1:-1].strip()
        items = [s.strip().strip("'\"`").strip() for s in inner.split(",")] if inner else []
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise LLMReplyError(f"expected a list of category names, got {raw!r} in the reply {text.strip()[:300]!r}")
    out = []
    for s in items:
        try:
            out.append(normalize_category(s))
        except UnknownCategoryError:
            raise LLMReplyError(
                f"the reply names an unknown category {s!r} (expected names from {', '.join(CATEGORIES)}); "
                f"reply {text.strip()[:300]!r}"
            ) from None
    return list(normalize_category_list(sorted(set(out))))


def _resolve_model_source(model: str | os.PathLike, gguf_file: str | None) -> tuple[str, str | None]:
    """A .gguf file path becomes (folder, file name); folders and hub ids pass through."""
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        return str(path.parent), path.name
    return str(model), gguf_file


def load_causal_lm(model: str | os.PathLike, *, gguf_file: str | None = None, dtype=None, device: str = "cpu"):
    """Load a local Hugging Face causal LM and its tokenizer (a folder, a hub id in the local cache, or a .gguf
    file). No remote code is executed. Returns (model in eval mode, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = _resolve_model_source(model, gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32, **kwargs)
    except OSError as e:
        raise OSError(f"could not load the causal LM {model!r} (offline: give a local folder or a .gguf file): "
                      f"{e}") from e
    return lm.to(device).eval(), tokenizer


class LLMPolicy:
    """Ask a local chat model which categories to ban, with the prompt template in policy_prompt.txt
    (packaged in ``psa_adapter/users/resources/``).

    Decoding is greedy by default, so the answer is a function of (model, template, profile). The assistant's
    reply is started with `response_prefix` ("[" by default: small models then answer with a list instead of prose);
    the prefix is part of the parsed reply. A reply without a valid list raises LLMReplyError naming the user (never
    a silent fallback to another policy).
    Pass `model` (folder, cached hub id or .gguf path) or a ready `lm` plus `tokenizer`.
    """

    name = "llm"

    def __init__(self, model: str | os.PathLike | None = None, *, gguf_file: str | None = None, lm=None,
                 tokenizer=None, template: str | os.PathLike | None = None, max_new_tokens: int = 64,
                 response_prefix: str = "[", do_sample: bool = False, device: str = "cpu", dtype=None):
        from ._templates import load_template, template_hash

        if lm is None:
            if model is None:
                raise ValueError("the llm policy needs model=<local folder, cached hub id or .gguf file>")
            lm, tokenizer = load_causal_lm(model, gguf_file=gguf_file, dtype=dtype, device=device)
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with lm=")
        self.lm, self.tokenizer = lm, tokenizer
        self.template, self.template_path = load_template(
            template, "policy_prompt.txt",
            {"user_id", "age", "age_group", "gender", "religion", "physical_condition", "mental_condition",
             "categories"},
        )
        self.max_new_tokens, self.do_sample, self.response_prefix = max_new_tokens, do_sample, response_prefix
        self.info = {"policy": "llm", "model": str(model) if model is not None else type(lm).__name__,
                     "gguf_file": gguf_file, "template_hash": template_hash(self.template),
                     "max_new_tokens": max_new_tokens, "response_prefix": response_prefix, "do_sample": do_sample}

    def prompt(self, profile: UserProfile) -> str:
        """The filled template for one profile (the user message)."""
        from ._templates import profile_text_fields

        return self.template.format(**profile_text_fields(profile, need_banned=False))

    def reply(self, profile: UserProfile) -> str:
        """The model's reply for one profile (starting with the response prefix)."""
        import torch

        message = self.prompt(profile)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                           tokenize=False)
            enc = tok(text + self.response_prefix, return_tensors="pt", add_special_tokens=False)
        else:
            # Base models without a chat template get the plain prompt.
            enc = tok(message + "\n" + self.response_prefix, return_tensors="pt")
        # Only ids and mask: BERT-style tokenizers add token_type_ids, which causal LMs reject.
        enc = {k: enc[k].to(self.lm.device) for k in ("input_ids", "attention_mask")}
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.inference_mode():
            out = self.lm.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                   pad_token_id=pad_id)
        return self.response_prefix + tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    def banned_categories(self, profile: UserProfile) -> list[str]:
        text = self.reply(profile)
        try:
            return parse_category_reply(text)
        except LLMReplyError as e:
            raise LLMReplyError(f"user {profile.user_id}: {e}") from None


def get_policy(name: str, **kwargs) -> BannedCategoryPolicy:
    """Build a policy by name: "rules" (no arguments) or "llm" (see LLMPolicy for the arguments)."""
    if name == "rules":
        if kwargs:
            raise TypeError(f"the rules policy takes no arguments, got {sorted(kwargs)}")
        return RulesPolicy()
    if name == "llm":
        return LLMPolicy(**kwargs)
    raise ValueError(f"unknown policy {name!r}; expected one of {list(POLICY_NAMES)}")


def assign_banned(policy: BannedCategoryPolicy, profiles, *, progress: bool = False) -> list[UserProfile]:
    """Copies of `profiles` with the banned list the policy gives each one."""
    from tqdm.auto import tqdm

    profiles = list(profiles)
    it = tqdm(profiles, desc=f"assign ({policy.name})", unit="user", disable=not progress)
    return [p.with_banned(policy.banned_categories(p)) for p in it]


# ----------------------------------------------------------------------------------------------------------------
# Agreement


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def agreement(policy: BannedCategoryPolicy, profiles, *, progress: bool = False) -> dict:
    """Compare a policy's banned sets with the labels already in `profiles`.

    Returns {"n_users", "exact_match" (share of users whose banned set is identical), "micro": {precision, recall,
    f1} over all (user, category) decisions, "per_category": {category: {tp, fp, fn, support, precision, recall}},
    "mismatched_users": [user ids]}. Precision/recall are None where undefined (no predicted/true positives).
    """
    from tqdm.auto import tqdm

    profiles = list(profiles)
    if not profiles:
        raise ValueError("agreement needs at least one labelled profile")
    counts = {c: {"tp": 0, "fp": 0, "fn": 0} for c in CATEGORIES}
    exact, mismatched = 0, []
    for p in tqdm(profiles, desc=f"agreement ({policy.name})", unit="user", disable=not progress):
        if p.banned is None:
            raise ValueError(f"user {p.user_id} has no reference banned list to compare with")
        pred, true = set(policy.banned_categories(p)), set(p.banned)
        if pred == true:
            exact += 1
        else:
            mismatched.append(p.user_id)
        for c in CATEGORIES:
            counts[c]["tp"] += c in pred and c in true
            counts[c]["fp"] += c in pred and c not in true
            counts[c]["fn"] += c not in pred and c in true
    per_category = {}
    for c, k in counts.items():
        per_category[c] = {**k, "support": k["tp"] + k["fn"], "precision": _ratio(k["tp"], k["tp"] + k["fp"]),
                           "recall": _ratio(k["tp"], k["tp"] + k["fn"])}
    tp, fp, fn = (sum(k[x] for k in counts.values()) for x in ("tp", "fp", "fn"))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {"n_users": len(profiles), "exact_match": exact / len(profiles),
            "micro": {"precision": precision, "recall": recall, "f1": f1},
            "per_category": per_category, "mismatched_users": mismatched}
