"""The replica factory of the data-parallel tests, in a module of its own so that the spawned replica processes
import only the engine (not the server, httpx or the test module)."""

from __future__ import annotations

from attnkit.engine import EngineConfig, LLMEngine
from engine_helpers import tiny_llama

SHAPE = dict(d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=1024)


def tiny_replica(loras: tuple[tuple[str, str], ...] = ()) -> LLMEngine:
    """Each replica's engine: the same seeded tiny Llama, the default model's tokenizer, the LoRA adapters."""
    from attnkit.loading import defaults
    from attnkit.loading.gguf_file import GGUFFile
    from attnkit.text.tokenizer import Tokenizer

    path = defaults.default_chat_model()
    tok = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    engine = LLMEngine(tiny_llama(tok.vocab_size, **SHAPE), tok, EngineConfig(max_num_seqs=8, kv_cache_bytes=16 << 20),
                       tok.eos_ids)
    for name, directory in loras:
        engine.add_lora(name, directory)
    return engine
