"""The bad-input corpus: malformed files and flags, each with the CLI that reads it and what its message must name.

Each case writes its input into a fresh folder (beside a copy of the tiny workspace's good inputs), then runs one
CLI's ``main(argv)`` in-process. ``test_rel_corpus.py`` asserts on every case; ``python tests/reliability/corpus.py``
prints the table of every case and what it printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import struct
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
GOOD_PROFILE = ("user_id: '0000042'\nage: 30\nage_group: young adults\ngender: female\nreligion: None\n"
                "physical_condition: healthy\nmental_condition: healthy\nbanned: [Violence]\n")
USERS_HEADER = "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories"
USERS_ROW = ("30,young adults,female,None,healthy,healthy,\"['Violence']\","
             "\"['Harassment', 'Hate', 'Propaganda', 'Self-Harm', 'Sexuality', 'Shocking']\"")


@dataclass
class Case:
    name: str
    kind: str  # the input family (table column)
    build: Callable  # build(ctx) -> (cli, argv, fragments the message must hold)


CASES: list[Case] = []


def case(name: str, kind: str):
    def register(build):
        CASES.append(Case(name, kind, build))
        return build

    return register


class Ctx:
    """A case's folder: ``ws`` is the tiny workspace (model, sage/train, embeds, users.csv), ``d`` a fresh folder;
    ``out`` is an output folder that already holds results a failing run must leave as they are."""

    def __init__(self, ws: Path, d: Path):
        self.ws, self.d = ws, d
        self.out = d / "out"
        (self.out / "checkpoint-2").mkdir(parents=True)
        (self.out / "checkpoint-2" / "precious.bin").write_bytes(b"weights of a day of training")
        (self.out / "earlier.png").write_bytes(b"an image made earlier")
        (self.out / "manifest.jsonl").write_text('{"file": "earlier.png"}\n')
        (self.out / "records.jsonl").write_text('{"file": "a.png", "verdict": "PASS"}\n')

    def write(self, name: str, data: str | bytes) -> Path:
        path = self.d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        return path

    def sage(self, edit: Callable[[list[dict]], list] | None = None, raw: bytes | None = None) -> Path:
        """A copy of the good SAGE split with its metadata edited (records -> records or lines) or replaced."""
        split = self.d / "sage" / "train"
        shutil.copytree(self.ws / "sage" / "train", split)
        meta = split / "metadata.jsonl"
        if raw is not None:
            meta.write_bytes(raw)
        elif edit is not None:
            records = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
            lines = [r if isinstance(r, str) else json.dumps(r) for r in edit(records)]
            meta.write_text("\n".join(lines) + "\n")
        return split

    def embeds(self, **arrays) -> Path:
        folder = self.d / "embeds"
        shutil.copytree(self.ws / "embeds", folder)
        for uid, array in arrays.items():
            np.save(folder / f"{uid.removeprefix('u')}.npy", array)
        return folder

    def train(self, *extra, sage=None, embeds=None) -> list:
        return ["--sd_model", self.ws / "sd15", "--train_data_dir", sage or self.ws / "sage",
                "--embeds_folder", embeds or self.ws / "embeds", "--output_dir", self.out, "--resolution", "32",
                "--max_train_steps", "1", "--mixed_precision", "no", "--train_batch_size", "1", *extra]

    def adapter(self) -> Path:
        """A good adapter folder (E = 16) for the tiny model."""
        from psa_adapter.adapter import PSAAdapter
        from psa_adapter.pipeline import load_pipeline

        folder = self.d / "adapter"
        if not folder.exists():
            import torch

            pipe = load_pipeline(str(self.ws / "sd15"), torch.device("cpu"), torch.float32)
            PSAAdapter.for_unet(pipe.unet, embed_dim=16, num_tokens=1).save_pretrained(folder)
        return folder

    def infer(self, *extra) -> list:
        return ["--sd_model", self.ws / "sd15", "--save_path", self.out, "--steps", "1", "--height", "32",
                "--width", "32", *extra]


# ------------------------------------------------------------------------------------------- SAGE metadata.jsonl
@case("truncated last line", "SAGE metadata.jsonl")
def _(c):
    meta = c.sage().joinpath("metadata.jsonl")
    text = meta.read_text()
    meta.write_text(text[: len(text) - 40])
    return "train", c.train(sage=meta.parent), ["metadata.jsonl:12", "malformed JSON"]


@case("empty file", "SAGE metadata.jsonl")
def _(c):
    split = c.sage(raw=b"")
    return "train", c.train(sage=split), [f"{split / 'metadata.jsonl'}"]


@case("wrong type: caption is a number", "SAGE metadata.jsonl")
def _(c):
    split = c.sage(lambda rs: [rs[0], {**rs[1], "caption": 42}, *rs[2:]])
    return "train", c.train(sage=split), ["metadata.jsonl:2", "caption"]


@case("line is a JSON list, not an object", "SAGE metadata.jsonl")
def _(c):
    split = c.sage(lambda rs: [*rs[:2], "[1, 2, 3]", *rs[2:]])
    return "train", c.train(sage=split), ["metadata.jsonl:3"]


@case("data validate: unknown category in a file name", "SAGE metadata.jsonl")
def _(c):
    def edit(rs):
        r = dict(rs[0])
        for k in ("file_name", "chosen", "rejected"):
            r[k] = r[k].replace("violence", "gore")
        return [r, *rs[1:]]

    split = c.sage(edit)
    for p in split.glob("*violence*"):
        shutil.copy(p, split / p.name.replace("violence", "gore"))
    return "data", ["validate", "--root", split.parent, "--split", "train"], ["line 1", "unknown category 'gore'"]


@case("huge line (8 MB, not JSON)", "SAGE metadata.jsonl")
def _(c):
    meta = c.sage().joinpath("metadata.jsonl")
    with meta.open("a") as f:
        f.write("x" * (8 << 20) + "\n")
    return "train", c.train(sage=meta.parent), ["metadata.jsonl:13"]


@case("non-UTF-8 bytes", "SAGE metadata.jsonl")
def _(c):
    meta = c.sage().joinpath("metadata.jsonl")
    lines = meta.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"a square", b"a squ\xff\xfere")
    meta.write_bytes(b"".join(lines))
    return "train", c.train(sage=meta.parent), ["metadata.jsonl:4", "UTF-8"]


@case("chosen image path with '..' leaving the data root", "SAGE metadata.jsonl")
def _(c):
    split = c.sage(lambda rs: [rs[0], {**rs[1], "chosen": "../../secret.jpg"}, *rs[2:]])
    return "train", c.train(sage=split), ["metadata.jsonl:2", "../../secret.jpg"]


@case("absolute image path", "SAGE metadata.jsonl")
def _(c):
    split = c.sage(lambda rs: [*rs[:4], {**rs[4], "rejected": "/etc/hostname"}, *rs[5:]])
    return "train", c.train(sage=split), ["metadata.jsonl:5", "/etc/hostname"]


@case("missing image", "SAGE metadata.jsonl")
def _(c):
    split = c.sage()
    name = json.loads((split / "metadata.jsonl").read_text().splitlines()[2])["chosen"]
    (split / name).unlink()
    return "train", c.train(sage=split), ["metadata.jsonl:3", name]


@case("User_ID is a number", "SAGE metadata.jsonl")
def _(c):
    split = c.sage(lambda rs: [rs[0], rs[1], {**rs[2], "user_data": {**rs[2]["user_data"], "User_ID": 1}}, *rs[3:]])
    return "train", c.train(sage=split), ["metadata.jsonl:3", "User_ID"]


@case("infer.py: file_name with '..'", "SAGE metadata.jsonl")
def _(c):
    split = c.sage(lambda rs: [rs[0], {**rs[1], "file_name": "../../escape.png"}])
    return "infer", c.infer("--meta_data", split / "metadata.jsonl"), ["metadata.jsonl line 2", "escape.png"]


@case("infer.py: non-UTF-8 bytes", "SAGE metadata.jsonl")
def _(c):
    meta = c.sage().joinpath("metadata.jsonl")
    meta.write_bytes(meta.read_bytes().replace(b"a square", b"\xc0\xaf", 1))
    return "infer", c.infer("--meta_data", meta), ["metadata.jsonl:1", "UTF-8"]


# ---------------------------------------------------------------------------------------------------- users CSVs
@case("empty file", "users CSV")
def _(c):
    path = c.write("users.csv", "")
    return "users", ["agreement", "--users", path], ["users.csv"]


@case("unknown category", "users CSV")
def _(c):
    path = c.write("users.csv", f"{USERS_HEADER}\n{USERS_ROW.replace('Violence', 'Gore', 1)}\n")
    return "users", ["agreement", "--users", path], ["users.csv", "row 1", "Gore"]


@case("duplicate user ids", "users CSV")
def _(c):
    path = c.write("users.csv", f"User_ID,{USERS_HEADER}\n0000007,{USERS_ROW}\n0000008,{USERS_ROW}\n"
                                f"0000007,{USERS_ROW}\n")
    return "users", ["agreement", "--users", path], ["users.csv", "0000007"]


@case("wrong type: Age is text", "users CSV")
def _(c):
    path = c.write("users.csv", f"{USERS_HEADER}\n{USERS_ROW}\nforty{USERS_ROW[2:]}\n")
    return "users", ["agreement", "--users", path], ["users.csv", "Age", "forty"]


@case("truncated last row", "users CSV")
def _(c):
    path = c.write("users.csv", f"{USERS_HEADER}\n{USERS_ROW}\n{USERS_ROW[:30]}")
    return "users", ["agreement", "--users", path], ["users.csv", "row 2"]


@case("judge --users: non-UTF-8 bytes", "users CSV")
def _(c):
    path = c.write("users.csv", f"{USERS_HEADER}\n{USERS_ROW}\n".encode() + b"30,young adults,f\xe9male\n")
    images = c.d / "imgs"
    images.mkdir()
    return "judge", ["evaluate", "--images", images, "--users", path, "--model", "m", "--out", c.out,
                     "--base-url", "http://127.0.0.1:9/v1"], ["users.csv", "line 3", "UTF-8"]


@case("non-UTF-8 bytes", "users CSV")
def _(c):
    path = c.write("users.csv", f"{USERS_HEADER}\n{USERS_ROW}\n".encode() + b"30,young adults,f\xe9male\n")
    return "users", ["agreement", "--users", path], ["users.csv", "line 3", "UTF-8"]


@case("data validate --users: unknown category", "users CSV")
def _(c):
    path = c.write("users.csv", f"{USERS_HEADER}\n{USERS_ROW.replace('Violence', 'Nudity', 1)}\n")
    return "data", ["validate", "--root", c.ws / "sage", "--users", path, "--no-images"], ["users.csv", "Nudity"]


@case("judge --users: missing column", "users CSV")
def _(c):
    path = c.write("users.csv", "Age,Gender\n30,female\n")
    images = c.d / "imgs"
    images.mkdir()
    shutil.copy(next((c.ws / "sage" / "train").glob("*_u.jpg")), images / "user_0000001_violence_knife_00001_u.jpg")
    return "judge", ["evaluate", "--images", images, "--users", path, "--model", "m", "--out", c.out,
                     "--base-url", "http://127.0.0.1:9/v1"], ["users.csv", "column"]


# ------------------------------------------------------------------------------------------------- profile files
@case("unknown category", "profile file")
def _(c):
    path = c.write("person.yaml", GOOD_PROFILE.replace("[Violence]", "[Violence, Gore]"))
    return "users", ["statement", "--profile", path], ["person.yaml", "Gore"]


@case("wrong type: a list, not a mapping", "profile file")
def _(c):
    path = c.write("person.yaml", "- age: 30\n- banned: []\n")
    return "users", ["statement", "--profile", path], ["person.yaml", "mapping"]


@case("truncated YAML", "profile file")
def _(c):
    path = c.write("person.yaml", GOOD_PROFILE[:40] + "\nbanned: [Viol")
    return "users", ["statement", "--profile", path], ["person.yaml line", "invalid YAML"]


@case("non-UTF-8 bytes", "profile file")
def _(c):
    path = c.write("person.yaml", GOOD_PROFILE.encode().replace(b"female", b"f\xe9male"))
    return "users", ["statement", "--profile", path], ["person.yaml", "line 4", "UTF-8"]


@case("levels file: truncated YAML", "profile file")
def _(c):
    path = c.write("levels.yaml", "L0: {user_id: '0000001', age: 30\nL1: [")
    return "users", ["statement", "--level", "L1", "--levels-file", path], ["levels.yaml line", "invalid YAML"]


@case("levels file: non-UTF-8 bytes", "profile file")
def _(c):
    path = c.write("levels.yaml", b"L0:\n  user_id: '0000001'\n  gender: f\xe9male\n")
    return "users", ["statement", "--level", "L0", "--levels-file", path], ["levels.yaml line 3", "UTF-8"]


@case("infer.py --profile: age out of range", "profile file")
def _(c):
    path = c.write("person.yaml", GOOD_PROFILE.replace("age: 30", "age: 400"))
    return "infer", c.infer("--prompt", "a cat", "--psa_path", c.adapter(), "--profile", path), ["person.yaml", "age"]


# --------------------------------------------------------------------------------------------------- prompt CSVs
@case("no caption column", "prompt CSV")
def _(c):
    path = c.write("prompts.csv", "text,user_id\na cat,1\n")
    return "infer", c.infer("--prompts_csv", path), ["prompts.csv", "caption"]


@case("user_id is not a User_ID", "prompt CSV")
def _(c):
    path = c.write("prompts.csv", "caption,user_id\na cat,1\na dog,bob\n")
    return "infer", c.infer("--prompts_csv", path), ["prompts.csv line 3", "bob"]


@case("absolute file_name leaving --save_path", "prompt CSV")
def _(c):
    path = c.write("prompts.csv", "caption,file_name\na cat,/tmp/evil.png\n")
    return "infer", c.infer("--prompts_csv", path), ["prompts.csv line 2", "/tmp/evil.png"]


@case("seed is not an integer", "prompt CSV")
def _(c):
    path = c.write("prompts.csv", "caption,seed\na cat,1.5\n")
    return "infer", c.infer("--prompts_csv", path), ["prompts.csv line 2", "1.5"]


@case("non-UTF-8 bytes", "prompt CSV")
def _(c):
    path = c.write("prompts.csv", b"caption\na caf\xe9\n")
    return "infer", c.infer("--prompts_csv", path), ["prompts.csv", "line 2", "UTF-8"]


@case("empty file", "prompt CSV")
def _(c):
    path = c.write("prompts.csv", "")
    return "infer", c.infer("--prompts_csv", path), ["prompts.csv"]


@case("judge --prompts: no file_name column", "prompt CSV")
def _(c):
    path = c.write("prompts.csv", "caption\na cat\n")
    images = c.d / "imgs"
    images.mkdir()
    return "judge", ["evaluate", "--images", images, "--users", c.ws / "users.csv", "--prompts", path, "--model", "m",
                     "--out", c.out, "--base-url", "http://127.0.0.1:9/v1"], ["prompts.csv", "file_name"]


# ---------------------------------------------------------------------------------- embedding stores, .npy folders
@case("NaN in an embedding", ".npy folder")
def _(c):
    folder = c.embeds(u0000002=np.array([np.nan] * 16, dtype=np.float32))
    return "train", c.train(embeds=folder), ["0000002.npy", "NaN"]


@case("inf in an embedding", ".npy folder")
def _(c):
    folder = c.embeds(u0000003=np.full(16, np.inf, dtype=np.float32))
    return "infer", c.infer("--prompt", "a cat", "--psa_path", c.adapter(), "--embeds_folder", folder,
                            "--user_id", "3"), ["0000003.npy", "infinite"]


@case("wrong shape (4, 4)", ".npy folder")
def _(c):
    folder = c.embeds(u0000001=np.zeros((4, 4), dtype=np.float32))
    return "train", c.train(embeds=folder), ["0000001.npy", "shape"]


@case("truncated .npy", ".npy folder")
def _(c):
    folder = c.embeds()
    data = (folder / "0000002.npy").read_bytes()
    (folder / "0000002.npy").write_bytes(data[:70])
    return "train", c.train(embeds=folder), ["0000002.npy"]


@case("pickled object array", ".npy folder")
def _(c):
    folder = c.embeds(u0000001=np.array([{"a": 1}], dtype=object))
    return "users", ["import-npy", folder, "--out", c.d / "store.safetensors"], ["0000001.npy"]


@case("duplicate user ids (1.npy and 0000001.npy)", ".npy folder")
def _(c):
    folder = c.embeds()
    shutil.copy(folder / "0000001.npy", folder / "1.npy")
    return "users", ["import-npy", folder, "--out", c.d / "store.safetensors"], ["1.npy"]


@case("embedding size differs from the adapter's", ".npy folder")
def _(c):
    folder = c.d / "embeds8"
    folder.mkdir()
    np.save(folder / "0000001.npy", np.ones(8, dtype=np.float32))
    return "infer", c.infer("--prompt", "a cat", "--psa_path", c.adapter(), "--embeds_folder", folder,
                            "--user_id", "1"), ["embeds8", "8", "16"]


@case("truncated store", "embedding store")
def _(c):
    from psa_adapter.users import EmbeddingStore

    store = EmbeddingStore.open(c.ws / "embeds").save(c.d / "store.safetensors")
    store.write_bytes(store.read_bytes()[:-20])
    return "train", c.train(embeds=store), ["store.safetensors"]


@case("NaN in a store", "embedding store")
def _(c):
    from psa_adapter.users import EmbeddingStore

    store = EmbeddingStore.open(c.ws / "embeds").save(c.d / "store.safetensors")
    data = bytearray(store.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header: 8 + header + 4] = struct.pack("<f", float("nan"))  # first value of the first user
    store.write_bytes(bytes(data))
    return "train", c.train(embeds=store), ["store.safetensors", "NaN"]


@case("a user missing from the store", "embedding store")
def _(c):
    folder = c.embeds()
    (folder / "0000003.npy").unlink()
    return "train", c.train(embeds=folder), ["0000003"]


# ------------------------------------------------------------------------------- adapter folders, reference .bin
@case("truncated psa_adapter.safetensors", "adapter folder")
def _(c):
    folder = c.adapter()
    weights = folder / "psa_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    return "infer", c.infer("--prompt", "a cat", "--psa_path", folder, "--embeds_folder", c.ws / "embeds",
                            "--user_id", "1"), ["psa_adapter.safetensors"]


@case("config.json is not JSON", "adapter folder")
def _(c):
    folder = c.adapter()
    (folder / "config.json").write_text('{"embed_dim": 16, "num_tok')
    return "infer", c.infer("--prompt", "a cat", "--psa_path", folder, "--embeds_folder", c.ws / "embeds",
                            "--user_id", "1"), ["config.json"]


@case("config.json: wrong type (num_tokens 'two')", "adapter folder")
def _(c):
    folder = c.adapter()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_tokens": "two"}))
    return "infer", c.infer("--prompt", "a cat", "--psa_path", folder, "--embeds_folder", c.ws / "embeds",
                            "--user_id", "1"), ["config.json", "num_tokens", "two"]


def _reference_bin(c, edit=None) -> Path:
    import torch

    from psa_adapter.adapter import PSAAdapter
    from psa_adapter.reference import reference_state_dict

    state = reference_state_dict(PSAAdapter.from_pretrained(c.adapter()))
    if edit:
        edit(state)
    path = c.d / "ref" / "psa_adapter.bin"
    path.parent.mkdir()
    torch.save(state, path)
    return path


@case("wrong tensor shape", "reference .bin")
def _(c):
    import torch

    def edit(state):
        state["psa_adapter"]["0.to_v_user.0.weight"] = torch.zeros(3, 5)

    path = _reference_bin(c, edit)
    return "infer", c.infer("--prompt", "a cat", "--psa_path", path, "--embeds_folder", c.ws / "embeds",
                            "--user_id", "1"), ["psa_adapter.bin", "to_v_user"]


@case("truncated .bin", "reference .bin")
def _(c):
    path = _reference_bin(c)
    path.write_bytes(path.read_bytes()[:300])
    return "infer", c.infer("--prompt", "a cat", "--psa_path", path, "--embeds_folder", c.ws / "embeds",
                            "--user_id", "1"), ["psa_adapter.bin"]


@case("missing user_proj", "reference .bin")
def _(c):
    path = _reference_bin(c, lambda state: state.pop("user_proj"))
    return "infer", c.infer("--prompt", "a cat", "--psa_path", path, "--embeds_folder", c.ws / "embeds",
                            "--user_id", "1"), ["psa_adapter.bin", "user_proj"]


# --------------------------------------------------------------------------------------------- LoRA / UNet weights
def _lora(c) -> Path:
    """A LoRA for the tiny model in diffusers' format (rank 2), written by peft + diffusers."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(str(c.ws / "sd15"), torch_dtype=torch.float32)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    from diffusers.utils import convert_state_dict_to_diffusers

    folder = c.d / "lora"
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return folder


