"""Profiles, categories, the users.csv format, profile files and levels (psa_adapter.users)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from psa_adapter.users import (
    CATEGORIES,
    ProfileError,
    UnknownCategoryError,
    UnknownLevelError,
    UserProfile,
    category_slug,
    level_names,
    load_level,
    load_profile,
    normalize_category,
    read_users_csv,
    save_profile,
    write_users_csv,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
USERS_CSV = SHARED / "upstream-data" / "users" / "users.csv"
HEADER = "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories\n"


def needs_shared():
    if not SHARED.exists():
        pytest.skip("../shared (reference data) is not available")


def make(**kw) -> UserProfile:
    base = dict(user_id="0000042", age=34, age_group="young adults", gender="female", religion="None",
                physical_condition="healthy", mental_condition="anxiety", banned=("Self-Harm", "Shocking"))
    return UserProfile(**{**base, **kw})


def write(tmp_path, text, name="u.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- categories ----------------------------------------------------------------------------------------------------

def test_categories_canonical_and_variants():
    assert CATEGORIES == ("Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda")
    for variant in ("self-harm", "SELF_HARM", "Self Harm", " selfharm "):
        assert normalize_category(variant) == "Self-Harm"
    assert normalize_category("VIOLENCE") == "Violence"
    assert category_slug("SELF_HARM") == "self-harm"
    assert [category_slug(c) for c in CATEGORIES] == [
        "hate", "harassment", "violence", "self-harm", "sexuality", "shocking", "propaganda"]


def test_unknown_category_names_the_value():
    with pytest.raises(UnknownCategoryError, match="'Gore'"):
        normalize_category("Gore")
    with pytest.raises(ValueError):
        normalize_category(3)


# -- profile -------------------------------------------------------------------------------------------------------

def test_profile_normalises_and_complements():
    p = make(age_group="Young Adults", banned=["shocking", "self_harm"], religion=None)
    assert p.age_group == "young adults" and p.religion == "None"
    assert p.banned == ("Self-Harm", "Shocking")
    assert p.allowed == ("Harassment", "Hate", "Propaganda", "Sexuality", "Violence")
    assert make(banned=None).allowed is None
    assert p.with_banned([]).allowed == tuple(sorted(CATEGORIES))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"user_id": "42"}, "user_id"),
        ({"age": -1}, "age"),
        ({"age": 34.5}, "age"),
        ({"age": "34"}, "age"),
        ({"age": True}, "age"),
        ({"age": 70}, "age"),  # outside young adults' 20-34
        ({"gender": "robot"}, "gender"),
        ({"religion": "Jedi"}, "religion"),
        ({"mental_condition": "fine"}, "mental_condition"),
        ({"banned": ("Gore",)}, "banned"),
        ({"banned": ("Hate", "hate")}, "banned"),
    ],
)
def test_profile_validation_names_user_and_field(change, field):
    uid = change.get("user_id", "0000042")
    with pytest.raises(ProfileError, match=f"user '{uid}': field '{field}'"):
        make(**change)


def test_profile_validation_bad_id_message():
    with pytest.raises(ProfileError, match="7-digit"):
        make(user_id="42")


# -- users.csv -----------------------------------------------------------------------------------------------------

def test_reference_users_csv_reads_and_round_trips_byte_exactly(tmp_path):
    needs_shared()
    profiles = read_users_csv(USERS_CSV)
    assert len(profiles) == 1001
    assert profiles[0].user_id == "0000001" and profiles[-1].user_id == "0001001"
    assert profiles[0].banned == ("Propaganda", "Sexuality") and profiles[0].religion == "Islam"
    assert sum(p.religion == "None" for p in profiles) == 341
    out = write_users_csv(profiles, tmp_path / "copy.csv")
    assert out.read_bytes() == USERS_CSV.read_bytes()
    assert read_users_csv(out) == profiles


def test_users_csv_round_trip_keeps_ids_and_handles_no_lists(tmp_path):
    profiles = [make(user_id="0000042"), make(user_id="0000007", banned=[])]
    path = write_users_csv(profiles, tmp_path / "ids.csv")
    assert path.read_text().startswith("User_ID,Age,")
    assert read_users_csv(path) == profiles
    bare = [make(user_id=f"{i:07d}", banned=None) for i in (1, 2)]
    path = write_users_csv(bare, tmp_path / "bare.csv")
    assert "Banned" not in path.read_text() and read_users_csv(path) == bare
    with pytest.raises(ProfileError, match="0000002 has no banned list"):
        write_users_csv([bare[0].with_banned([]), bare[1]], tmp_path / "mixed.csv")


def test_cluster_style_csv_with_user_id_and_extra_columns(tmp_path):
    text = ("User_ID,Cluster_ID,Banned_Categories,Allowed_Categories,Age,Age_Group,Gender,Religion,"
            "Mental_Condition,Physical_Condition\n"
            "0000797,0,\"['Shocking', 'Violence']\",\"['Harassment', 'Hate', 'Propaganda', 'Self-Harm', "
            "'Sexuality']\",35,middle-aged,male,,major accidents,hearing impairment\n")
    (p,) = read_users_csv(write(tmp_path, text))
    assert p.user_id == "0000797" and p.religion == "None" and p.physical_condition == "hearing impairment"


ALLOWED_BUT_SELF_HARM = sorted(set(CATEGORIES) - {"Self-Harm"})
ROW_OK = f"34,young adults,female,None,healthy,anxiety,\"['Self-Harm']\",\"{ALLOWED_BUT_SELF_HARM}\"\n"


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ("34,young adults,female,None,healthy,anxiety,\"['Gore']\",\"[]\"\n",
         r"row 2 \(line 3\), field Banned_Categories: unknown category 'Gore'"),
        ("-3,young adults,female,None,healthy,anxiety,\"[]\",\"[]\"\n", r"row 2 \(line 3\), field Age: .*-3"),
        ("3.5,young adults,female,None,healthy,anxiety,\"[]\",\"[]\"\n", r"row 2 \(line 3\), field Age: .*'3.5'"),
        ("x,young adults,female,None,healthy,anxiety,\"[]\",\"[]\"\n", r"row 2 \(line 3\), field Age"),
        ("34,young adults,female,None,healthy,anxiety,\"['Hate']\",\"[]\"\n",
         r"row 2 \(line 3\), field Allowed_Categories: .*not the complement"),
        ("34,young adults,female,None,healthy,anxiety,Hate,\"[]\"\n", r"row 2 \(line 3\), field Banned_Categories"),
        ("34,young adults,female,Jedi,healthy,anxiety,\"[]\",\"[]\"\n", r"row 2 \(line 3\): user '0000002'.*religion"),
        ("34,young adults,female,None,healthy\n", r"row 2 \(line 3\): expected 8 fields"),
    ],
)
def test_bad_csv_rows_name_row_line_and_field(tmp_path, row, pattern):
    path = write(tmp_path, HEADER + ROW_OK + row)
    with pytest.raises(ProfileError, match=pattern) as info:
        read_users_csv(path)
    assert str(path) in str(info.value)


def test_byte_order_mark_is_tolerated(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + ROW_OK).encode())
    assert read_users_csv(path)[0].banned == ("Self-Harm",)


def test_missing_column_is_named(tmp_path):
    path = write(tmp_path, "Age,Age_Group,Gender,Physical_Condition,Mental_Condition\n34,young adults,female,"
                           "healthy,anxiety\n")
    with pytest.raises(ProfileError, match=r"missing column\(s\) \['Religion'\]"):
        read_users_csv(path)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_users_csv(tmp_path / "nope.csv")


# -- one person's file ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_profile_file_round_trip(tmp_path, suffix):
    p = make()
    path = save_profile(p, tmp_path / f"me{suffix}")
    assert load_profile(path) == p


def test_profile_file_accepts_reference_keys_and_reports_problems(tmp_path):
    ok = {"User_ID": "0000003", "Age": 18, "Age_Group": "adolescents", "Gender": "male", "Religion": "None",
          "Physical_Condition": "hearing impairment", "Mental_Condition": "anxiety",
          "Banned_Categories": ["Self-Harm", "Sexuality", "Shocking"]}
    assert load_profile(write(tmp_path, json.dumps(ok), "a.json")).banned == ("Self-Harm", "Sexuality", "Shocking")
    with pytest.raises(ProfileError, match="unknown field 'Agee'"):
        load_profile(write(tmp_path, json.dumps({**ok, "Agee": 3}), "b.json"))
    with pytest.raises(ProfileError, match=r"missing field\(s\) \['age'\]"):
        load_profile(write(tmp_path, json.dumps({k: v for k, v in ok.items() if k != "Age"}), "c.json"))
    yaml_text = "user_id: 0000042\nage: 34\nage_group: young adults\ngender: female\nreligion: None\n" \
                "physical_condition: healthy\nmental_condition: healthy\n"
    with pytest.raises(ProfileError, match="quoted 7-digit"):
        load_profile(write(tmp_path, yaml_text, "d.yaml"))
    with pytest.raises(ProfileError, match="not the complement"):
        load_profile(write(tmp_path, json.dumps({**ok, "allowed": ["Hate"]}), "e.json"))
    with pytest.raises(ProfileError, match="suffix '.txt'"):
        load_profile(write(tmp_path, "x", "f.txt"))


# -- levels --------------------------------------------------------------------------------------------------------

EXPECTED_LEVELS = {
    "L0": ("0001001", ()),
    "L1": ("0000797", ("Shocking", "Violence")),
    "L2": ("0000697", ("Propaganda", "Sexuality", "Shocking", "Violence")),
    "L3": ("0000002", ("Propaganda", "Self-Harm", "Sexuality", "Shocking")),
    "L4": ("0000742", ("Propaganda", "Self-Harm", "Sexuality", "Shocking", "Violence")),
    "L5": ("0000501", tuple(sorted(CATEGORIES))),
}


def test_levels_match_spec():
    assert level_names() == list(EXPECTED_LEVELS)
    for name, (uid, banned) in EXPECTED_LEVELS.items():
        p = load_level(name)
        assert (p.user_id, p.banned) == (uid, banned)
    assert load_level("l3") == load_level("level_3") == load_level("3") == load_level("L3")


def test_levels_match_reference_users_csv():
    needs_shared()
    by_id = {p.user_id: p for p in read_users_csv(USERS_CSV)}
    for name in level_names():
        p = load_level(name)
        assert p == by_id[p.user_id], name


def test_unknown_level_lists_valid_names(tmp_path):
    with pytest.raises(UnknownLevelError, match=r"unknown level 'L9'.*L0, L1, L2, L3, L4, L5"):
        load_level("L9")
    custom = write(tmp_path, "strict:\n  user_id: '0000501'\n  age: 5\n  age_group: children\n  gender: female\n"
                             "  religion: None\n  physical_condition: healthy\n  mental_condition: healthy\n"
                             "  banned: [Hate]\n", "levels.yaml")
    assert level_names(custom) == ["strict"] and load_level("strict", custom).banned == ("Hate",)
    with pytest.raises(UnknownLevelError, match="valid levels in .*levels.yaml: strict"):
        load_level("L0", custom)


def test_level_without_a_user_is_a_clear_error(tmp_path):
    empty = write(tmp_path, "L0:\nL1:\n  user_id: '0000501'\n", "levels.yaml")
    with pytest.raises(ProfileError, match=r"levels.yaml, level L0: expected a mapping of profile fields"):
        load_level("L0", empty)
    no_banned = write(tmp_path, "L0:\n  user_id: '0000501'\n  age: 5\n  age_group: children\n  gender: female\n"
                                "  religion: None\n  physical_condition: healthy\n  mental_condition: healthy\n",
                      "levels2.yaml")
    with pytest.raises(ProfileError, match=r"levels2.yaml, level L0: a level needs a 'banned' list"):
        load_level("L0", no_banned)
