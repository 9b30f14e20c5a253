"""The PSA adapter: a user projection plus a zero-initialised user branch in every cross-attention layer.

Shapes: ``E`` user-embedding size, ``K`` user tokens, ``D = unet.config.cross_attention_dim``, ``H`` the attention
width of one ``attn2`` layer. ``attach`` wraps the UNet's attention processors (``psa_adapter.attention``); the user
tokens ``user_tokens(u)`` (B, K, D) then travel explicitly with every UNet call, as
``cross_attention_kwargs={"psa_user_tokens": tokens}``, never inside the text sequence. The pipeline verbs
(``load_psa_adapter``, ``pipe(prompt, user_embeds=u)``, ``set_psa_scale``, ``unload_psa_adapter``) live in
``psa_adapter.loaders``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from psa_adapter.attention import USER_TOKENS_KWARG, PSAAttnProcessor, PSAPassThroughProcessor
from psa_adapter.errors import AdapterMismatchError
from psa_adapter.reference import reference_adapter_state
from psa_adapter.utils import atomic_write, read_utf8

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "psa_adapter.safetensors"
REFERENCE_BIN_NAME = "psa_adapter.bin"
# Short block names accepted by `set_scale`, as in diffusers' `set_ip_adapter_scale`.
_BLOCK_ALIASES = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def is_sdxl_unet(unet) -> bool:
    """SDXL-style UNets take pooled text embeddings and time ids (``addition_embed_type == "text_time"``)."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def cross_attention_layers(unet) -> dict[str, int]:
    """Every cross-attention (``attn2``) module name of ``unet`` mapped to its attention width ``H``.

    The order is the order of ``unet.attn_processors``, which the reference checkpoint format relies on.
    """
    modules = dict(unet.named_modules())
    layers = {}
    for proc_name in unet.attn_processors:
        name = proc_name.removesuffix(".processor")
        if not name.endswith("attn2"):
            continue
        layers[name] = modules[name].to_q.out_features
    return layers


@dataclass
class PSAAdapterConfig:
    """Everything needed to rebuild an adapter and to check that it fits a UNet and an embedding store."""

    embed_dim: int
    num_tokens: int
    cross_attention_dim: int
    layers: dict[str, int]
    base_family: str = "sd15"
    encoder: dict | None = None
    # "none" is the paper's design. "standardize" (our variant) divides each embedding dimension by its spread over
    # the training users after subtracting their mean: LLM/sentence embeddings of different users are nearly
    # parallel (cosine ~0.99), and standardising makes their differences visible to the projection.
    embed_norm: str = "none"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.embed_norm not in ("none", "standardize"):
            raise ValueError(f"PSAAdapterConfig.embed_norm must be 'none' or 'standardize', got {self.embed_norm!r}")
        for name, value in (("embed_dim", self.embed_dim), ("num_tokens", self.num_tokens),
                            ("cross_attention_dim", self.cross_attention_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PSAAdapterConfig.{name} must be a positive integer, got {value!r}")
        if not self.layers:
            raise ValueError("PSAAdapterConfig.layers is empty: the UNet has no cross-attention layers")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"adapter format version {self.format_version} is newer than this code supports ({FORMAT_VERSION})"
            )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PSAAdapterConfig:
        try:
            data = json.loads(read_utf8(path))
        except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
            raise AdapterMismatchError(f"cannot read adapter config {path}: {err}") from err
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise AdapterMismatchError(f"{path}: unknown adapter config keys {sorted(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:  # a missing field, a value of the wrong type or range
            raise AdapterMismatchError(f"{path}: {err}") from err


class UserProjection(nn.Module):
    """``Linear(E -> K*D)`` then ``LayerNorm(D)``: (B, E) user embeddings to (B, K, D) user tokens."""

    def __init__(self, embed_dim: int, num_tokens: int, cross_attention_dim: int, standardize: bool = False):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.standardize = standardize
        if standardize:
            self.register_buffer("embed_mean", torch.zeros(embed_dim))
            self.register_buffer("embed_std", torch.ones(embed_dim))

    def forward(self, user_embeds: torch.Tensor, raw: bool = False) -> torch.Tensor:
        """(B, E) -> (B, K, D). ``raw=True`` skips the optional standardisation (used for ``proj(0)``)."""
        x = user_embeds.to(self.proj.weight.dtype)
        if self.standardize and not raw:
            x = (x - self.embed_mean) / self.embed_std
        tokens = self.proj(x)
        return self.norm(tokens.reshape(-1, self.num_tokens, self.cross_attention_dim))


class UserBranch(nn.Module):
    """The per-layer key/value projections of the user tokens, zero at initialisation."""

    def __init__(self, cross_attention_dim: int, hidden_size: int):
        super().__init__()
        self.to_k_user = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_user = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        nn.init.zeros_(self.to_k_user.weight)
        nn.init.zeros_(self.to_v_user.weight)


def _download(repo_id: str | os.PathLike) -> Path:
    """A Hugging Face Hub id (a string ``owner/name``) as a local folder holding an adapter, via the Hub's cache."""
    if not isinstance(repo_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise FileNotFoundError(f"adapter path does not exist: {repo_id}")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, REFERENCE_BIN_NAME])
    except Exception as err:  # noqa: BLE001 - hub errors vary by version; re-raised with the id
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"adapter {repo_id!r} is neither a local path nor a Hub repository that could be "
                                f"fetched: {first_line}") from err
    return Path(folder)


