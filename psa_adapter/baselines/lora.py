"""LoRA loading for ``--lora_path`` (SafetyDPO and any diffusers-format LoRA), checked against the pipeline first.

diffusers' ``load_lora_weights`` skips LoRA keys that name no layer of the model with at most a warning, so a LoRA
trained for another base model (SDXL on SD1.5, or the reverse) could load as nothing. We read the file with the
pipeline's own ``lora_state_dict`` (which also converts the other common LoRA formats to diffusers' naming), check
that every tensor names a layer of this pipeline and has that layer's width, and only then load it.
"""

from __future__ import annotations

from pathlib import Path

from psa_adapter.methods import MethodError

# Suffix of a LoRA tensor -> which side of the layer it must match: "in" (down / A: (r, in)), "out" (up / B: (out, r)).
_SIDES = {".lora_A.weight": "in", ".lora.down.weight": "in", ".lora_down.weight": "in",
          ".lora_B.weight": "out", ".lora.up.weight": "out", ".lora_up.weight": "out"}
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")


def _layer_width(layer, side: str) -> int | None:
    for attr in (("in_features", "in_channels") if side == "in" else ("out_features", "out_channels")):
        if hasattr(layer, attr):
            return int(getattr(layer, attr))
    return None


def lora_problems(pipe, state: dict) -> tuple[list[str], int]:
    """Tensors of a diffusers-named LoRA state dict that do not fit ``pipe``; returns (problems, tensors checked)."""
    problems, checked = [], 0
    for key, tensor in state.items():
        prefix, _, rest = key.partition(".")
        side = next((s for s in _SIDES if rest.endswith(s)), None)
        if side is None:  # alphas, magnitudes, ...: checked through their layer's A/B tensors
            continue
        checked += 1
        component = getattr(pipe, prefix, None) if prefix in _COMPONENTS else None
        if component is None:
            problems.append(f"{key}: this pipeline has no {prefix!r}")
            continue
        path = rest[: -len(side)]
        try:
            layer = component.get_submodule(path)
        except AttributeError:
            problems.append(f"{key}: {prefix} has no layer {path!r}")
            continue
        layer = getattr(layer, "base_layer", layer)  # a layer that already carries a LoRA
        width = _layer_width(layer, _SIDES[side])
        got = int(tensor.shape[1] if _SIDES[side] == "in" else tensor.shape[0])
        if width is not None and width != got:
            what = "inputs" if _SIDES[side] == "in" else "outputs"
            problems.append(f"{key}: shape {tuple(tensor.shape)} but the layer has {width} {what}")
    return problems, checked


def load_lora(pipe, path: str | Path) -> None:
    """Load a LoRA file or folder into ``pipe`` with diffusers' loader; ``MethodError`` naming the file when it is
    missing, unreadable, or made for another model (every mismatching tensor counted, the first few named)."""
    path = Path(path)
    if not path.exists():
        raise MethodError(f"--lora_path not found: {path}")
    try:
        state, _ = pipe.lora_state_dict(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise MethodError(f"cannot read the LoRA {path}: {str(err).strip().splitlines()[0]}") from err
    problems, checked = lora_problems(pipe, state)
    if not checked:
        raise MethodError(f"the LoRA {path} holds no LoRA layers this loader knows ({len(state)} tensors, e.g. "
                          f"{next(iter(state), 'none')!r})")
    if problems:
        model = "SDXL" if getattr(pipe, "text_encoder_2", None) is not None else "SD1.5-style"
        shown = "; ".join(problems[:3])
        raise MethodError(f"the LoRA {path} does not fit this {model} model: {len(problems)} of {checked} tensors "
                          f"do not match ({shown}{'; ...' if len(problems) > 3 else ''}); was it trained for another "
                          "base model?")
    try:
        pipe.load_lora_weights(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise MethodError(f"cannot load the LoRA {path}: {str(err).strip().splitlines()[0]}") from err


__all__ = ["load_lora", "lora_problems"]
