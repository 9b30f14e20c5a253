"""Generation API (psa_adapter.pipeline) on tiny SD1.5-style and SDXL-style pipelines built in code."""

import numpy as np
import pytest
import torch

from psa_adapter.adapter import PSAAdapter
from psa_adapter.pipeline import (
    ModelLoadError,
    add_user_tokens,
    encode_conditioning,
    generate,
    load_pipeline,
    make_generators,
)
from psa_adapter.testing import save_tiny_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline

E = 8
PROMPTS = ["a red cube on a table", "a dog in the park", "a city street at night"]
SEEDS = [11, 12, 13]
STEPS = 2


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    pipe = (tiny_sd15_pipeline if request.param == "sd15" else tiny_sdxl_pipeline)(seed=0)
    pipe.kind = request.param
    return pipe


def _adapter(pipe, num_tokens=1, random_branch=False, seed=0):
    torch.manual_seed(seed)
    adapter = PSAAdapter.for_unet(pipe.unet, embed_dim=E, num_tokens=num_tokens)
    if random_branch:
        with torch.no_grad():
            for branch in adapter.branches.values():
                branch.to_k_user.weight.normal_(0, 0.5)
                branch.to_v_user.weight.normal_(0, 0.5)
    return adapter


def _run(pipe, adapter=None, user_embeds=None, prompts=PROMPTS[:2], seeds=SEEDS[:2], **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return generate(pipe, prompts, seeds, adapter=adapter, user_embeds=user_embeds, output_type="np", **kwargs)


def _users(n, seed=1):
    return torch.randn(n, E, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def attached(pipe):
    """Attach an adapter for one test and always detach it, so the module-scoped pipeline stays the base model."""
    adapters = []

    def attach(adapter):
        adapter.attach(pipe.unet)
        adapters.append(adapter)
        return adapter

    yield attach
    for adapter in adapters:
        adapter.detach()


def test_zero_initialised_adapter_is_bit_identical_to_base(pipe, attached):
    base = _run(pipe)
    adapter = attached(_adapter(pipe))
    with_adapter = _run(pipe, adapter, _users(2))
    assert with_adapter.shape == base.shape
    assert np.array_equal(with_adapter, base)


def test_any_adapter_at_scale_zero_is_bit_identical_to_base(pipe, attached):
    base = _run(pipe)
    adapter = attached(_adapter(pipe, random_branch=True))
    at_zero = _run(pipe, adapter, _users(2), psa_scale=0.0)
    assert np.array_equal(at_zero, base)
    # Scale 0 for every block through the per-block form as well.
    per_block = _run(pipe, adapter, _users(2), psa_scale={"down": 0.0, "mid": 0.0, "up": 0.0})
    assert np.array_equal(per_block, base)


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_random_adapter_changes_images_and_users_differ(pipe, attached, num_tokens):
    base = _run(pipe)
    adapter = attached(_adapter(pipe, num_tokens=num_tokens, random_branch=True))
    users = _users(2)
    out = _run(pipe, adapter, users, psa_scale=1.0)
    assert np.abs(out - base).max() > 1e-2
    # Same prompt and seed, two users: different images.
    same_prompt = [PROMPTS[0]] * 2
    two_users = _run(pipe, adapter, users, prompts=same_prompt, seeds=[SEEDS[0]] * 2, psa_scale=1.0)
    assert np.abs(two_users[0] - two_users[1]).max() > 1e-2
    # The same user twice gives the same image (so the difference above is the user's, not the batch slot's).
    one_user = _run(pipe, adapter, users[:1].repeat(2, 1), prompts=same_prompt, seeds=[SEEDS[0]] * 2)
    assert np.abs(one_user[0] - one_user[1]).max() < 1e-5


def test_per_prompt_seeds_make_images_independent_of_batch_size(pipe, attached):
    adapter = attached(_adapter(pipe, random_branch=True))
    users = _users(3)
    together = _run(pipe, adapter, users, prompts=PROMPTS, seeds=SEEDS)
    for i in range(3):
        alone = _run(pipe, adapter, users[i : i + 1], prompts=PROMPTS[i : i + 1], seeds=SEEDS[i : i + 1])
        # Batched matmuls may round differently on the CPU; images agree far below one 8-bit level (1/255).
        np.testing.assert_allclose(alone[0], together[i], atol=1e-4)
    # And the seed matters: another seed gives another image.
    other = _run(pipe, adapter, users[:1], prompts=PROMPTS[:1], seeds=[999])
    assert np.abs(other[0] - together[0]).max() > 1e-2


def test_unconditional_branch_gets_null_tokens(pipe):
    adapter = _adapter(pipe, num_tokens=2)
    cond = encode_conditioning(pipe, PROMPTS[:2], negative_prompt=None, do_cfg=True)
    users = _users(2)
    extended = add_user_tokens(cond, adapter, users)
    length = cond.prompt_embeds.shape[1]
    assert extended.prompt_embeds.shape[1] == length + 2
    assert extended.negative_prompt_embeds.shape == extended.prompt_embeds.shape
    assert torch.equal(extended.prompt_embeds[:, :length], cond.prompt_embeds)
    assert torch.equal(extended.negative_prompt_embeds[:, :length], cond.negative_prompt_embeds)
    with torch.no_grad():
        assert torch.allclose(extended.prompt_embeds[:, length:], adapter.user_tokens(users))
        assert torch.allclose(extended.negative_prompt_embeds[:, length:], adapter.null_tokens(2))
    if pipe.kind == "sdxl":
        assert extended.pooled_prompt_embeds is cond.pooled_prompt_embeds


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_uncond_off_makes_the_unconditional_pass_the_base_models(pipe, attached, num_tokens):
    adapter = attached(_adapter(pipe, num_tokens=num_tokens, random_branch=True))
    with torch.no_grad():
        adapter.user_proj.proj.bias.normal_(0, 1.0)  # proj(0) is far from zero: "null" and "off" must differ
    cond = encode_conditioning(pipe, PROMPTS[:2], negative_prompt=None, do_cfg=True)
    off = add_user_tokens(cond, adapter, _users(2), uncond="off")
    null = add_user_tokens(cond, adapter, _users(2), uncond="null")
    assert torch.equal(off.prompt_embeds, null.prompt_embeds)
    length = cond.prompt_embeds.shape[1]
    assert torch.count_nonzero(off.negative_prompt_embeds[:, length:]) == 0
    # The UNet on the unconditional embeddings: "off" equals the base model, "null" does not.
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    extra = {}
    if pipe.kind == "sdxl":
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(2, 1)
        extra = {"added_cond_kwargs": {"text_embeds": cond.negative_pooled_prompt_embeds, "time_ids": time_ids}}

    def unet(states):
        with torch.no_grad():
            return pipe.unet(latents, 10, encoder_hidden_states=states, **extra).sample

    with_off = unet(off.negative_prompt_embeds)
    with_null = unet(null.negative_prompt_embeds)
    adapter.set_scale(0.0)  # the base processor on the text tokens only
    base = unet(off.negative_prompt_embeds)
    adapter.set_scale(1.0)
    assert torch.allclose(with_off, base, atol=1e-6, rtol=0)
    assert (with_null - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="uncond must be one of"):
        add_user_tokens(cond, adapter, _users(2), uncond="zero")


def test_negative_prompt_is_used(pipe):
    plain = _run(pipe)
    negative = _run(pipe, negative_prompt="blurry, low quality")
    assert np.abs(plain - negative).max() > 1e-3


def test_generate_rejects_inconsistent_arguments(pipe, attached):
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(pipe, PROMPTS[:2], SEEDS[:1], num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="without an adapter"):
        generate(pipe, PROMPTS[:1], SEEDS[:1], user_embeds=_users(1), num_inference_steps=STEPS)
    adapter = attached(_adapter(pipe))
    with pytest.raises(ValueError, match="needs user_embeds"):
        generate(pipe, PROMPTS[:1], SEEDS[:1], adapter=adapter, num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="one per prompt"):
        generate(pipe, PROMPTS[:2], SEEDS[:2], adapter=adapter, user_embeds=_users(1), num_inference_steps=STEPS)


def test_make_generators_are_per_image():
    a, b = make_generators([5, 5])
    assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_load_pipeline_by_path_detects_sdxl_from_the_unet_config(tmp_path, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = save_tiny_pipeline(kind, tmp_path / kind)
    pipe = load_pipeline(path, "cpu")
    expected = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    assert type(pipe) is expected
    assert pipe.unet.dtype == torch.float32  # fp32 on the CPU
    if kind == "sd15":
        assert pipe.safety_checker is None
    out = generate(pipe, PROMPTS[:1], SEEDS[:1], num_inference_steps=STEPS, output_type="np")
    assert out.shape == (1, 32, 32, 3)


def test_load_pipeline_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_pipeline(missing)
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(tmp_path / "not-a-pipeline")
