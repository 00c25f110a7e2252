"""The PEFT wrapper: a frozen base model plus named adapters of any method, one active at a time.

In the spirit of HF PEFT's ``get_peft_model``: the base's parameters are frozen, the active adapter's
are trainable, ``print_trainable_parameters`` reports the share; ``add_adapter`` / ``set_adapter`` /
``disable_adapter`` / ``delete_adapter`` manage several adapters on one base. LoRA, IA³ and bottleneck
adapters live inside the model (wrapped layers); prompt, P- and prefix tuning live here and act in
``forward`` (virtual input embeddings, or prefix K/V in each layer's cache).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .adapter import BottleneckConfig, add_bottleneck
from .config import PeftConfig
from .families import embed_scale, embed_tokens, family_of, input_embeddings, kv_shape, param_count
from .ia3 import IA3Config, IA3Linear, add_ia3
from .lora import LoraConfig, LoraLinear, add_lora
from .p_tuning import PromptEncoder, PromptEncoderConfig
from .prefix_tuning import PrefixCache, PrefixEncoder, PrefixTuningConfig, split_prefix
from .prompt_encoder import VirtualTokens
from .prompt_tuning import PromptEmbedding, PromptTuningConfig
from .save_load import fill_adapter, load_adapter, read_adapter, save_adapter
from .tuner import TunerLayer, innermost, tuner_layers


class PeftModel(nn.Module):
    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default",
                 tokenizer: Any = None) -> None:
        super().__init__()
        self.base_model = model
        self.family = family_of(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.targets: dict[str, list[str]] = {}  # adapter → adapted module names
        self.prompt_encoders = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config, tokenizer)
        self.set_adapter(adapter_name)

    # -- adapters ---------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: PeftConfig, tokenizer: Any = None) -> None:
        """Add adapter ``name`` (not activated; see :meth:`set_adapter`)."""
        if name in self.peft_config:
            raise ValueError(f"adapter {name!r} already exists (adapters: {list(self.peft_config)})")
        if not name or "." in name:
            raise ValueError(f"adapter name {name!r} must be non-empty and without dots")
        config = self._complete(config)
        fam, m = self.family, self.base_model
        if isinstance(config, LoraConfig):
            done = add_lora(m, name, config, list(fam.lora_targets))
        elif isinstance(config, IA3Config):
            done = add_ia3(m, name, config, list(fam.ia3_targets), list(fam.ia3_feedforward))
        elif isinstance(config, BottleneckConfig):
            done = add_bottleneck(m, name, config, kv_shape(m)[1])
        elif isinstance(config, PromptTuningConfig):
            ids = None
            if config.prompt_tuning_init == "TEXT":
                if tokenizer is None:
                    raise ValueError("prompt_tuning_init='TEXT' needs a tokenizer (pass tokenizer=...)")
                ids = tokenizer.encode(config.prompt_tuning_init_text, add_special_tokens=False)
            self.prompt_encoders[name] = PromptEmbedding(config, input_embeddings(m), ids, embed_scale(m))
            done = []
        elif isinstance(config, PromptEncoderConfig):
            self.prompt_encoders[name] = PromptEncoder(config, kv_shape(m)[1]).to(input_embeddings(m).weight)
            done = []
        elif isinstance(config, PrefixTuningConfig):
            self.prompt_encoders[name] = PrefixEncoder(config).to(input_embeddings(m).weight)
            done = []
        else:
            raise ValueError(f"unsupported PEFT config {type(config).__name__}")
        if not config.is_prompt_learning and not done:
            raise ValueError(f"{config.peft_type}: no module of {type(m).__name__} matches the target modules "
                             f"{getattr(config, 'target_modules', None)}")
        self.peft_config[name], self.targets[name] = config, done
        if self.active_adapter is not None:
            self.set_adapter(self.active_adapter)  # new layers learn which adapter is active

    def _complete(self, config: PeftConfig) -> PeftConfig:
        """Fill in the model-dependent fields HF PEFT writes into adapter_config.json."""
        n_layers, d, n_kv, hd = kv_shape(self.base_model)
        if isinstance(config, PrefixTuningConfig):
            return replace(config, token_dim=n_kv * hd, num_layers=n_layers, num_attention_heads=n_kv,
                           encoder_hidden_size=config.encoder_hidden_size or n_kv * hd)
        if isinstance(config, (PromptTuningConfig, PromptEncoderConfig)):
            n_heads = innermost(self.base_model.layers[0].self_attn).n_heads  # type: ignore[index]
            return replace(config, token_dim=d, num_layers=n_layers, num_attention_heads=n_heads)
        return config

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter; only its parameters are trainable (none in inference mode)."""
        self._check(name)
        self.active_adapter = name
        for _, layer in tuner_layers(self.base_model):
            layer.active_adapter = name
        self.requires_grad_(False)
        if not self.peft_config[name].inference_mode:
            for p in self.adapter_parameters(name).values():
                p.requires_grad_(True)

    def delete_adapter(self, name: str) -> None:
        self._check(name)
        for _, layer in tuner_layers(self.base_model):
            layer.delete(name)
        if name in self.prompt_encoders:
            del self.prompt_encoders[name]
        del self.peft_config[name], self.targets[name]
        if self.active_adapter == name:
            self.active_adapter = None
            for _, layer in tuner_layers(self.base_model):
                layer.active_adapter = None

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base model's outputs."""
        layers = [layer for _, layer in tuner_layers(self.base_model)]
        saved = self.disabled
        self.disabled = True
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            self.disabled = saved
            for layer in layers:
                layer.disabled = saved

    def _check(self, name: str) -> None:
        if name not in self.peft_config:
            raise ValueError(f"no adapter named {name!r} (adapters: {list(self.peft_config)})")

    @property
    def active_config(self) -> PeftConfig | None:
        return None if self.disabled or self.active_adapter is None else self.peft_config[self.active_adapter]

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s parameters by attnkit module name (``layers.0.self_attn.q_proj.lora_A.weight``)."""
        out: dict[str, nn.Parameter] = {}
        for module_name, layer in tuner_layers(self.base_model):
            if name in layer.adapter_names():
                out.update({f"{module_name}.{k}": p for k, p in layer.adapter_state(name).items()})
        if name in self.prompt_encoders:
            out.update({f"prompt_encoder.{k}": p for k, p in self.prompt_encoders[name].named_parameters()})
        return out

    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        return param_count(self)

    def print_trainable_parameters(self) -> str:
        t, n = self.trainable_parameters()
        line = f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}"
        print(line)
        return line

    # -- merging (LoRA, IA³) ------------------------------------------------------------------------
    def _mergeable(self, name: str) -> list[LoraLinear | IA3Linear]:
        self._check(name)
        if not isinstance(self.peft_config[name], (LoraConfig, IA3Config)):
            raise ValueError(f"adapter {name!r} ({self.peft_config[name].peft_type}) cannot be merged into the weights; "
                             "only LoRA and IA3 can")
        return [l for _, l in tuner_layers(self.base_model)
                if isinstance(l, (LoraLinear, IA3Linear)) and name in l.adapter_names()]

    def merge_adapter(self, name: str | None = None) -> None:
        for layer in self._mergeable(name or self._active_name()):
            layer.merge(name or self._active_name())

    def unmerge_adapter(self, name: str | None = None) -> None:
        for layer in self._mergeable(name or self._active_name()):
            layer.unmerge(name or self._active_name())

    def merge_and_unload(self) -> nn.Module:
        """The base model with the active adapter merged into its weights and every wrapper removed."""
        self.merge_adapter()
        return self.unload()

    def unload(self) -> nn.Module:
        """The base model without any adapter layers (merged weights stay merged)."""
        m = self.base_model
        for name, module in list(m.named_modules()):
            if isinstance(module, TunerLayer) and ".base_layer" not in name:
                parent, _, child = name.rpartition(".")
                setattr(m.get_submodule(parent) if parent else m, child, innermost(module))
        return m

    def _active_name(self) -> str:
        if self.active_adapter is None:
            raise ValueError("no active adapter")
        return self.active_adapter

    # -- forward ----------------------------------------------------------------------------------
    def new_cache(self) -> list:
        return self.base_model.new_cache()  # type: ignore[operator]

    def forward(self, idx: torch.Tensor | None = None, *args: Any, cache: list | None = None, **kw: Any) -> torch.Tensor:
        """The base model's forward with the active adapter; same arguments, same output shape.

        Prompt methods act on a fresh sequence only (``cache`` None or empty): the virtual tokens are
        put in front (their logits are not returned) or the prefix K/V into the cache; a continued
        cache already holds them.
        """
        if cache is not None:
            kw["cache"] = cache
        cfg = self.active_config
        if cfg is None or not cfg.is_prompt_learning or (cache is not None and cache[0].length > 0):
            return self.base_model(idx, *args, **kw)
        if kw.get("positions") is not None or kw.get("logits_indices") is not None:
            raise ValueError(f"{cfg.peft_type} does not support explicit positions / logits_indices")
        encoder = self.prompt_encoders[self.active_adapter]  # type: ignore[index]
        if isinstance(cfg, PrefixTuningConfig):
            return self._forward_prefix(encoder, idx, args, kw)
        return self._forward_prompt(encoder, idx, args, kw)

    def _forward_prompt(self, encoder: VirtualTokens, idx: torch.Tensor | None, args: tuple, kw: dict) -> torch.Tensor:
        x = kw.pop("inputs_embeds", None)
        x = embed_tokens(self.base_model, idx) if x is None else x  # (B, T, d), scaled as the model's input
        B = x.shape[0]
        prompt = encoder().to(x.dtype)  # (P, d)
        P = prompt.shape[0]
        x = torch.cat([prompt[None].expand(B, -1, -1), x], dim=1)  # (B, P+T, d)
        if not self.family.causal:
            mask, types = (args + (None, None))[:2] if args else (kw.pop("attention_mask", None), kw.pop("token_type_ids", None))
            args = ()
            if mask is not None:
                kw["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)
            if types is not None:
                kw["token_type_ids"] = torch.cat([types.new_zeros(B, P), types], dim=1)
            return self.base_model(None, *args, inputs_embeds=x, **kw)[:, P:]
        out = self.base_model(None, *args, inputs_embeds=x, **kw)
        return out if kw.get("last_only") else out[:, P:]

    def _forward_prefix(self, encoder: VirtualTokens, idx: torch.Tensor | None, args: tuple, kw: dict) -> torch.Tensor:
        n_layers, _, n_kv, hd = kv_shape(self.base_model)
        B = (idx if idx is not None else kw["inputs_embeds"]).shape[0]
        kv = split_prefix(encoder(), n_layers, n_kv, hd, B)
        if self.family.causal:
            cache = kw.get("cache")
            if cache is None:
                kw["cache"] = [PrefixCache(k, v) for k, v in kv]
            else:  # a fresh generation cache starts with the prefix
                for c, (k, v) in zip(cache, kv):
                    c.update(k, v)
            return self.base_model(idx, *args, **kw)
        return self._encoder_with_prefix(kv, idx, args, kw)

    def _encoder_with_prefix(self, kv: list, idx: torch.Tensor | None, args: tuple, kw: dict) -> torch.Tensor:
        """An encoder has no cache argument: a pre-hook hands each attention its prefix cache and
        widens the padding mask by the P prefix positions (always visible)."""
        handles = []
        for layer, (k, v) in zip(self.base_model.layers, kv):  # type: ignore[union-attr]
            def hook(mod: nn.Module, a: tuple, kwargs: dict, k: torch.Tensor = k, v: torch.Tensor = v) -> tuple:
                kwargs["cache"] = PrefixCache(k, v)
                m = kwargs.get("mask")
                if m is not None:
                    kwargs["mask"] = torch.cat([m.new_ones(*m.shape[:-1], k.shape[2]), m], dim=-1)
                return a, kwargs
            handles.append(innermost(layer.self_attn).register_forward_pre_hook(hook, with_kwargs=True))
        try:
            return self.base_model(idx, *args, **kw)
        finally:
            for h in handles:
                h.remove()

    # -- files ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, adapter_name: str | None = None) -> Path:
        return save_adapter(self, directory, adapter_name or self._active_name())

    def load_adapter(self, directory: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        load_adapter(self, directory, adapter_name, is_trainable)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> PeftModel:
        config, tensors = read_adapter(directory, model, dora=True)
        peft = cls(model, replace(config, inference_mode=not is_trainable), adapter_name)
        fill_adapter(peft, adapter_name, tensors, directory)
        peft.set_adapter(adapter_name)  # a loaded prompt table is a new parameter
        return peft


def get_peft_model(model: nn.Module, config: PeftConfig, adapter_name: str = "default", tokenizer: Any = None) -> PeftModel:
    """Freeze ``model`` and add one adapter (more with :meth:`PeftModel.add_adapter`)."""
    return PeftModel(model, config, adapter_name, tokenizer)
