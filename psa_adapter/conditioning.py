"""Text conditioning of SD1.5- and SDXL-style UNets for training, in one helper.

SD1.5: ``encoder_hidden_states`` = the text encoder's last hidden state (B, 77, 768).
SDXL: ``encoder_hidden_states`` = concatenation of both encoders' penultimate hidden states (B, 77, 768 + 1280),
``added_cond_kwargs = {"text_embeds": pooled output of encoder 2 (B, 1280), "time_ids": (B, 6)}`` with
``time_ids = [H, W, 0, 0, H, W]`` (original size, crop top-left, target size; the reference's
``[1024, 1024, 0, 0, 1024, 1024]`` at 1024 px). The family comes from the UNet config, not from a name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from psa_adapter.adapter import is_sdxl_unet


@dataclass
class TextConditioning:
    """Encoded captions: (B, S, D) hidden states and, for SDXL, (B, P) pooled embeddings."""

    encoder_hidden_states: torch.Tensor
    pooled_text_embeds: torch.Tensor | None = None


def sdxl_time_ids(batch_size: int, resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, 6) SDXL micro-conditioning for square, uncropped training images: ``[R, R, 0, 0, R, R]``."""
    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    return row.expand(batch_size, 6).clone()


class TextConditioner:
    """Encodes captions with the frozen text encoder(s) of an SD1.5- or SDXL-style model.

    ``tokenizers`` and ``text_encoders`` are lists of one (SD1.5) or two (SDXL) entries.
    """

    def __init__(self, tokenizers: list, text_encoders: list, sdxl: bool):
        if len(tokenizers) != len(text_encoders) or len(tokenizers) != (2 if sdxl else 1):
            raise ValueError(
                f"{'SDXL' if sdxl else 'SD1.5'}-style conditioning needs {2 if sdxl else 1} tokenizer/text encoder "
                f"pair(s), got {len(tokenizers)} tokenizers and {len(text_encoders)} encoders"
            )
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.sdxl = sdxl

    @classmethod
    def from_pipeline_components(cls, unet, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None):
        """Build from pipeline parts; SDXL-ness comes from ``unet.config``, and SDXL needs the second encoder."""
        sdxl = is_sdxl_unet(unet)
        if sdxl and (tokenizer_2 is None or text_encoder_2 is None):
            raise ValueError("the UNet is SDXL-style (addition_embed_type='text_time') but the model has no "
                             "tokenizer_2/text_encoder_2")
        if sdxl:
            return cls([tokenizer, tokenizer_2], [text_encoder, text_encoder_2], sdxl=True)
        return cls([tokenizer], [text_encoder], sdxl=False)

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    def _token_ids(self, tokenizer, captions: list[str]) -> torch.Tensor:
        return tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextConditioning:
        """B captions -> TextConditioning with (B, S, D) hidden states (+ (B, P) pooled for SDXL)."""
        if not self.sdxl:
            encoder = self.text_encoders[0]
            hidden = encoder(self._token_ids(self.tokenizers[0], captions))[0]
            return TextConditioning(hidden)
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            output = encoder(self._token_ids(tokenizer, captions), output_hidden_states=True)
            states.append(output.hidden_states[-2])
            # Only encoder 2 (CLIPTextModelWithProjection) has the pooled, projected output SDXL needs.
            pooled = output[0]
        return TextConditioning(torch.cat(states, dim=-1), pooled)


def added_cond_kwargs(pooled_text_embeds: torch.Tensor | None, resolution: int) -> dict | None:
    """The UNet's ``added_cond_kwargs`` for SDXL (None for SD1.5): pooled embeds and (B, 6) time ids."""
    if pooled_text_embeds is None:
        return None
    time_ids = sdxl_time_ids(pooled_text_embeds.shape[0], resolution, pooled_text_embeds.device,
                             pooled_text_embeds.dtype)
    return {"text_embeds": pooled_text_embeds, "time_ids": time_ids}