@case("truncated LoRA weights", "LoRA weights")
def _(c):
    folder = _lora(c)
    weights = folder / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: len(weights.read_bytes()) // 2])
    return "infer", c.infer("--prompt", "a cat", "--lora_path", folder), ["pytorch_lora_weights.safetensors"]


@case("LoRA with wrong tensor shapes", "LoRA weights")
def _(c):
    import torch
    from safetensors.torch import load_file, save_file

    folder = _lora(c)
    weights = folder / "pytorch_lora_weights.safetensors"
    state = load_file(str(weights))
    key = sorted(state)[0]
    state[key] = torch.zeros(7, 3)
    save_file(state, str(weights))
    return "infer", c.infer("--prompt", "a cat", "--lora_path", folder), ["lora", key.split(".lora")[0][-20:]]


@case("truncated UNet weights", "UNet weights")
def _(c):
    model = c.d / "sd15"
    shutil.copytree(c.ws / "sd15", model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    argv = c.infer("--prompt", "a cat")
    argv[1] = model
    return "infer", argv, ["unet", "diffusion_pytorch_model.safetensors"]


# ------------------------------------------------------- fine-tuned UNet weights of baselines (--method esd, uce)
def _needs_unet_weights_flag():
    from psa_adapter.infer_cli import build_parser

    if "--unet_weights" not in build_parser().format_help():
        import pytest

        pytest.skip("infer.py has no --unet_weights here (the ESD/UCE baselines are not in this checkout)")


def _unet_state(c):
    from safetensors.torch import load_file

    return load_file(str(c.ws / "sd15" / "unet" / "diffusion_pytorch_model.safetensors"))


@case("truncated .safetensors", "UNet weights")
def _(c):
    _needs_unet_weights_flag()
    from safetensors.torch import save_file

    path = c.d / "esd_unet.safetensors"
    save_file(_unet_state(c), str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "infer", c.infer("--prompt", "a cat", "--method", "esd", "--unet_weights", path), ["esd_unet.safetensors"]


@case("a tensor of the wrong shape", "UNet weights")
def _(c):
    _needs_unet_weights_flag()
    import torch
    from safetensors.torch import save_file

    state = _unet_state(c)
    key = sorted(state)[0]
    state[key] = torch.zeros(3, 3)
    path = c.d / "esd_unet.safetensors"
    save_file(state, str(path))
    return "infer", c.infer("--prompt", "a cat", "--method", "esd", "--unet_weights", path), [
        "esd_unet.safetensors", key]


# ---------------------------------------------------------------------------------------------------- YAML configs
@case("unknown key", "YAML config")
def _(c):
    path = c.write("run.yaml", "learning_rate: 1.0e-4\nlearnig_rate_typo: 3\n")
    return "train", ["--config", path, *c.train()], ["run.yaml", "learnig_rate_typo"]


@case("wrong type (learning_rate: fast)", "YAML config")
def _(c):
    path = c.write("run.yaml", "learning_rate: fast\n")
    return "train", ["--config", path, *c.train()], ["run.yaml", "learning_rate"]


@case("truncated YAML", "YAML config")
def _(c):
    path = c.write("run.yaml", "learning_rate: 1.0e-4\nvalidation_prompts: [\"a cat\", \"a d")
    return "train", ["--config", path, *c.train()], ["run.yaml line 2", "invalid YAML"]


@case("non-UTF-8 bytes", "YAML config")
def _(c):
    path = c.write("run.yaml", b"learning_rate: 1.0e-4\nvalidation_prompts: [\"caf\xe9\"]\n")
    return "train", ["--config", path, *c.train()], ["run.yaml", "line 2", "UTF-8"]


@case("a list, not a mapping", "YAML config")
def _(c):
    path = c.write("run.yaml", "- learning_rate\n- 1e-4\n")
    return "train", ["--config", path, *c.train()], ["run.yaml", "mapping"]


# ----------------------------------------------------------------------------------------------- command-line flags
@case("train.py --max_train_steps abc", "flags")
def _(c):
    return "train", c.train("--max_train_steps", "abc"), ["--max_train_steps", "abc"]


@case("train.py --mixed_precision fp8", "flags")
def _(c):
    return "train", c.train("--mixed_precision", "fp8"), ["mixed_precision", "fp8"]


@case("train.py --learning_rate -1", "flags")
def _(c):
    return "train", c.train("--learning_rate", "-1"), ["learning_rate"]


@case("infer.py --steps 0", "flags")
def _(c):
    return "infer", c.infer("--prompt", "a cat", "--steps", "0"), ["--steps"]


@case("infer.py --psa_scale with a non-number block", "flags")
def _(c):
    return "infer", c.infer("--prompt", "a cat", "--psa_scale", '{"down": "x"}'), ["--psa_scale"]


@case("infer.py --level L9", "flags")
def _(c):
    return "infer", c.infer("--prompt", "a cat", "--psa_path", c.adapter(), "--level", "L9"), ["L9"]


@case("judge --concurrency 0", "flags")
def _(c):
    images = c.d / "imgs"
    images.mkdir()
    return "judge", ["evaluate", "--images", images, "--users", c.ws / "users.csv", "--model", "m", "--out", c.out,
                     "--base-url", "http://127.0.0.1:9/v1", "--concurrency", "0"], ["--concurrency"]


# ------------------------------------------------------------------------------ evaluation driver: config, prompt sets
EVAL_CONFIG = """out: {out}
prompts_dir: {d}
generation: {{seed: 2025, steps: 1}}
backbones:
  sd15: {model}
methods:
  base: {{}}
sets:
  mine:
    file: {d}/mine.csv
    metrics: [clip_score]
metrics:
  clip_score: {{scorer: toy}}
"""


def _eval_config(c, text: str | bytes | None = None, csv: str | bytes = "caption\na cat\n") -> Path:
    c.write("mine.csv", csv)
    if text is None:
        text = EVAL_CONFIG.format(out=c.out, d=c.d, model=c.ws / "sd15")
    return c.write("eval.yaml", text)


@case("non-UTF-8 bytes", "evaluation config")
def _(c):
    text = EVAL_CONFIG.format(out=c.out, d=c.d, model=c.ws / "sd15").encode().replace(b"seed", b"s\xe9ed")
    return "eval", ["run", "--config", _eval_config(c, text), "--stages", "generate"], ["eval.yaml", "line 3", "UTF-8"]


@case("truncated YAML", "evaluation config")
def _(c):
    text = EVAL_CONFIG.format(out=c.out, d=c.d, model=c.ws / "sd15")[:60] + "\nsets: {mine: [a"
    return "eval", ["run", "--config", _eval_config(c, text), "--stages", "generate"], ["eval.yaml line", "YAML"]


@case("unknown key in a method", "evaluation config")
def _(c):
    text = EVAL_CONFIG.format(out=c.out, d=c.d, model=c.ws / "sd15").replace("base: {}", "base: {psa_scael: 1}")
    return "eval", ["run", "--config", _eval_config(c, text), "--stages", "generate"], ["eval.yaml", "psa_scael"]


@case("prompt CSV: non-UTF-8 bytes", "evaluation config")
def _(c):
    path = _eval_config(c, csv=b"caption\na caf\xe9\n")
    return "eval", ["run", "--config", path, "--stages", "generate"], ["mine.csv", "line 2", "UTF-8"]


@case("prompt CSV: user_id that is not a User_ID", "evaluation config")
def _(c):
    path = _eval_config(c, csv="caption,user_id\na cat,1\na dog,x7\n")
    return "eval", ["run", "--config", path, "--stages", "generate"], ["mine.csv line 3", "x7"]


# ------------------------------------------------------------------------------------------------- Q16 prompts.p
def _q16(c, payload) -> list:
    import pickle

    path = c.d / "prompts.p"
    path.write_bytes(pickle.dumps(payload))
    images = c.d / "imgs"
    images.mkdir()
    shutil.copy(next((c.ws / "sage" / "train").glob("*_u.jpg")), images / "a.jpg")
    return ["metrics", "--metric", "inpro", "--images", images, "--out", c.out, "--q16-prompts", path,
            "--detectors", "q16", "--device", "cpu"]


@case("a dict, not an array", "Q16 prompts.p")
def _(c):
    return "eval", _q16(c, {"prompts": [1.0, 2.0]}), ["prompts.p", "refused"]


@case("an object array", "Q16 prompts.p")
def _(c):
    return "eval", _q16(c, np.array([{"a": 1}, None], dtype=object)), ["prompts.p", "refused"]


@case("wrong shape (3, 5)", "Q16 prompts.p")
def _(c):
    return "eval", _q16(c, np.zeros((3, 5), dtype=np.float32)), ["prompts.p", "(3, 5)"]


@case("truncated pickle", "Q16 prompts.p")
def _(c):
    argv = _q16(c, np.zeros((2, 8), dtype=np.float32))
    path = c.d / "prompts.p"
    path.write_bytes(path.read_bytes()[:40])
    return "eval", argv, ["prompts.p"]


# --------------------------------------------------------------------------------------------------------- running
def _train_main():
    spec = importlib.util.spec_from_file_location("_train_script", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def cli_main(cli: str):
    if cli == "train":
        return _train_main()
    if cli == "infer":
        from psa_adapter.infer_cli import main
    elif cli == "users":
        from psa_adapter.users.__main__ import main
    elif cli == "data":
        from psa_adapter.data.__main__ import main
    elif cli == "judge":
        from psa_adapter.evaluation.judge.cli import main
    elif cli == "eval":
        from psa_adapter.evaluation.cli import main
    else:
        raise ValueError(cli)
    return main


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    raised: str | None  # an exception that escaped main(): a raw traceback for the user

    @property
    def message(self) -> str:
        """The last non-empty line of stderr (or stdout): what the user reads."""
        for text in (self.stderr, self.stdout):
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if lines:
                return lines[-1].strip()
        return ""


def run_case(cli: str, argv: list) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    code, raised = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(cli)([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - recorded: a raw traceback is what a case must not give
            raised = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            err.write(traceback.format_exc())
    return Outcome(code, out.getvalue(), err.getvalue(), raised)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CLI_NAMES = {"train": "train.py", "infer": "infer.py", "users": "python -m psa_adapter.users",
             "data": "python -m psa_adapter.data", "judge": "python -m evaluation.judge",
             "eval": "python -m evaluation"}


def main() -> None:
    """Print the case table (markdown): input family, case, CLI, exit status, the message printed."""
    import tempfile

    from psa_adapter.data.synthetic import write_npy_embeddings, write_tiny_sage, write_users_csv
    from psa_adapter.testing import save_tiny_pipeline

    users = {"0000001": ["Violence"], "0000002": [], "0000003": ["Self-Harm"]}
    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        write_tiny_sage(ws / "sage", "train", users)
        write_npy_embeddings(ws / "embeds", users, dim=16)
        write_users_csv(ws / "users.csv", users)
        save_tiny_pipeline("sd15", ws / "sd15")
        print("| # | input | case | CLI | exit | message |\n|---|---|---|---|---|---|")
        for i, item in enumerate(CASES, 1):
            d = Path(tmp) / f"case{i}"
            d.mkdir()
            try:
                cli, argv, fragments = item.build(Ctx(ws, d))
            except BaseException as exc:  # noqa: BLE001 - pytest.skip: the input's reader is not in this checkout
                if type(exc).__name__ != "Skipped":
                    raise
                print(f"| {i} | {item.kind} | {item.name} | - | - | skipped: {exc} |")
                continue
            outcome = run_case(cli, argv)
            lines = (outcome.stderr + outcome.stdout).splitlines()
            naming = [ln.strip() for ln in lines if all(f in ln for f in map(str, fragments))]
            message = outcome.raised and f"RAW TRACEBACK {outcome.raised}" or (naming or [outcome.message])[-1]
            message = message.replace(tmp, "$TMP").replace("|", "\\|")
            if len(message) > 220:
                message = message[:217] + "..."
            print(f"| {i} | {item.kind} | {item.name} | {CLI_NAMES[cli]} | {outcome.code} | `{message}` |")


if __name__ == "__main__":
    main()
