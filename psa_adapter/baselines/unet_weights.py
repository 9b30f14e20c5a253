"""ESD-u and UCE: concept-erased UNet weights supplied by the user (``--method esd`` / ``--method uce``).

Both methods fine-tune (ESD-u) or edit in closed form (UCE) the base model's UNet; generation is then the plain
pipeline with those weights. Training them needs their own code (not part of this project): this module only loads
what they produced, a diffusers-named UNet state dict in a ``.safetensors`` file or a legacy torch file (read with
``torch.load(weights_only=True)``, never arbitrary pickle). Loading is strict, unlike the reference's
``strict=False``: a missing, unexpected or wrongly shaped key is an error that lists them. ``--unet_partial``
(a named variant, for files that hold only the edited tensors, as UCE can write) allows missing keys and says how
many tensors were replaced; unexpected and wrongly shaped keys are still errors.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from psa_adapter.methods import Method, MethodError, register

_LEGACY = (".bin", ".pt", ".pth", ".ckpt")
_SHOWN = 5  # keys named per kind of problem


def read_state_dict(path: str | Path) -> dict:
    """A flat name -> tensor dict from ``.safetensors`` or a legacy torch file (``weights_only=True``); a legacy file
    may nest it under ``state_dict``, ``unet`` or ``model``."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MethodError(f"--unet_weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in _LEGACY:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - the restricted unpickler raises many types
                from psa_adapter.reference import describe_load_error

                raise MethodError(f"cannot read --unet_weights {path}: {describe_load_error(err)}") from err
        else:
            raise MethodError(f"--unet_weights {path}: expected a .safetensors file or a legacy torch file "
                              f"({', '.join(_LEGACY)})")
    except MethodError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors / the unpickler raise many types for a bad file
        raise MethodError(f"cannot read --unet_weights {path}: {str(err).strip().splitlines()[0]}") from err
    for key in ("state_dict", "unet", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and len(state) <= 3:
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MethodError(f"--unet_weights {path}: not a state dict of tensors")
    return state


def _listing(label: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")
    return f"{len(keys)} {label}: {shown}"


def check_unet_state_dict(unet, state: dict, source: str, allow_missing: bool = False) -> None:
    """``MethodError`` listing every kind of mismatch between ``state`` and ``unet``'s own state dict."""
    expected = unet.state_dict()
    missing = [] if allow_missing else sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                    for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or shapes):
        return
    parts = [_listing(label, keys) for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                        ("wrongly shaped keys", shapes)) if keys]
    hint = ""
    if any(k.startswith("model.diffusion_model.") for k in unexpected):
        hint = " (these are CompVis/ldm names: convert the checkpoint to diffusers' UNet naming first)"
    raise MethodError(f"--unet_weights {source} does not match the model's UNet: {'; '.join(parts)}{hint}")


def load_unet_weights(unet, path: str | Path, allow_missing: bool = False) -> int:
    """Load ``path`` into ``unet`` strictly (see ``check_unet_state_dict``); returns the number of tensors loaded."""
    state = read_state_dict(path)
    check_unet_state_dict(unet, state, str(path), allow_missing)
    unet.load_state_dict(state, strict=not allow_missing)
    return len(state)


class _UNetWeights(Method):
    """The plain pipeline with fine-tuned UNet weights (``--unet_weights``)."""

    flags = ("unet_weights", "unet_partial")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ESD-u / UCE (--method esd / uce)")
        group.add_argument("--unet_weights", default=None,
                           help="the method's fine-tuned UNet: a diffusers-named state dict, .safetensors or a legacy "
                                "torch file (read with weights_only=True); loaded strictly")
        group.add_argument("--unet_partial", action="store_const", const=True, default=None,
                           help="the file holds only some tensors (e.g. UCE's edited projections): load them and keep "
                                "the base model's others; unexpected or wrongly shaped keys are still errors")

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        self.loaded = None

    def validate(self, jobs: Sequence) -> None:
        path = getattr(self.args, "unet_weights", None)
        if not path:
            raise MethodError(f"--method {self.name} needs --unet_weights (the method's fine-tuned UNet weights)")
        if not Path(path).is_file():
            raise MethodError(f"--unet_weights file not found: {path}")

    def prepare(self, pipe, jobs: Sequence, users=None) -> None:
        from psa_adapter.methods import _lora

        self.loaded = load_unet_weights(pipe.unet, self.args.unet_weights, bool(self.args.unet_partial))
        if self.args.unet_partial:
            import sys

            print(f"note: --unet_partial: {self.loaded} of {len(pipe.unet.state_dict())} UNet tensors come from "
                  f"{self.args.unet_weights}", file=sys.stderr)
        _lora(pipe, getattr(self.args, "lora_path", None))

    def settings(self) -> dict:
        return {"method": self.name, "unet_weights": self.args.unet_weights,
                "unet_partial": bool(getattr(self.args, "unet_partial", None)),
                "lora": getattr(self.args, "lora_path", None)}


@register
class ESD(_UNetWeights):
    """ESD-u (Erasing Concepts from Diffusion Models, unconditional-layer variant): its fine-tuned UNet."""

    name = "esd"


@register
class UCE(_UNetWeights):
    """UCE (Unified Concept Editing): its edited UNet."""

    name = "uce"


__all__ = ["ESD", "UCE", "check_unet_state_dict", "load_unet_weights", "read_state_dict"]
