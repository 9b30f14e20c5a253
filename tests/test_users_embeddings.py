"""User-embedding encoders (sentence, llm) and the embedding store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from psa_adapter.users import (
    EmbeddingDimensionError,
    EmbeddingStore,
    EmbeddingStoreError,
    MissingEmbeddingError,
    UserProfile,
    build_store,
    get_encoder,
    level_names,
    load_level,
    safety_statement,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_EMBEDDINGS = SHARED / "upstream-data" / "embeddings"


def person(**kw) -> UserProfile:
    base = dict(user_id="0000042", age=34, age_group="young adults", gender="female", religion="None",
                physical_condition="healthy", mental_condition="anxiety", banned=("Self-Harm", "Shocking"))
    return UserProfile(**{**base, **kw})


@pytest.fixture(scope="module")
def sentence():
    return get_encoder("sentence")


@pytest.fixture(scope="module")
def levels():
    return [load_level(n) for n in level_names()]


@pytest.fixture(scope="module")
def tiny_llm_encoder():
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from psa_adapter.users.encoders import minilm_model_dir

    tok = AutoTokenizer.from_pretrained(minilm_model_dir())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return get_encoder("llm", lm=LlamaForCausalLM(cfg), tokenizer=tok, bucket=16)


# -- statement -----------------------------------------------------------------------------------------------------

def test_safety_statement_lists_profile_banned_and_allowed():
    text = safety_statement(person())
    for part in ("34-year-old female", "Religion: none", "Mental condition: anxiety",
                 "Banned content categories: Self-Harm, Shocking.",
                 "Allowed content categories: Harassment, Hate, Propaganda, Sexuality, Violence."):
        assert part in text
    assert "Banned content categories: none." in safety_statement(person(banned=[]))
    with pytest.raises(ValueError, match="user 0000042 has no banned list"):
        safety_statement(person(banned=None))


# -- sentence encoder ----------------------------------------------------------------------------------------------

def test_sentence_encoder_info_and_shape(sentence, levels):
    info = sentence.info
    assert info["encoder_id"] == "sentence-transformers/all-MiniLM-L6-v2" and info["dim"] == sentence.dim == 384
    assert info["pooling"] == "masked_mean+l2_normalize" and len(info["template_hash"]) == 16
    vecs = sentence.encode(levels)
    assert vecs.shape == (6, 384) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert sentence.encode([]).shape == (0, 384)


def test_sentence_encoder_deterministic_and_batch_independent(sentence, levels):
    many = sentence.encode(levels + [person()], batch_size=3)
    assert np.array_equal(many, sentence.encode(levels + [person()], batch_size=3))
    # A user's vector does not depend on who shares the batch (bit-exact).
    for i in (0, 3, 5):
        assert np.array_equal(sentence.encode([levels[i]])[0], many[i])


def test_different_banned_sets_give_different_vectors(sentence, levels):
    vecs = sentence.encode(levels)
    diffs = [np.abs(vecs[i] - vecs[j]).max() for i in range(6) for j in range(i + 1, 6)]
    assert min(diffs) > 1e-3
    same_profile = sentence.encode([person(banned=["Hate"]), person(banned=["Violence"]), person(banned=[])])
    assert np.abs(same_profile[0] - same_profile[1]).max() > 1e-3
    assert np.abs(same_profile[0] - same_profile[2]).max() > 1e-3


def test_sentence_encoder_matches_sentence_transformers(sentence, levels):
    st = pytest.importorskip("sentence_transformers")
    from psa_adapter.users.encoders import minilm_model_dir

    model = st.SentenceTransformer(str(minilm_model_dir()), device="cpu")
    expected = model.encode([safety_statement(p) for p in levels], convert_to_numpy=True)
    assert np.allclose(sentence.encode(levels), expected, atol=1e-5)


def test_template_change_changes_hash(tmp_path, sentence):
    t = tmp_path / "statement.txt"
    t.write_text("User aged {age}. Banned: {banned}. Allowed: {allowed}.")
    enc = get_encoder("sentence", template=t)
    assert enc.info["template_hash"] != sentence.info["template_hash"]
    assert enc.statements([person()]) == ["User aged 34. Banned: Self-Harm, Shocking. Allowed: Harassment, Hate, "
                                          "Propaganda, Sexuality, Violence."]
    with pytest.raises(ValueError, match="unknown encoder 'bert'"):
        get_encoder("bert")


# -- llm encoder ---------------------------------------------------------------------------------------------------

def test_llm_encoder_masked_mean_of_last_hidden_state(tiny_llm_encoder, levels):
    import torch

    enc = tiny_llm_encoder
    assert enc.dim == 32 and enc.info["pooling"] == "masked_mean"
    vecs = enc.encode(levels, batch_size=4)
    assert vecs.shape == (6, 32) and vecs.dtype == np.float32
    assert np.array_equal(vecs, enc.encode(levels, batch_size=4))
    for i, p in enumerate(levels):
        assert np.array_equal(enc.encode([p])[0], vecs[i])
    # Against a direct unpadded forward pass: mean over all tokens of the last hidden state.
    ids = enc.tokenizer(safety_statement(levels[3]), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        hidden = enc.lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    assert np.allclose(vecs[3], hidden.mean(dim=0).numpy(), atol=1e-5)
    assert np.abs(vecs[0] - vecs[5]).max() > 1e-4


# -- store ---------------------------------------------------------------------------------------------------------

META = {"encoder_id": "test", "pooling": "masked_mean", "template_hash": "abc"}


def test_banned_oracle_encoder_is_the_multi_hot_banned_list(tmp_path, levels):
    enc = get_encoder("banned")
    vecs = enc.encode([person(banned=("Self-Harm", "Shocking")), person(banned=()), levels[-1]])
    assert vecs.dtype == np.float32 and vecs.shape == (3, 7) and enc.info["dim"] == 7
    # CATEGORIES order: Hate, Harassment, Violence, Self-Harm, Sexuality, Shocking, Propaganda.
    assert vecs[0].tolist() == [0, 0, 0, 1, 0, 1, 0] and vecs[1].tolist() == [0] * 7
    assert vecs[2].sum() == len(levels[-1].banned)
    store = build_store(enc, levels)
    store.save(tmp_path / "oracle.safetensors")
    assert EmbeddingStore.open(tmp_path / "oracle.safetensors").metadata["encoder_id"] == "banned-multihot"
    with pytest.raises(ValueError, match="user 0000042 has no banned list; assign one first"):
        enc.encode([person(banned=None)])


def test_store_round_trip_and_lookup(tmp_path, sentence, levels):
    store = build_store(sentence, levels)
    assert store.dim == 384 and store.user_ids == sorted(p.user_id for p in levels)
    assert store.metadata["encoder_id"] == sentence.info["encoder_id"]
    path = store.save(tmp_path / "store.safetensors")
    again = EmbeddingStore.open(path)
    assert again.metadata == store.metadata and again.user_ids == store.user_ids
    for uid in store.user_ids:
        assert np.array_equal(again[uid], store[uid]) and again[uid].shape == (384,)
    assert np.array_equal(again[501], again["0000501"])  # ints are zero-padded
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert again.get_many(["0000002", "0001001"]).shape == (2, 384)


def test_missing_user_is_a_readable_key_error(tmp_path):
    store = EmbeddingStore.from_arrays({"0000001": np.ones(4)}, META)
    path = store.save(tmp_path / "s.safetensors")
    store = EmbeddingStore.open(path)
    with pytest.raises(KeyError) as info:
        store["0000777"]
    assert isinstance(info.value, MissingEmbeddingError)
    assert "no embedding for user 0000777 in" in str(info.value) and str(path) in str(info.value)
    assert "0000777" not in store and "0000001" in store and len(store) == 1


def test_dimension_mismatch_is_explained():
    store = EmbeddingStore.from_arrays({"0000001": np.ones(384)}, META)
    store.check_dim(384)
    with pytest.raises(EmbeddingDimensionError, match=r"384-d vectors \(encoder test.*adapter 'x' expects 3584-d"):
        store.check_dim(3584, what="adapter 'x'")


def test_npy_folder_shapes_export_and_errors(tmp_path):
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "0000001.npy", np.arange(5, dtype=np.float32))
    np.save(folder / "0000002.npy", np.ones((1, 5), dtype=np.float32))
    np.save(folder / "0000003.npy", np.ones((1, 1, 5), dtype=np.float64))
    (folder / "notes.txt").write_text("ignored")
    store = EmbeddingStore.open(folder, metadata={"encoder_id": "Qwen/Qwen2.5-7B-Instruct"})
    assert store.dim == 5 and store.user_ids == ["0000001", "0000002", "0000003"]
    assert store["0000003"].dtype == np.float32 and store.metadata["encoder_id"] == "Qwen/Qwen2.5-7B-Instruct"
    out = store.export_npy(tmp_path / "out")
    assert np.load(out / "0000002.npy", allow_pickle=False).shape == (5,)
    assert np.array_equal(EmbeddingStore.open(out)["0000001"], np.arange(5, dtype=np.float32))

    np.save(folder / "0000004.npy", np.ones((2, 5), dtype=np.float32))
    with pytest.raises(EmbeddingStoreError, match=r"0000004.npy: expected shape .* got \(2, 5\)"):
        EmbeddingStore.open(folder)
    np.save(folder / "0000004.npy", np.ones(6, dtype=np.float32))
    with pytest.raises(EmbeddingStoreError, match="user 0000004 has a vector of size 6, but user 0000001 has size 5"):
        EmbeddingStore.open(folder)
    np.save(folder / "0000004.npy", np.array([np.nan] * 5, dtype=np.float32))
    with pytest.raises(EmbeddingStoreError, match="0000004.npy: contains NaN"):
        EmbeddingStore.open(folder)
    np.save(folder / "0000004.npy", np.ones(5, dtype=np.int64))
    with pytest.raises(EmbeddingStoreError, match="0000004.npy: expected a floating-point vector"):
        EmbeddingStore.open(folder)
    (folder / "0000004.npy").unlink()
    np.save(folder / "user4.npy", np.ones(5, dtype=np.float32))
    with pytest.raises(EmbeddingStoreError, match="user4.npy: expected a file named <7-digit User_ID>.npy"):
        EmbeddingStore.open(folder)
    with pytest.raises(EmbeddingStoreError, match="no <User_ID>.npy files"):
        EmbeddingStore.open((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_store_rejects_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones(3, dtype=np.float32)}, tmp_path / "weights.safetensors")
    with pytest.raises(EmbeddingStoreError, match="weights.safetensors: no 'psa_users' metadata"):
        EmbeddingStore.open(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(EmbeddingStoreError, match="junk.safetensors: not a readable safetensors file"):
        EmbeddingStore.open(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        EmbeddingStore.open(tmp_path / "nope.safetensors")
    with pytest.raises(EmbeddingStoreError, match="7-digit"):
        EmbeddingStore.from_arrays({"42": np.ones(3)}, META)
    with pytest.raises(EmbeddingStoreError, match="empty"):
        EmbeddingStore.from_arrays({}, META).save(tmp_path / "e.safetensors")


def test_store_metadata_is_json_in_safetensors_header(tmp_path):
    path = EmbeddingStore.from_arrays({"0000001": np.ones(3)}, META).save(tmp_path / "m.safetensors")
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    meta = json.loads(header["__metadata__"]["psa_users"])
    assert meta == {**META, "dim": 3, "format_version": 1}


def test_reference_npy_embeddings_import(tmp_path):
    if not SHARED.exists():
        pytest.skip("../shared (reference data) is not available")
    store = EmbeddingStore.open(REF_EMBEDDINGS)
    assert store.user_ids == ["0000001", "0000002"] and store.dim == 3584
    a, b = store["0000001"], store["0000002"]
    assert a.shape == (3584,) and a.dtype == np.float32
    assert 130 < np.linalg.norm(a) < 146  # README: L2 norms about 138, cosine 0.9946
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) == pytest.approx(0.9946, abs=1e-3)
    again = EmbeddingStore.open(store.save(tmp_path / "ref.safetensors"))
    assert np.array_equal(again["0000002"], np.load(REF_EMBEDDINGS / "0000002.npy", allow_pickle=False))
    with pytest.raises(EmbeddingDimensionError, match="3584-d"):
        again.check_dim(384)
