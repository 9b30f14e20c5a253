"""Generation API (psa_adapter.pipeline) on tiny SD1.5-style and SDXL-style pipelines built in code."""

import numpy as np
import pytest
import torch

from psa_adapter.adapter import PSAAdapter
from psa_adapter.loaders import load_psa_adapter
from psa_adapter.pipeline import ModelLoadError, generate, load_pipeline, make_generators
from psa_adapter.testing import save_tiny_pipeline, tiny_pipeline

E = 8
PROMPTS = ["a red cube on a table", "a dog in the park", "a city street at night"]
SEEDS = [11, 12, 13]
STEPS = 2


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    pipe = tiny_pipeline(request.param, seed=0)
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


def _run(pipe, user_embeds=None, prompts=PROMPTS[:2], seeds=SEEDS[:2], **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    return generate(pipe, prompts, seeds, user_embeds=user_embeds, output_type="np", **kwargs)


def _users(n, seed=1):
    return torch.randn(n, E, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def loaded(pipe):
    """Load an adapter for one test and always unload it, so the module-scoped pipeline stays the base model."""

    def load(adapter):
        return load_psa_adapter(pipe, adapter)

    yield load
    pipe.unload_psa_adapter()


def test_zero_initialised_adapter_is_bit_identical_to_base(pipe, loaded):
    base = _run(pipe)
    loaded(_adapter(pipe))
    with_adapter = _run(pipe, _users(2))
    assert with_adapter.shape == base.shape
    assert np.array_equal(with_adapter, base)


def test_any_adapter_at_scale_zero_is_bit_identical_to_base(pipe, loaded):
    base = _run(pipe)
    loaded(_adapter(pipe, random_branch=True))
    at_zero = _run(pipe, _users(2), psa_scale=0.0)
    assert np.array_equal(at_zero, base)
    # Scale 0 for every block through the per-block form as well.
    per_block = _run(pipe, _users(2), psa_scale={"down": 0.0, "mid": 0.0, "up": 0.0})
    assert np.array_equal(per_block, base)


@pytest.mark.parametrize("num_tokens", [1, 4])
def test_random_adapter_changes_images_and_users_differ(pipe, loaded, num_tokens):
    base = _run(pipe)
    loaded(_adapter(pipe, num_tokens=num_tokens, random_branch=True))
    users = _users(2)
    out = _run(pipe, users, psa_scale=1.0)
    assert np.abs(out - base).max() > 1e-2
    # Same prompt and seed, two users: different images.
    same_prompt = [PROMPTS[0]] * 2
    two_users = _run(pipe, users, prompts=same_prompt, seeds=[SEEDS[0]] * 2, psa_scale=1.0)
    assert np.abs(two_users[0] - two_users[1]).max() > 1e-2
    # The same user twice gives the same image (so the difference above is the user's, not the batch slot's).
    one_user = _run(pipe, users[:1].repeat(2, 1), prompts=same_prompt, seeds=[SEEDS[0]] * 2)
    assert np.abs(one_user[0] - one_user[1]).max() < 1e-5


def test_per_prompt_seeds_make_images_independent_of_batch_size(pipe, loaded):
    loaded(_adapter(pipe, random_branch=True))
    users = _users(3)
    together = _run(pipe, users, prompts=PROMPTS, seeds=SEEDS)
    for i in range(3):
        alone = _run(pipe, users[i : i + 1], prompts=PROMPTS[i : i + 1], seeds=SEEDS[i : i + 1])
        # Batched matmuls may round differently on the CPU; images agree far below one 8-bit level (1/255).
        np.testing.assert_allclose(alone[0], together[i], atol=1e-4)
    # And the seed matters: another seed gives another image.
    other = _run(pipe, users[:1], prompts=PROMPTS[:1], seeds=[999])
    assert np.abs(other[0] - together[0]).max() > 1e-2


def test_guidance_batch_gets_null_tokens_then_user_tokens(pipe, loaded):
    adapter = loaded(_adapter(pipe, num_tokens=2))
    users = _users(2)
    with torch.no_grad():
        cond, null = adapter.user_tokens(users), adapter.null_tokens(2)
    tokens = pipe.psa_user_tokens(users, num_images_per_prompt=1, do_cfg=True)
    assert torch.equal(tokens, torch.cat([null, cond]))  # diffusers batches [negative, positive]
    assert torch.equal(pipe.psa_user_tokens(users, 1, do_cfg=False), cond)
    # num_images_per_prompt repeats each prompt's row in place, as diffusers repeats prompt_embeds.
    assert torch.equal(pipe.psa_user_tokens(users, 3, do_cfg=False), cond.repeat_interleave(3, dim=0))
    off = pipe.psa_user_tokens(users, 1, do_cfg=True, psa_uncond="off")
    assert torch.count_nonzero(off[:2]) == 0 and torch.equal(off[2:], cond)
    with pytest.raises(ValueError, match="psa_uncond must be one of"):
        pipe.psa_user_tokens(users, 1, do_cfg=True, psa_uncond="zero")


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_uncond_off_makes_the_unconditional_pass_the_base_models(pipe, loaded, num_tokens):
    adapter = loaded(_adapter(pipe, num_tokens=num_tokens, random_branch=True))
    with torch.no_grad():
        adapter.user_proj.proj.bias.normal_(0, 1.0)  # proj(0) is far from zero: "null" and "off" must differ
    encoded = pipe.encode_prompt(prompt=[""] * 2, device="cpu", num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
    uncond = encoded[0]
    off = pipe.psa_user_tokens(_users(2), 1, do_cfg=True, psa_uncond="off")[:2]
    null = pipe.psa_user_tokens(_users(2), 1, do_cfg=True, psa_uncond="null")[:2]
    latents = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    extra = {}
    if pipe.kind == "sdxl":
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(2, 1)
        extra = {"added_cond_kwargs": {"text_embeds": encoded[2], "time_ids": time_ids}}

    def unet(tokens=None):
        kwargs = adapter.unet_kwargs(tokens) if tokens is not None else {}
        with torch.no_grad():
            return pipe.unet(latents, 10, encoder_hidden_states=uncond, **kwargs, **extra).sample

    with_off, with_null = unet(off), unet(null)
    adapter.detach()  # the base model
    base = unet()
    adapter.attach(pipe.unet)
    assert torch.equal(with_off, base)
    assert (with_null - base).abs().max() > 1e-3


def test_negative_prompt_is_used(pipe):
    plain = _run(pipe)
    negative = _run(pipe, negative_prompt="blurry, low quality")
    assert np.abs(plain - negative).max() > 1e-3


def test_generate_rejects_inconsistent_arguments(pipe, loaded):
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(pipe, PROMPTS[:2], SEEDS[:1], num_inference_steps=STEPS)
    loaded(_adapter(pipe))
    with pytest.raises(ValueError, match="one row per prompt"):
        generate(pipe, PROMPTS[:2], SEEDS[:2], user_embeds=_users(3), num_inference_steps=STEPS)


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


def test_text_conditioner_equals_the_pipelines_encode_prompt(pipe):
    """Training's TextConditioner encodes captions exactly as the pipeline does at generation time."""
    from psa_adapter.conditioning import TextConditioner

    conditioner = TextConditioner.from_pipeline_components(
        pipe.unet, pipe.tokenizer, pipe.text_encoder, getattr(pipe, "tokenizer_2", None),
        getattr(pipe, "text_encoder_2", None),
    )
    ours = conditioner.encode(PROMPTS)
    theirs = pipe.encode_prompt(prompt=PROMPTS, device="cpu", num_images_per_prompt=1,
                                do_classifier_free_guidance=False)
    assert torch.equal(ours.encoder_hidden_states, theirs[0])
    if pipe.kind == "sdxl":
        assert torch.equal(ours.pooled_text_embeds, theirs[2])
    else:
        assert ours.pooled_text_embeds is None
