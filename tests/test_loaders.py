"""The pipeline verbs (psa_adapter.loaders): load, generate for a user, set scale, unload; composition with other
attention processors; every misuse raises an error that says what to do. Tiny SD1.5/SDXL pipelines, CPU."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0

from psa_adapter import AdapterMismatchError, PSAAdapter
from psa_adapter.attention import MissingUserTokensError
from psa_adapter.loaders import (
    PSAStableDiffusionPipeline,
    PSAStableDiffusionXLPipeline,
    load_psa_adapter,
    unload_psa_adapter,
)
from psa_adapter.pipeline import generate
from psa_adapter.reference import reference_state_dict
from psa_adapter.testing import save_tiny_pipeline, tiny_pipeline

E = 8
PROMPTS = ["a red cube on a table", "a dog in the park"]
SEEDS = [11, 12]
STEPS = 2


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    pipe = tiny_pipeline(request.param, seed=0)
    pipe.kind = request.param
    return pipe


@pytest.fixture(autouse=True)
def _base_again(pipe):
    """Every test leaves the module's pipeline as the base pipeline."""
    processors = pipe.unet.attn_processors
    yield
    unload_psa_adapter(pipe)
    pipe.unet.set_attn_processor(processors)


def _adapter(unet, num_tokens=1, embed_dim=E, seed=0, encoder=None):
    adapter = PSAAdapter.for_unet(unet, embed_dim=embed_dim, num_tokens=num_tokens, encoder=encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in adapter.branches.values():
            branch.to_k_user.weight.copy_(torch.randn(branch.to_k_user.weight.shape, generator=g) * 0.5)
            branch.to_v_user.weight.copy_(torch.randn(branch.to_v_user.weight.shape, generator=g) * 0.5)
    return adapter


def _users(n=2, seed=1, dim=E):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _images(pipe, prompts=PROMPTS, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS[: len(prompts)]]
    return pipe(prompts, generator=generators, output_type="np", **kwargs).images


# ------------------------------------------------------------------------------------------------ the verbs
def test_load_generate_scale_unload(pipe, tmp_path):
    base = _images(pipe)
    base_class, base_dict = type(pipe), set(vars(pipe))  # after a call: diffusers keeps per-call attributes
    processors = pipe.unet.attn_processors
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    _adapter(pipe.unet).save_pretrained(tmp_path / "a")

    adapter = load_psa_adapter(pipe, tmp_path / "a")
    assert isinstance(pipe, base_class) and isinstance(pipe, PSAStableDiffusionPipeline | PSAStableDiffusionXLPipeline)
    users = _users()
    out = _images(pipe, user_embeds=users)
    assert np.abs(out - base).max() > 1e-2
    # One (E,) embedding is every prompt's user.
    same = _images(pipe, user_embeds=users[0])
    assert np.array_equal(same[0], out[0]) or np.abs(same[0] - out[0]).max() < 1e-5
    pipe.set_psa_scale(0.0)
    assert np.array_equal(_images(pipe, user_embeds=users), base)
    pipe.set_psa_scale({"down": {"block_1": 1.0}, "mid": 0.0, "up": 0.0})
    assert set(adapter.layer_scales().values()) <= {0.0, 1.0}
    pipe.unload_psa_adapter()

    # Exactly the base pipeline again: class, attributes, processors (the same objects), state dict, images.
    assert type(pipe) is base_class and set(vars(pipe)) == base_dict
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    after = pipe.unet.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert np.array_equal(_images(pipe), base)


def test_psa_pipeline_class_has_the_verbs_and_loads_from_a_folder(pipe, tmp_path):
    path = save_tiny_pipeline(pipe.kind, tmp_path / "model")
    cls = PSAStableDiffusionXLPipeline if pipe.kind == "sdxl" else PSAStableDiffusionPipeline
    psa_pipe = cls.from_pretrained(path)
    psa_pipe.set_progress_bar_config(disable=True)
    assert psa_pipe.psa_adapter is None
    base = _images(psa_pipe)  # without an adapter it is the plain pipeline
    _adapter(psa_pipe.unet).save_pretrained(tmp_path / "a")
    psa_pipe.load_psa_adapter(tmp_path / "a")
    assert np.abs(_images(psa_pipe, user_embeds=_users()) - base).max() > 1e-2
    psa_pipe.unload_psa_adapter()
    assert type(psa_pipe) is cls
    assert np.array_equal(_images(psa_pipe), base)


@pytest.mark.parametrize("form", ["bin", "safetensors"])
def test_reference_checkpoints_load_into_the_same_images(pipe, tmp_path, form):
    adapter = _adapter(pipe.unet)
    adapter.save_pretrained(tmp_path / "ours")
    ref = reference_state_dict(adapter)
    if form == "bin":
        torch.save(ref, tmp_path / "psa_adapter.bin")
        path = tmp_path / "psa_adapter.bin"
    else:
        from safetensors.torch import save_file

        flat = {f"psa_adapter.{k}": v for k, v in ref["psa_adapter"].items()}
        flat.update({f"user_proj.{k}": v for k, v in ref["user_proj"].items()})
        save_file(flat, tmp_path / "ref.safetensors")
        path = tmp_path / "ref.safetensors"
    load_psa_adapter(pipe, tmp_path / "ours")
    ours = _images(pipe, user_embeds=_users())
    load_psa_adapter(pipe, path)  # replaces the loaded adapter
    assert np.array_equal(_images(pipe, user_embeds=_users()), ours)


def test_hub_ids_resolve_through_the_hub_cache(pipe, tmp_path, monkeypatch):
    import huggingface_hub

    _adapter(pipe.unet).save_pretrained(tmp_path / "snapshot")
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    adapter = load_psa_adapter(pipe, "someone/psa-adapter")
    assert asked == ["someone/psa-adapter"] and adapter.config.embed_dim == E


def test_unreachable_hub_id_names_the_id(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="'nobody/no-such-adapter' is neither a local path nor a Hub"):
        load_psa_adapter(pipe, "nobody/no-such-adapter")
    assert type(pipe) in (StableDiffusionPipeline, StableDiffusionXLPipeline)  # a failed load changes nothing
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_psa_adapter(pipe, "./missing/adapter")


def test_level_and_profile_use_the_adapters_encoder(pipe):
    from psa_adapter.users import get_encoder, load_level

    encoder = get_encoder("sentence")
    adapter = _adapter(pipe.unet, embed_dim=encoder.dim, encoder=dict(encoder.info))
    load_psa_adapter(pipe, adapter)
    level = load_level("L3")
    by_level = _images(pipe, level="L3")
    by_profile = _images(pipe, profile=level)
    by_embedding = _images(pipe, user_embeds=torch.from_numpy(encoder.encode([level])[0]))
    assert np.array_equal(by_level, by_embedding) and np.array_equal(by_profile, by_embedding)


# ------------------------------------------------------------------------------------------ composition
class AddOne(torch.nn.Module):
    """A custom processor: the default attention, plus one."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb) + 1.0


def _attn2(unet):
    name = next(n for n in unet.attn_processors if "attn2" in n).removesuffix(".processor")
    return name, dict(unet.named_modules())[name]


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_psa_composes_with_a_custom_and_an_ip_adapter_processor(pipe, num_tokens):
    """The user branch adds the same amount on top of whatever processor ran before it, and that processor's own
    effect stays: PSA(custom) - custom == PSA(default) - default, with custom != default."""
    unet = pipe.unet
    name, attn = _attn2(unet)
    d, width = unet.config.cross_attention_dim, attn.to_q.out_features
    g = torch.Generator().manual_seed(0)
    hidden, text = torch.randn(2, 16, width, generator=g), torch.randn(2, 7, d, generator=g)
    ip = IPAdapterAttnProcessor2_0(width, d, num_tokens=(4,), scale=1.0)
    with torch.no_grad():
        for p in ip.parameters():
            p.normal_(0, 0.3)
    ip_embeds = [torch.randn(2, 4, d, generator=g)]
    adapter = _adapter(unet, num_tokens=num_tokens)
    tokens = adapter.user_tokens(_users()).detach()

    def layer(processor, states, psa):
        attn.set_processor(processor)
        if psa:
            adapter.attach(unet)
        try:
            with torch.no_grad():
                return attn(hidden, encoder_hidden_states=states, **({"psa_user_tokens": tokens} if psa else {}))
        finally:
            adapter.detach()

    default = layer(AttnProcessor2_0(), text, False)
    delta = layer(AttnProcessor2_0(), text, True) - default
    assert delta.abs().max() > 1e-3
    for other, states in ((AddOne(), text), (ip, (text, ip_embeds))):
        alone = layer(other, states, False)
        assert (alone - default).abs().max() > 1e-3  # the other processor takes effect
        torch.testing.assert_close(layer(other, states, True) - alone, delta, atol=1e-5, rtol=1e-5)


def test_processors_are_modules_and_wrap_the_installed_ones(pipe):
    pipe.unet.set_attn_processor(AttnProcessor())  # a processor installed before the adapter
    base = _images(pipe)
    adapter = load_psa_adapter(pipe, _adapter(pipe.unet))
    wrappers = pipe.unet.attn_processors
    assert all(isinstance(p, torch.nn.Module) and isinstance(p.base_processor, AttnProcessor)
               for p in wrappers.values())
    n_branch = sum(1 for k in pipe.unet.state_dict() if ".processor.branch." in k)
    assert n_branch == 2 * len(adapter.config.layers)
    pipe.unet.to(torch.float64)  # .to() reaches the adapter's weights inside the processors
    assert all(b.to_v_user.weight.dtype == torch.float64 for b in adapter.branches.values())
    pipe.unet.to(torch.float32)
    pipe.unload_psa_adapter()
    assert all(isinstance(p, AttnProcessor) for p in pipe.unet.attn_processors.values())  # not the default's
    assert np.array_equal(_images(pipe), base)


# ------------------------------------------------------------------------------------------ misuse
def test_generate_without_a_loaded_adapter_raises(pipe):
    adapter = _adapter(pipe.unet)  # made but never attached
    assert adapter.unet is None
    with pytest.raises(RuntimeError, match="no PSA adapter is loaded.*load_psa_adapter"):
        generate(pipe, PROMPTS, SEEDS, user_embeds=_users(), num_inference_steps=STEPS)
    with pytest.raises(RuntimeError, match="no PSA adapter is loaded.*load_psa_adapter"):
        generate(pipe, PROMPTS, SEEDS, psa_scale=0.5, num_inference_steps=STEPS)
    with pytest.raises(TypeError, match="takes no adapter: load it onto the pipeline with load_psa_adapter"):
        generate(pipe, PROMPTS, SEEDS, adapter=adapter, user_embeds=_users(), num_inference_steps=STEPS)
    cls = PSAStableDiffusionXLPipeline if pipe.kind == "sdxl" else PSAStableDiffusionPipeline
    psa_pipe = cls(**pipe.components)
    with pytest.raises(RuntimeError, match="no PSA adapter is loaded.*load_psa_adapter"):
        _images(psa_pipe, user_embeds=_users())


def test_plain_call_with_an_adapter_attached_raises(pipe):
    load_psa_adapter(pipe, _adapter(pipe.unet))
    with pytest.raises(ValueError, match="whose image.*user_embeds.*unload_psa_adapter"):
        _images(pipe)
    with pytest.raises(ValueError, match="one row per prompt"):
        _images(pipe, user_embeds=_users(3))
    pipe.unload_psa_adapter()
    # Attached by hand to a stock pipeline: the processors themselves refuse a call without user tokens.
    adapter = _adapter(pipe.unet).attach(pipe.unet)
    try:
        with pytest.raises(MissingUserTokensError, match="no user tokens.*user_embeds"):
            _images(pipe)
    finally:
        adapter.detach()


def test_processors_replaced_after_attaching_raise_at_generation(pipe):
    adapter = load_psa_adapter(pipe, _adapter(pipe.unet))
    pipe.unet.set_attn_processor(AttnProcessor())  # e.g. what enabling xformers does
    with pytest.raises(RuntimeError, match="were replaced after the PSA adapter was attached.*load_psa_adapter"):
        _images(pipe, user_embeds=_users())
    # Loading again wraps the new processors.
    pipe.load_psa_adapter(adapter)
    assert all(isinstance(p.base_processor, AttnProcessor) for p in pipe.unet.attn_processors.values())
    _images(pipe, user_embeds=_users())


@pytest.mark.parametrize("form", ["folder", "bin"])
def test_non_finite_adapter_weights_are_refused(pipe, tmp_path, form):
    adapter = _adapter(pipe.unet)
    layer = next(iter(adapter.config.layers))
    with torch.no_grad():
        adapter.branch(layer).to_v_user.weight[0, 0] = float("nan")
        adapter.user_proj.proj.bias[1] = float("inf")
    if form == "folder":
        adapter.save_pretrained(tmp_path / "a")
        path = tmp_path / "a"
    else:
        path = tmp_path / "psa_adapter.bin"
        torch.save(reference_state_dict(adapter), path)
    with pytest.raises(AdapterMismatchError, match=r"NaN/inf values.*earlier checkpoint"):
        load_psa_adapter(pipe, path)
    assert type(pipe) in (StableDiffusionPipeline, StableDiffusionXLPipeline)


def test_psa_scale_at_generation_is_for_that_call_only(pipe):
    adapter = load_psa_adapter(pipe, _adapter(pipe.unet))
    pipe.set_psa_scale({"down": 0.5, "up": 1.0})
    scales = adapter.layer_scales()
    first = _images(pipe, user_embeds=_users())
    _images(pipe, user_embeds=_users(), psa_scale=0.0)
    generate(pipe, PROMPTS, SEEDS, user_embeds=_users(), psa_scale=2.0, num_inference_steps=STEPS)
    assert adapter.layer_scales() == scales
    assert np.array_equal(_images(pipe, user_embeds=_users()), first)


def test_adapter_without_a_recorded_encoder_warns_what_is_assumed(pipe):
    load_psa_adapter(pipe, _adapter(pipe.unet, embed_dim=384, encoder=None))
    with pytest.warns(UserWarning, match="records no user encoder; assuming 'sentence' \\(all-MiniLM-L6-v2"):
        _images(pipe, level="L0")
