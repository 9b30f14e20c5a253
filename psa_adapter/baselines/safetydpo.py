"""SafetyDPO (``--method safetydpo``): a non-personalised LoRA trained with the same DPO loss, the safe image always
preferred, for everyone. ``train.py --mode non_personalised`` trains it (``launchers/train_safetydpo_sd15.sh`` /
``_sdxl.sh``) and saves it in diffusers' LoRA format; any diffusers-loadable LoRA (e.g. a published SafetyDPO one)
loads the same way, checked against the model first (``baselines.lora``)."""

from __future__ import annotations

from collections.abc import Sequence

from psa_adapter.methods import Method, MethodError, register


@register
class SafetyDPO(Method):
    """The base pipeline with the SafetyDPO LoRA of ``--lora_path``."""

    name = "safetydpo"

    def validate(self, jobs: Sequence) -> None:
        if not getattr(self.args, "lora_path", None):
            raise MethodError("--method safetydpo needs --lora_path (the LoRA folder or .safetensors file that "
                              "train.py --mode non_personalised wrote, or a published SafetyDPO LoRA)")

    def prepare(self, pipe, jobs: Sequence, users=None) -> None:
        from psa_adapter.baselines.lora import load_lora

        load_lora(pipe, self.args.lora_path)

    def settings(self) -> dict:
        return {"method": self.name, "lora": self.args.lora_path}


__all__ = ["SafetyDPO"]
