"""Adapter invariants on tiny SD1.5-style and SDXL-style UNets."""

import pytest
import torch

from psa_adapter import AdapterMismatchError, PSAAdapter
from psa_adapter.adapter import cross_attention_layers
from psa_adapter.attention import MissingUserTokensError
from psa_adapter.reference import reference_state_dict
from psa_adapter.testing import tiny_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline

E = 24


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def unet(request):
    return tiny_pipeline(request.param, seed=0).unet.eval()


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = unet.config.cross_attention_dim
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=g),
                                       "time_ids": torch.randn(batch, 6, generator=g)}
    latents = torch.randn(batch, 4, 16, 16, generator=g)
    return latents, torch.tensor([10, 700][:batch]), torch.randn(batch, 77, d, generator=g), kwargs


def randomize(adapter, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapter


def run(unet, adapter, users, seed=0):
    latents, t, text, kwargs = unet_inputs(unet, batch=users.shape[0], seed=seed)
    with torch.no_grad():
        if adapter is None:
            return unet(latents, t, text, **kwargs).sample
        return unet(latents, t, text, **adapter.unet_kwargs(adapter.user_tokens(users)), **kwargs).sample


def test_zero_init_and_scale_zero_are_bit_identical_to_base(unet):
    users = torch.randn(2, E)
    base = run(unet, None, users)
    adapter = PSAAdapter.for_unet(unet, embed_dim=E).attach(unet)
    try:
        assert torch.equal(run(unet, adapter, users), base)
        randomize(adapter)
        changed = run(unet, adapter, users)
        assert (changed - base).abs().max() > 1e-3
        adapter.set_scale(0.0)
        assert torch.equal(run(unet, adapter, users), base)
        adapter.set_scale({"down": 0.0, "mid": 0.0, "up": 0.0})
        assert torch.equal(run(unet, adapter, users), base)
    finally:
        adapter.detach()
    assert torch.equal(run(unet, None, users), base)


def test_two_users_differ(unet):
    adapter = randomize(PSAAdapter.for_unet(unet, embed_dim=E)).attach(unet)
    try:
        users = torch.randn(2, E)
        out = run(unet, adapter, users)
        assert not torch.allclose(out[0], run(unet, adapter, users.flip(0))[0], atol=1e-4)
    finally:
        adapter.detach()


def test_per_block_scale_matches_prefixes(unet):
    adapter = PSAAdapter.for_unet(unet, embed_dim=E).attach(unet)
    try:
        adapter.set_scale({"up": 0.5, "mid": 2.0})
        scales = adapter.layer_scales()
        for name, value in scales.items():
            expected = 0.5 if name.startswith("up_blocks.") else 2.0 if name.startswith("mid_block.") else 0.0
            assert value == expected, name
        first_up = next(n for n in scales if n.startswith("up_blocks."))
        block = ".".join(first_up.split(".")[:2])
        adapter.set_scale({"up": 0.5, block: 1.5})
        assert adapter.layer_scales()[first_up] == 1.5
    finally:
        adapter.detach()


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_fast_path_equals_general_attention(unet, num_tokens):
    adapter = randomize(PSAAdapter.for_unet(unet, embed_dim=E, num_tokens=num_tokens)).attach(unet)
    try:
        users = torch.randn(2, E)
        fast = run(unet, adapter, users)
        for proc in adapter._processors.values():
            proc.force_general_path = True
        general = run(unet, adapter, users)
        assert (fast - general).abs().max() < 1e-5
    finally:
        adapter.detach()


def test_k_greater_than_one_uses_every_token(unet):
    adapter = randomize(PSAAdapter.for_unet(unet, embed_dim=E, num_tokens=3)).attach(unet)
    try:
        latents, t, text, kwargs = unet_inputs(unet)
        tokens = adapter.user_tokens(torch.randn(2, E))
        with torch.no_grad():
            a = unet(latents, t, text, **adapter.unet_kwargs(tokens), **kwargs).sample
            tokens2 = tokens.clone()
            tokens2[:, 2] += 1.0  # change only the last user token
            b = unet(latents, t, text, **adapter.unet_kwargs(tokens2), **kwargs).sample
        assert (a - b).abs().max() > 1e-4
    finally:
        adapter.detach()


def test_k1_to_k_user_is_frozen_and_k3_trainable(unet):
    k1 = PSAAdapter.for_unet(unet, embed_dim=E, num_tokens=1)
    assert all(not b.to_k_user.weight.requires_grad for b in k1.branches.values())
    k3 = PSAAdapter.for_unet(unet, embed_dim=E, num_tokens=3)
    assert all(b.to_k_user.weight.requires_grad for b in k3.branches.values())


def test_save_load_roundtrip_is_exact(unet, tmp_path):
    adapter = randomize(PSAAdapter.for_unet(unet, embed_dim=E, num_tokens=2, encoder={"encoder_id": "x", "dim": E}))
    adapter.save_pretrained(tmp_path / "a")
    loaded = PSAAdapter.from_pretrained(tmp_path / "a", unet=unet)
    assert loaded.config == adapter.config
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    users = torch.randn(2, E)
    out = [run(unet, a.attach(unet), users) for a in (adapter,) if True]
    adapter.detach()
    out.append(run(unet, loaded.attach(unet), users))
    loaded.detach()
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("numbering", ["cross", "all"])
def test_reference_bin_loads_into_same_behaviour(unet, tmp_path, numbering):
    adapter = randomize(PSAAdapter.for_unet(unet, embed_dim=E))
    ref = reference_state_dict(adapter)
    if numbering == "all":
        ref["psa_adapter"] = {f"{2 * int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v
                              for k, v in ref["psa_adapter"].items()}
    ref["user_proj"] = {k: v.to(torch.bfloat16) for k, v in ref["user_proj"].items()}  # as the reference stores it
    torch.save(ref, tmp_path / "psa_adapter.bin")
    loaded = PSAAdapter.from_pretrained(tmp_path / "psa_adapter.bin", unet=unet)
    assert loaded.config.embed_dim == E and loaded.config.num_tokens == 1
    for layer in adapter.config.layers:
        assert torch.equal(loaded.branch(layer).to_v_user.weight, adapter.branch(layer).to_v_user.weight)
    proj = adapter.user_proj.proj.weight.to(torch.bfloat16).float()
    assert torch.equal(loaded.user_proj.proj.weight, proj)
    # The folder form and the safetensors variant load too.
    assert PSAAdapter.from_pretrained(tmp_path, unet=unet).config == loaded.config
    from safetensors.torch import save_file

    flat = {f"psa_adapter.{k}": v for k, v in ref["psa_adapter"].items()}
    flat.update({f"user_proj.{k}": v for k, v in ref["user_proj"].items()})
    save_file(flat, tmp_path / "ref.safetensors")
    again = PSAAdapter.from_pretrained(tmp_path / "ref.safetensors", unet=unet)
    assert torch.equal(again.user_proj.proj.weight, loaded.user_proj.proj.weight)


def test_reference_layer_order_is_down_up_mid():
    """The reference numbering follows unet.attn_processors: down blocks, then up blocks, then the mid block."""
    unet = tiny_sd15_pipeline().unet
    names = list(cross_attention_layers(unet))
    kinds = [n.split(".")[0] for n in names]
    first = {k: kinds.index(k) for k in ("down_blocks", "up_blocks", "mid_block")}
    assert first["down_blocks"] < first["up_blocks"] < first["mid_block"]
    assert kinds == sorted(kinds, key=["down_blocks", "up_blocks", "mid_block"].index)


def test_sd15_layout_counts():
    """The real SD1.5 UNet layout: 16 cross-attention layers, widths summing to 12,480, ~21.9 M parameters."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
        adapter = PSAAdapter.for_unet(unet, embed_dim=3584)
    assert len(adapter.config.layers) == 16
    assert sum(adapter.config.layers.values()) == 12480
    total = sum(p.numel() for p in adapter.parameters())
    assert abs(total - 21.9e6) < 0.05e6


def test_bad_reference_keys_and_mismatch_errors(unet, tmp_path):
    adapter = PSAAdapter.for_unet(unet, embed_dim=E)
    ref = reference_state_dict(adapter)
    ref["psa_adapter"]["0.to_q_user.0.weight"] = torch.zeros(1)
    torch.save(ref, tmp_path / "bad.bin")
    with pytest.raises(AdapterMismatchError, match="unexpected adapter keys"):
        PSAAdapter.from_pretrained(tmp_path / "bad.bin", unet=unet)
    other = tiny_sdxl_pipeline().unet if unet.config.cross_attention_dim == 32 else tiny_sd15_pipeline().unet
    with pytest.raises(AdapterMismatchError, match="does not fit"):
        adapter.attach(other)
    with pytest.raises(AdapterMismatchError, match=r"shape \(batch, 24\)"):
        adapter.user_tokens(torch.randn(2, E + 1))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PSAAdapter.from_pretrained(tmp_path / "nope", unet=unet)


def test_missing_or_misbatched_user_tokens_is_an_error(unet):
    adapter = PSAAdapter.for_unet(unet, embed_dim=E).attach(unet)
    try:
        latents, t, text, kwargs = unet_inputs(unet)
        with pytest.raises(MissingUserTokensError, match="no user tokens.*user_embeds"):
            unet(latents, t, text, **kwargs)
        adapter.set_scale(0.0)  # even where the branch would add nothing: the call is wrong
        with pytest.raises(MissingUserTokensError, match="no user tokens"):
            unet(latents, t, text, **kwargs)
        tokens = adapter.user_tokens(torch.randn(1, E))  # one row for a batch of two
        with pytest.raises(MissingUserTokensError, match=r"shape \(2, 1, D\).*classifier-free guidance"):
            unet(latents, t, text, **adapter.unet_kwargs(tokens), **kwargs)
    finally:
        adapter.detach()


def test_attach_adds_only_the_adapter_to_the_unet_and_detach_restores_it(unet):
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = unet.attn_processors
    adapter = PSAAdapter.for_unet(unet, embed_dim=E).attach(unet)
    after = unet.state_dict()
    # Processors are modules: the adapter's weights show in the UNet's state dict (and follow unet.to()).
    added = sorted(set(after) - set(before))
    assert set(before) <= set(after)
    assert len(added) == 2 * len(adapter.config.layers)
    assert all(".processor.branch.to_" in k for k in added)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    adapter.detach()
    assert list(unet.state_dict()) == list(before)
    assert all(unet.attn_processors[n] is p for n, p in processors.items())


def test_attached_adapter_does_not_own_the_unet(unet):
    adapter = PSAAdapter.for_unet(unet, embed_dim=E).attach(unet)
    try:
        names = {k.split(".")[0] for k in adapter.state_dict()}
        assert names == {"user_proj", "branches"}
        assert sum(p.numel() for p in adapter.parameters()) < sum(p.numel() for p in unet.parameters())
    finally:
        adapter.detach()


def test_standardize_variant_roundtrips_and_separates_near_parallel_users(unet, tmp_path):
    base = torch.randn(E)
    users = base + 1e-3 * torch.randn(8, E)  # nearly parallel, like real user embeddings
    adapter = PSAAdapter.for_unet(unet, embed_dim=E, embed_norm="standardize")
    adapter.fit_embedding_norm(users)
    standardized = (users - adapter.user_proj.embed_mean) / adapter.user_proj.embed_std
    assert torch.allclose(standardized.std(0), torch.ones(E), atol=1e-4)
    adapter.save_pretrained(tmp_path / "s")
    loaded = PSAAdapter.from_pretrained(tmp_path / "s", unet=unet)
    assert loaded.config.embed_norm == "standardize"
    assert torch.equal(loaded.user_tokens(users), adapter.user_tokens(users))
    assert torch.equal(loaded.null_tokens(2), adapter.null_tokens(2))
    with pytest.raises(ValueError, match="embed_norm"):
        PSAAdapter.for_unet(unet, embed_dim=E).fit_embedding_norm(users)


# The published UNet configuration of stabilityai/stable-diffusion-xl-base-1.0 (unet/config.json), written out so
# that no download is needed; the UNet is built on the meta device (no weights, no memory).
SDXL_BASE_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}


def test_sdxl_layout_counts_on_the_published_config():
    """SDXL base: 70 cross-attention layers whose widths H sum to 83,200 (SPEC section 2); ~348 M parameters at
    E = 3584, K = 1, of which the user projection is 3584 * 2048 + 2048 + 2 * 2048."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_BASE_UNET_CONFIG)
        adapter = PSAAdapter.for_unet(unet, embed_dim=3584)
    assert adapter.config.base_family == "sdxl" and adapter.config.cross_attention_dim == 2048
    assert len(adapter.config.layers) == 70
    assert sum(adapter.config.layers.values()) == 83200
    proj = sum(p.numel() for p in adapter.user_proj.parameters())
    assert proj == 3584 * 2048 + 2048 + 2 * 2048
    total = sum(p.numel() for p in adapter.parameters())
    assert total == proj + 2 * 2048 * 83200  # to_k_user and to_v_user: (H, D) each, no bias
    assert abs(total - 348e6) < 0.5e6


def test_per_block_scale_in_the_ip_adapter_format(unet):
    """``{"down": {"block_<i>": [per attention module]}, "up": {"block_<i>": float}}`` as set_ip_adapter_scale."""
    adapter = PSAAdapter.for_unet(unet, embed_dim=E).attach(unet)
    try:
        layers = list(adapter.config.layers)
        down_block = next(n for n in layers if n.startswith("down_blocks.")).split(".")[1]
        up_block = next(n for n in layers if n.startswith("up_blocks.")).split(".")[1]
        adapter.set_scale({"down": {f"block_{down_block}": [0.25, 0.75]}, "up": {f"block_{up_block}": 0.5}})
        for name, value in adapter.layer_scales().items():
            parts = name.split(".")
            if parts[0] == "down_blocks" and parts[1] == down_block:
                expected = [0.25, 0.75][int(parts[3])]  # down_blocks.<i>.attentions.<j>...
            elif parts[0] == "up_blocks" and parts[1] == up_block:
                expected = 0.5
            else:
                expected = 0.0
            assert value == expected, name
        assert {p.scale for p in adapter._processors.values()} == set(adapter.layer_scales().values())
        with pytest.raises(ValueError, match="block keys look like 'block_0'"):
            adapter.set_scale({"down": {"first": 1.0}})
    finally:
        adapter.detach()