def _module_key(layer_name: str) -> str:
    # ModuleDict keys may not contain dots.
    return layer_name.replace(".", "__")


class PSAAdapter(nn.Module):
    """Trainable PSA weights; ``attach`` installs them into a UNet's cross-attention processors.

    The adapter's parameters live here, never inside the UNet, so the UNet stays frozen and unchanged and the
    reference model of the DPO loss is simply the same UNet with the adapter at scale 0.
    """

    def __init__(self, config: PSAAdapterConfig):
        super().__init__()
        self.config = config
        standardize = config.embed_norm == "standardize"
        self.user_proj = UserProjection(
            config.embed_dim, config.num_tokens, config.cross_attention_dim, standardize=standardize
        )
        self.branches = nn.ModuleDict(
            {_module_key(name): UserBranch(config.cross_attention_dim, width) for name, width in config.layers.items()}
        )
        if config.num_tokens == 1:
            # Softmax over one key is 1: to_k_user can never get a gradient. Kept for checkpoint compatibility.
            for branch in self.branches.values():
                branch.to_k_user.weight.requires_grad_(False)
        # Plain attribute, not a submodule: the UNet must never become part of the adapter's parameters.
        self.__dict__["_unet"] = None
        # While attached: the user-branch processors by attn2 layer, and every wrapper by processor name.
        self._processors: dict[str, PSAAttnProcessor] = {}
        self._wrappers: dict[str, PSAAttnProcessor | PSAPassThroughProcessor] = {}
        self._original_processors: dict = {}
        self._scale: float | dict = 1.0

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def for_unet(
        cls, unet, embed_dim: int, num_tokens: int = 1, encoder: dict | None = None, embed_norm: str = "none"
    ) -> PSAAdapter:
        """A fresh adapter (zero user branch, default-initialised projection) shaped for ``unet``."""
        config = PSAAdapterConfig(
            embed_dim=int(embed_dim),
            num_tokens=int(num_tokens),
            cross_attention_dim=int(unet.config.cross_attention_dim),
            layers=cross_attention_layers(unet),
            base_family="sdxl" if is_sdxl_unet(unet) else "sd15",
            encoder=encoder,
            embed_norm=embed_norm,
        )
        return cls(config)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def branch(self, layer_name: str) -> UserBranch:
        return self.branches[_module_key(layer_name)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------- user tokens
    def user_tokens(self, user_embeds: torch.Tensor) -> torch.Tensor:
        """(B, E) user embeddings -> (B, K, D) user tokens."""
        if user_embeds.ndim != 2 or user_embeds.shape[1] != self.config.embed_dim:
            raise AdapterMismatchError(
                f"user embeddings must have shape (batch, {self.config.embed_dim}), got {tuple(user_embeds.shape)}"
            )
        return self.user_proj(user_embeds)

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        """``proj(0)`` tokens (B, K, D): what the unconditional branch of classifier-free guidance receives.

        With ``embed_norm="standardize"`` the zero is taken after standardisation, i.e. the mean training user.
        """
        weight = self.user_proj.proj.weight
        zeros = torch.zeros(batch_size, self.config.embed_dim, device=weight.device, dtype=weight.dtype)
        return self.user_proj(zeros, raw=True)

    def fit_embedding_norm(self, user_embeds: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the standardisation statistics from (N, E) training-user embeddings (``embed_norm="standardize"``)."""
        if not self.user_proj.standardize:
            raise ValueError("fit_embedding_norm needs an adapter built with embed_norm='standardize'")
        x = torch.as_tensor(user_embeds, dtype=torch.float64)
        if x.ndim != 2 or x.shape[1] != self.config.embed_dim or x.shape[0] < 2:
            raise ValueError(f"expected (N >= 2, {self.config.embed_dim}) embeddings, got {tuple(x.shape)}")
        with torch.no_grad():
            self.user_proj.embed_mean.copy_(x.mean(0))
            self.user_proj.embed_std.copy_(x.std(0).clamp_min(eps))

    def unet_kwargs(self, user_tokens: torch.Tensor) -> dict:
        """The keyword arguments that carry (B, K, D) ``user_tokens`` into an adapted UNet call."""
        return {"cross_attention_kwargs": {USER_TOKENS_KWARG: user_tokens}}

    # ------------------------------------------------------------------------------------------- attach / detach
    def check_unet(self, unet) -> None:
        """Raise ``AdapterMismatchError`` saying exactly how this adapter and ``unet`` disagree."""
        problems = []
        d = int(unet.config.cross_attention_dim)
        if d != self.config.cross_attention_dim:
            problems.append(f"cross_attention_dim: adapter {self.config.cross_attention_dim}, UNet {d}")
        layers = cross_attention_layers(unet)
        missing = [n for n in layers if n not in self.config.layers]
        extra = [n for n in self.config.layers if n not in layers]
        if missing:
            problems.append(f"{len(missing)} UNet cross-attention layers have no adapter weights, e.g. {missing[0]}")
        if extra:
            problems.append(f"{len(extra)} adapter layers do not exist in the UNet, e.g. {extra[0]}")
        widths = [f"{n}: adapter {self.config.layers[n]}, UNet {w}" for n, w in layers.items()
                  if n in self.config.layers and self.config.layers[n] != w]
        if widths:
            problems.append(f"{len(widths)} layers differ in width, e.g. {widths[0]}")
        if problems:
            raise AdapterMismatchError("adapter does not fit this UNet: " + "; ".join(problems))

    def attach(self, unet) -> PSAAdapter:
        """Wrap the processor of every attention layer of ``unet``: ``attn2`` layers get the user branch
        (``PSAAttnProcessor``), self-attention layers a pass-through. The processors installed before keep running
        underneath, so PSA composes with them. Attaching again after the UNet's processors were replaced wraps the
        new ones."""
        if self._unet is not None and self._unet is not unet:
            raise RuntimeError("this adapter is already attached to another UNet; call detach() first")
        if self._unet is unet and not self.replaced_layers():
            return self
        self.check_unet(unet)
        ours = {id(p) for p in self._wrappers.values()}
        base = {name: p.base_processor if id(p) in ours else p for name, p in unet.attn_processors.items()}
        self._processors, self._wrappers = {}, {}
        for proc_name, processor in base.items():
            layer = proc_name.removesuffix(".processor")
            if layer in self.config.layers:
                wrapper = PSAAttnProcessor(processor, self.branch(layer), self.config.num_tokens)
                self._processors[layer] = wrapper
            else:
                wrapper = PSAPassThroughProcessor(processor)
            self._wrappers[proc_name] = wrapper
        self._original_processors = base
        unet.set_attn_processor(dict(self._wrappers))
        self.__dict__["_unet"] = unet
        self.set_scale(self._scale)
        return self

    def detach(self) -> None:
        """Give the UNet back the processors it had before ``attach`` (the base model again)."""
        if self._unet is None:
            return
        self._unet.set_attn_processor(dict(self._original_processors))
        self.__dict__["_unet"] = None
        self._processors, self._wrappers, self._original_processors = {}, {}, {}

    @property
    def unet(self):
        """The UNet this adapter is attached to, or None."""
        return self._unet

    def replaced_layers(self) -> list[str]:
        """Attention layers of the attached UNet whose processor is no longer this adapter's (replaced since)."""
        if self._unet is None:
            return []
        current = self._unet.attn_processors
        return [name.removesuffix(".processor") for name, proc in self._wrappers.items()
                if current.get(name) is not proc]

    def check_attached(self, unet) -> None:
        """Raise ``RuntimeError`` saying what to do unless this adapter sits, intact, on ``unet``."""
        if self._unet is not unet:
            raise RuntimeError("the PSA adapter is not attached to this pipeline's UNet: load it with "
                               "load_psa_adapter(pipe, path) (or adapter.attach(pipe.unet))")
        replaced = self.replaced_layers()
        if replaced:
            raise RuntimeError(
                f"the attention processors of {len(replaced)} UNet layers (e.g. {replaced[0]}) were replaced after "
                "the PSA adapter was attached (unet.set_attn_processor, enable_xformers_memory_efficient_attention, "
                "...), which removed the adapter there: call pipe.load_psa_adapter(...) again (or "
                "adapter.attach(unet)) to wrap the new processors; install other processors before the adapter"
            )

    # ----------------------------------------------------------------------------------------------------- scale
    def set_scale(self, scale: float | Mapping[str, float]) -> None:
        """A float for every layer, or per block in the format of diffusers' ``set_ip_adapter_scale``.

        Dict keys are ``"down"``, ``"mid"``, ``"up"``, or any prefix of a layer name such as ``"up_blocks.1"``.
        A value is a float, or for ``"down"``/``"up"`` a dict ``{"block_<i>": float or [one float per attention
        module of the block]}``, e.g. ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": 1.0}}``. The most
        specific key wins and layers no key matches get 0, as diffusers' IP-Adapter scales do.
        """
        rules = self._scale_rules(scale)
        self._scale = scale
        for layer, processor in self._processors.items():
            processor.scale = self._layer_scale(layer, rules)

    @staticmethod
    def _scale_rules(scale: float | Mapping) -> list[tuple[str, float]] | float:
        """``scale`` as (layer-name prefix, value) pairs, or one float."""
        if not isinstance(scale, Mapping):
            return float(scale)
        rules = []
        for key, value in scale.items():
            prefix = _BLOCK_ALIASES.get(key, key)
            if not isinstance(value, Mapping):
                rules.append((prefix, float(value)))
                continue
            for block, block_value in value.items():
                index = str(block).removeprefix("block_")
                if not index.isdigit():
                    raise ValueError(f"PSA scale: block keys look like 'block_0', got {block!r} under {key!r}")
                if isinstance(block_value, (list, tuple)):
                    rules += [(f"{prefix}.{index}.attentions.{j}", float(v)) for j, v in enumerate(block_value)]
                else:
                    rules.append((f"{prefix}.{index}", float(block_value)))
        return rules

    @staticmethod
    def _layer_scale(layer: str, rules: list[tuple[str, float]] | float) -> float:
        if not isinstance(rules, list):
            return rules
        best, best_len = 0.0, -1
        for prefix, value in rules:
            if (layer == prefix or layer.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = value, len(prefix)
        return best

    def layer_scales(self) -> dict[str, float]:
        rules = self._scale_rules(self._scale)
        return {layer: self._layer_scale(layer, rules) for layer in self.config.layers}

    @contextlib.contextmanager
    def scale_context(self, scale: float | Mapping[str, float]) -> Iterator[None]:
        """Temporarily use ``scale``; ``scale_context(0.0)`` is exactly the frozen base model."""
        previous = self._scale
        self.set_scale(scale)
        try:
            yield
        finally:
            self.set_scale(previous)

    # ------------------------------------------------------------------------------------------- saving / loading
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights keyed by layer name (our file format), e.g. ``down_blocks.0...attn2.to_v_user.weight``."""
        state = {f"user_proj.{k}": v for k, v in self.user_proj.state_dict().items()}
        for layer in self.config.layers:
            branch = self.branch(layer)
            state[f"{layer}.to_k_user.weight"] = branch.to_k_user.weight
            state[f"{layer}.to_v_user.weight"] = branch.to_v_user.weight
        return {k: v.detach().contiguous() for k, v in state.items()}

    def load_adapter_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Load weights keyed as ``adapter_state_dict`` writes them; every key and shape must match."""
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing keys, e.g. {missing[0]}")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
            raise AdapterMismatchError(f"{source}: " + "; ".join(parts))
        for key, target in expected.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise AdapterMismatchError(
                    f"{source}: {key} has shape {tuple(state[key].shape)}, expected {tuple(target.shape)}"
                )
            bad = (~torch.isfinite(state[key])).sum().item()
            if bad:
                raise AdapterMismatchError(
                    f"{source}: {key} holds {bad} NaN/inf values; the file is corrupt or comes from a diverged "
                    "training run: use an earlier checkpoint"
                )
        with torch.no_grad():
            proj = {k.removeprefix("user_proj."): state[k] for k in expected if k.startswith("user_proj.")}
            self.user_proj.load_state_dict({k: v.to(self.user_proj.proj.weight.dtype) for k, v in proj.items()})
            for layer in self.config.layers:
                branch = self.branch(layer)
                branch.to_k_user.weight.copy_(state[f"{layer}.to_k_user.weight"])
                branch.to_v_user.weight.copy_(state[f"{layer}.to_v_user.weight"])

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``psa_adapter.safetensors`` into ``save_directory`` (each atomically)."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.cpu() for k, v in self.adapter_state_dict().items()}
        atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        text = json.dumps(asdict(self.config), indent=2) + "\n"
        atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, unet=None, embed_dim: int | None = None) -> PSAAdapter:
        """Load our folder format, or the reference ``psa_adapter.bin`` / ``.safetensors`` (which needs ``unet``).

        When ``unet`` is given the adapter is checked against it (but not attached).
        """
        spec, path = path, Path(path)
        if not path.exists():
            path = _download(spec)
        if path.is_dir() and (path / CONFIG_NAME).exists():
            config = PSAAdapterConfig.from_json_file(path / CONFIG_NAME)
            adapter = cls(config)
            weights = path / WEIGHTS_NAME
            if not weights.exists():
                raise FileNotFoundError(f"adapter folder {path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
            from safetensors.torch import load_file

            try:
                state = load_file(str(weights))
            except Exception as err:  # noqa: BLE001 - safetensors raises its own type; one message naming the file
                raise AdapterMismatchError(f"{weights}: not a readable safetensors file (truncated or damaged? "
                                           f"{err})") from None
            adapter.load_adapter_state_dict(state, source=str(weights))
            if unet is not None:
                adapter.check_unet(unet)
            return adapter
        if path.is_dir():
            candidates = [path / REFERENCE_BIN_NAME, path / "psa_adapter.safetensors"]
            found = [c for c in candidates if c.exists()]
            if not found:
                raise FileNotFoundError(
                    f"{path} holds neither our adapter ({CONFIG_NAME} + {WEIGHTS_NAME}) nor a reference "
                    f"{REFERENCE_BIN_NAME}"
                )
            path = found[0]
        if unet is None:
            raise ValueError(f"loading the reference-format adapter {path} needs the UNet it was trained for")
        layers = cross_attention_layers(unet)
        d = int(unet.config.cross_attention_dim)
        state, num_tokens, embed_dim = reference_adapter_state(path, list(layers), d)
        adapter = cls(PSAAdapterConfig(embed_dim=embed_dim, num_tokens=num_tokens, cross_attention_dim=d,
                                       layers=layers, base_family="sdxl" if is_sdxl_unet(unet) else "sd15",
                                       encoder=None))
        adapter.load_adapter_state_dict(state, source=str(path))
        return adapter


__all__ = [
    "AdapterMismatchError",
    "PSAAdapter",
    "PSAAdapterConfig",
    "UserProjection",
    "cross_attention_layers",
    "is_sdxl_unet",
]
