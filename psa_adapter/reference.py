"""Import of the reference implementation's adapter checkpoints.

``psa_adapter.bin`` (``torch.save``) holds ``{"psa_adapter": {"{i}.to_k_user.0.weight": [H, D], ...},
"user_proj": {"proj.weight": [K*D, E], "proj.bias", "norm.weight", "norm.bias"}}`` (older files say
``"user_adapter"`` instead of ``"psa_adapter"``); the ``.safetensors`` variant flattens this with the prefixes
``psa_adapter.`` and ``user_proj.``. ``i`` numbers the UNet's cross-attention processors in the order of
``unet.attn_processors``. Files that number every processor (self-attention included, so cross-attention layers get
the odd numbers) are recognised too.

This module knows the file format only; ``PSAAdapter.from_pretrained`` builds the adapter (one import direction:
``adapter`` -> ``reference``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from psa_adapter.errors import AdapterMismatchError

_BRANCH_KEY = re.compile(r"^(\d+)\.(to_k_user|to_v_user)\.0\.weight$")
_PROJ_KEYS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")


def describe_load_error(err: BaseException) -> str:
    """One line for a failed ``torch.load(weights_only=True)``. torch's own text spans many lines and suggests
    loading with ``weights_only=False``, which would run whatever the file holds; this names the refused object."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it holds a Python object ({found.group(1)}), not only tensors and numbers; refused unread "
                "(files are opened with torch.load(weights_only=True), which runs no code)")
    first = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()
    return f"not a readable torch file ({type(err).__name__}: {first[0] if first else 'no detail'})"


def read_reference_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return the (branch, user_proj) dicts of a reference checkpoint, loaded without unpickling objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        branch = {k.removeprefix("psa_adapter."): v for k, v in flat.items() if k.startswith("psa_adapter.")}
        proj = {k.removeprefix("user_proj."): v for k, v in flat.items() if k.startswith("user_proj.")}
        other = [k for k in flat if not k.startswith(("psa_adapter.", "user_proj."))]
        if other:
            raise AdapterMismatchError(f"{path}: unexpected keys {other[:3]} (expected psa_adapter.* and user_proj.*)")
        return branch, proj
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name
        raise AdapterMismatchError(f"cannot read reference adapter {path}: {describe_load_error(err)}") from None
    if not isinstance(data, dict):
        raise AdapterMismatchError(f"{path}: expected a dict with 'psa_adapter' and 'user_proj', got {type(data)}")
    branch_key = "psa_adapter" if "psa_adapter" in data else "user_adapter" if "user_adapter" in data else None
    unexpected = sorted(set(data) - {"psa_adapter", "user_adapter", "user_proj"})
    if branch_key is None or "user_proj" not in data or unexpected:
        raise AdapterMismatchError(
            f"{path}: expected top-level keys 'psa_adapter' (or 'user_adapter') and 'user_proj', found {sorted(data)}"
        )
    return dict(data[branch_key]), dict(data["user_proj"])


def reference_adapter_state(path: str | Path, layer_names: list[str], cross_attention_dim: int,
                            ) -> tuple[dict[str, torch.Tensor], int, int]:
    """A reference checkpoint as our adapter's state dict, checking every key and shape.

    ``layer_names``: the UNet's cross-attention layers in ``unet.attn_processors`` order (``cross_attention_layers``);
    ``cross_attention_dim``: its D. Returns (state dict with ``user_proj.*`` and ``<layer>.to_{k,v}_user.weight``
    keys in fp32, K user tokens, E embedding size).
    """
    branch, proj = read_reference_state(path)
    missing_proj = [k for k in _PROJ_KEYS if k not in proj]
    extra_proj = sorted(set(proj) - set(_PROJ_KEYS))
    if missing_proj or extra_proj:
        raise AdapterMismatchError(f"{path}: user_proj keys missing {missing_proj}, unexpected {extra_proj}")
    bad = [k for k in branch if not _BRANCH_KEY.match(k)]
    if bad:
        raise AdapterMismatchError(
            f"{path}: unexpected adapter keys, e.g. {bad[0]!r} (expected '<i>.to_k_user.0.weight')"
        )

    names = list(layer_names)
    indices = sorted({int(_BRANCH_KEY.match(k).group(1)) for k in branch})
    if indices == list(range(len(names))):
        index_to_layer = dict(zip(indices, names))
    elif indices == [2 * c + 1 for c in range(len(names))]:
        index_to_layer = {2 * c + 1: name for c, name in enumerate(names)}
    else:
        raise AdapterMismatchError(
            f"{path}: adapter has layer indices {indices[:4]}...{indices[-2:]} ({len(indices)} layers) but the UNet "
            f"has {len(names)} cross-attention layers"
        )

    d = int(cross_attention_dim)
    rows, embed_dim = proj["proj.weight"].shape
    if rows % d:
        raise AdapterMismatchError(
            f"{path}: user_proj.proj.weight has {rows} rows, not a multiple of the UNet's D={d}"
        )
    state = {f"user_proj.{k}": v.to(torch.float32) for k, v in proj.items()}
    for i, layer in index_to_layer.items():
        for which in ("to_k_user", "to_v_user"):
            key = f"{i}.{which}.0.weight"
            if key not in branch:
                raise AdapterMismatchError(f"{path}: missing {key} (layer {layer})")
            state[f"{layer}.{which}.weight"] = branch[key].to(torch.float32)
    return state, rows // d, int(embed_dim)


def reference_state_dict(adapter) -> dict[str, dict[str, torch.Tensor]]:
    """Our adapter as the reference ``.bin`` dict (cross-attention numbering), for export and tests."""
    branch = {}
    for i, layer in enumerate(adapter.config.layers):
        b = adapter.branch(layer)
        branch[f"{i}.to_k_user.0.weight"] = b.to_k_user.weight.detach().clone()
        branch[f"{i}.to_v_user.0.weight"] = b.to_v_user.weight.detach().clone()
    proj = {k: v.detach().clone() for k, v in adapter.user_proj.state_dict().items()}
    return {"psa_adapter": branch, "user_proj": proj}
