"""Loading pretrained checkpoints — GGUF files and Hugging Face directories — without pickle.

``load_causal_lm(path)`` → model + tokenizer + generation defaults for text generation;
``load_sentence_encoder(path)`` → an :class:`~attnkit.loading.embedder.Embedder`. ``path=None`` is the
embedded default model (:mod:`attnkit.loading.defaults`). Every failure is a :class:`ModelLoadError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelLoadError, UnsupportedModelError

if TYPE_CHECKING:
    from ..parallel.tensor import TensorParallel
    from .embedder import Embedder
    from ..models.gpt2 import GPT2
    from ..models.llama import Llama
    from ..text.tokenizer import Tokenizer

__all__ = ["CausalLM", "ModelLoadError", "UnsupportedModelError", "load_causal_lm", "load_sentence_encoder"]


@dataclass
class CausalLM:
    model: Llama | GPT2
    tokenizer: Tokenizer
    path: Path
    generation: dict[str, Any] = field(default_factory=dict)  # generation_config.json (HF dirs)

    @property
    def stop_ids(self) -> set[int]:
        eos = self.generation.get("eos_token_id")
        extra = set(eos) if isinstance(eos, list) else ({eos} if isinstance(eos, int) else set())
        return set(self.tokenizer.eos_ids) | extra


def _kind(path: Path) -> str:
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
    if path.is_dir() and (path / "config.json").exists():
        return "hf"
    if not path.exists():
        raise ModelLoadError(path, "no such file or directory")
    raise ModelLoadError(path, "not a GGUF file nor a Hugging Face directory with config.json")


QUANTIZE_CHOICES = ("gguf", "auto", "int8", "int4", "nf4")


def load_causal_lm(path: str | Path | None = None, dtype: torch.dtype = torch.float32,
                   quantize: str | None = None, group_size: int = 32, tp: TensorParallel | None = None) -> CausalLM:
    """A language model and its tokenizer. ``dtype``: the activations (and every weight left in float).

    ``quantize`` keeps weights quantized in memory (:mod:`attnkit.quant`): None — dequantize everything
    to ``dtype``; "gguf" — a GGUF file's Q4_0/Q4_1/Q8_0 blocks kept byte for byte under attnkit's own
    kernel (:mod:`attnkit.quant.native`; other tensors and HF checkpoints as "auto"); "auto" — a GGUF file's own quantization (Q4_0/Q4_1 → int4 exactly, Q8_0 → int8, others
    float; an HF checkpoint stays float); "int8" / "int4" — quantize whatever was loaded (int4 in groups
    of ``group_size`` inputs; GGUF Q4 blocks keep their groups of 32); "nf4" — an HF checkpoint in QLoRA's
    4-bit NormalFloat (a frozen base to train adapters over). Bad values are a ValueError.
    ``tp``: load only this tensor-parallel rank's slice of every tensor and close the model's sublayers with its
    collectives (:mod:`attnkit.parallel.tensor`; its process group already initialised).
    """
    from ..text.tokenizer import Tokenizer
    from .defaults import default_chat_model

    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANTIZE_CHOICES))} or None; got {quantize!r}")
    path = default_chat_model() if path is None else Path(path)
    if _kind(path) == "gguf":
        from .gguf import gguf_config, load_gguf_model
        from .gguf_file import GGUFFile

        g = GGUFFile(path)
        tokenizer = Tokenizer.from_gguf(g.metadata, path)  # first: a bad vocabulary fails before the weights load
        model = load_gguf_model(path, dtype, g=g, quantize=quantize, group_size=group_size, tp=tp)
        return CausalLM(model if tp is None else tp.parallelize(model, gguf_config(g)), tokenizer, path)
    from .hf import load_hf_model, model_config, read_json

    if quantize in ("int8", "int4", "nf4"):  # a bad group size fails before the weights load
        from ..quant.quantize import check_scheme

        check_scheme(quantize)
        if quantize == "int4":
            from ..quant.int4 import GROUP_SIZES

            if group_size not in GROUP_SIZES:
                raise ValueError(f"int4 group size must be one of {GROUP_SIZES}; got {group_size}")
    model = load_hf_model(path, dtype, tp=tp)
    if not hasattr(model, "new_cache"):
        raise ModelLoadError(path, f"{type(model).__name__} is an encoder, not a language model; use `attnkit embed`")
    if quantize in ("int8", "int4", "nf4"):
        from ..quant import quantize_model

        quantize_model(model, quantize, group_size)  # type: ignore[arg-type]
    if tp is not None:
        tp.parallelize(model, model_config(read_json(path / "config.json"), path / "config.json"))
    gen = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    return CausalLM(model, Tokenizer.from_dir(path), path, gen)


def load_sentence_encoder(path: str | Path | None = None) -> Embedder:
    from .embedder import Embedder
    from ..models.bert import Bert, SentenceEncoder
    from ..text.tokenizer import Tokenizer
    from .defaults import default_embedding_model
    from .hf import load_hf_model, sentence_transformers_config

    path = default_embedding_model() if path is None else Path(path)
    if _kind(path) != "hf":
        raise ModelLoadError(path, "embeddings need a Hugging Face directory of a BERT-family model")
    model = load_hf_model(path)
    if not isinstance(model, Bert):
        raise ModelLoadError(path, f"{type(model).__name__} is not an encoder; embeddings need a BERT-family model")
    pooling, normalize, max_len = sentence_transformers_config(path, model.cfg.max_seq_len)
    return Embedder(SentenceEncoder(model, pooling, normalize), Tokenizer.from_dir(path), max_len)
