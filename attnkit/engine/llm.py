"""The user-facing API, as in vLLM: ``LLM(model).generate(prompts, SamplingParams(...))``.

``LLM(None)`` runs the embedded default model (SmolLM2-135M-Instruct); a path loads a GGUF file or
a Hugging Face directory. ``generate`` takes one prompt or many (text or token ids) and one
SamplingParams or one per prompt and returns a :class:`RequestOutput` per prompt, in order;
``chat`` renders conversations with the model's chat template first; ``stream`` yields outputs as
they grow. ``load_lora(name, directory)`` serves a LoRA adapter saved in HF PEFT's format; each call
then takes ``lora=name`` (or one name per prompt), and prompts for different adapters run batched together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from torch import nn

from .options import InferenceOptions
from .llm_engine import EngineConfig, LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .speculative import SpeculativeConfig

if TYPE_CHECKING:
    from ..text.tokenizer import Tokenizer

Prompt = Union[str, list[int]]
Messages = list[dict[str, str]]


class LLM:
    def __init__(self, model: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
                 config: EngineConfig | None = None, quantize: str | None = "gguf", threads: int | None = None,
                 fuse: bool = True, kv_cache_dtype: str = "auto", matmul_dtype: str = "auto", **engine_kw) -> None:
        """Load ``model`` (None: the embedded default) prepared as :class:`InferenceOptions` say:
        ``quantize`` "gguf" (a GGUF file's blocks under attnkit's kernel; the default) | "auto" | "int8" |
        "int4" | None (dequantized to ``dtype``), ``dtype`` of the activations, ``fuse``d
        projections, ``threads``, the K/V cache's ``kv_cache_dtype`` ("auto": float16 with quantize "gguf", as
        llama.cpp, else ``dtype``), ``matmul_dtype`` of the GGUF layers' prefill products ("auto": the integer
        product where a layer has one, else bfloat16 where the CPU has bf16 hardware); ``engine_kw`` are :class:`EngineConfig` fields (e.g. ``compile=True``).
        A ``config`` whose own ``kv_cache_dtype`` is not "auto" keeps it."""
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        config = config or EngineConfig(**engine_kw)
        opts = InferenceOptions(dtype=name, quantize=quantize, fuse=fuse, threads=threads, compile=config.compile,
                                kv_cache_dtype=kv_cache_dtype, matmul_dtype=matmul_dtype)
        if config.kv_cache_dtype == "auto":  # resolved here, where the quantization is known
            config = dataclasses.replace(config, kv_cache_dtype=opts.engine_kv_cache_dtype())
        lm = opts.load(model)
        self.path = lm.path
        spec = SpeculativeConfig.parse(config.speculative, config.num_speculative_tokens)
        # a draft model is prepared as the target is (its quantization, dtype, threads)
        draft = opts.load(spec.draft_model).model if spec is not None and spec.draft_model is not None else None
        self._setup(lm.model, lm.tokenizer, config, lm.stop_ids, draft)

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                   eos_ids: set[int] | None = None, draft_model: nn.Module | None = None, **engine_kw) -> LLM:
        """An LLM around an already built model (tests, custom checkpoints); ``draft_model`` for
        ``speculative="draft"``."""
        self = cls.__new__(cls)
        self.path = None
        self._setup(model, tokenizer, config or EngineConfig(**engine_kw), eos_ids, draft_model)
        return self

    def _setup(self, model: nn.Module, tokenizer: Tokenizer | None, config: EngineConfig,
               eos_ids: set[int] | None, draft_model: nn.Module | None = None) -> None:
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, config, eos_ids, draft_model)

    @staticmethod
    def _prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            return [prompts]  # type: ignore[list-item]
        return list(prompts)  # type: ignore[arg-type]

    def load_lora(self, name: str, directory: str | Path) -> None:
        """Load the LoRA adapter in ``directory`` (adapter_config.json + adapter_model.safetensors) as ``name``."""
        self.engine.add_lora(name, directory)

    def _add(self, prompts: Prompt | Sequence[Prompt],
             params: SamplingParams | Sequence[SamplingParams] | None,
             lora: str | None | Sequence[str | None] = None) -> list[str]:
        ps = self._prompts(prompts)
        loras = [lora] * len(ps) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(ps):
            raise ValueError(f"{len(loras)} LoRA names for {len(ps)} prompts")
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(ps)
        else:
            plist = list(params)
            if len(plist) != len(ps):
                raise ValueError(f"{len(plist)} SamplingParams for {len(ps)} prompts")
        for p in plist:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        ids = []
        try:
            for prompt, p, name in zip(ps, plist, loras):
                ids.append(self.engine.add_request(prompt, p, lora=name))
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 lora: str | None | Sequence[str | None] = None) -> list[RequestOutput]:
        """Run the prompts to completion, batched; one output per prompt, in the prompts' order."""
        ids = self._add(prompts, sampling_params, lora)
        done: dict[str, RequestOutput] = {}
        for out in self._stream_ids(ids):
            if out.finished:
                done[out.request_id] = out
        return [done[r] for r in ids]

    def _stream_ids(self, ids: list[str]) -> Iterator[RequestOutput]:
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.engine.abort_request(rid)

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
               lora: str | None | Sequence[str | None] = None) -> Iterator[RequestOutput]:
        """Yield each request's (cumulative) output whenever it grows; stopping early aborts the rest."""
        yield from self._stream_ids(self._add(prompts, sampling_params, lora))

    def render_chat(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        from ..text.chat_template import render_chat

        tok = self.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer with a chat template")
        text = render_chat(tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           source=str(self.path), bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
        return tok.encode(text, add_special_tokens=False)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             lora: str | None | Sequence[str | None] = None) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or a list of them → one reply each."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)  # type: ignore[list-item]
        return self.generate([self.render_chat(c) for c in convs], sampling_params, lora)  # type: ignore[arg-type]
