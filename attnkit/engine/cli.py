"""``attnkit generate`` / ``chat`` / ``embed``: pretrained models from the command line.

Every command takes ``--model PATH`` (a GGUF file or a Hugging Face directory); without it the
embedded default is used (SmolLM2-135M-Instruct for text, all-MiniLM-L6-v2 for embeddings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

from .options import InferenceOptions

_INTRO = "chat with {name} — /reset clears the conversation, /quit (or Ctrl-D) leaves, Ctrl-C stops a reply"


def add_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="continue a prompt with a language model, streaming the tokens")
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the model's chat template")
    _sampling_args(g)
    s = g.add_mutually_exclusive_group()
    s.add_argument("--json-schema", metavar="FILE", default=None,
                   help="constrain the output to JSON valid under the JSON schema in FILE (structured outputs)")
    s.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    s.add_argument("--regex", default=None, help="constrain the output to match this regular expression")
    s.add_argument("--grammar", metavar="FILE", default=None, help="constrain the output to the GBNF or Lark grammar in FILE")
    s.add_argument("--choice", action="append", default=None, help="constrain the output to one of these (repeatable)")
    add_speculative_flags(g)
    g.set_defaults(func=run_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat with the model's chat template")
    c.add_argument("--system", default=None, help="system prompt (default: the template's own, if any)")
    _sampling_args(c)
    c.set_defaults(func=run_chat)

    e = sub.add_parser("embed", help="sentence embeddings (vectors or pairwise cosine similarities)")
    e.add_argument("texts", nargs="+", help="one or more texts")
    e.add_argument("--model", default=None, help="HF directory of a BERT-family model (default: all-MiniLM-L6-v2)")
    e.add_argument("--output", choices=["auto", "vectors", "similarity"], default="auto",
                   help="auto: cosine similarity matrix for 2+ texts, the vector for one")
    e.set_defaults(func=run_embed)

    m = sub.add_parser("models", help="the model families attnkit loads, and what it does with each")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=run_models)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=256,
                   help="tokens to generate at most (--max-tokens: the name OpenAI and vLLM use)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the model's generation_config.json if it samples, else greedy")
    p.add_argument("--top-k", type=int, default=None, help="0 = off (default: generation_config.json, else off)")
    p.add_argument("--top-p", type=float, default=None, help="default: generation_config.json, else 1.0")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="generate with the LoRA adapter saved in DIR (HF PEFT format), unmerged, on the engine")
    p.add_argument("--kv-window", type=int, default=None, metavar="N",
                   help="attention sinks (StreamingLLM): keep the K/V of the first --attention-sinks tokens and the "
                        "last N, and generate past the context in bounded memory")
    p.add_argument("--attention-sinks", type=int, default=4, metavar="N", help="with --kv-window (default 4)")
    p.add_argument("--kv-budget", type=int, default=None, metavar="N",
                   help="SnapKV: keep N keys per layer and head of a long prompt, those its last queries weigh most")
    InferenceOptions.add_flags(p)


def add_speculative_flags(p: argparse.ArgumentParser) -> None:
    """--speculative and --num-speculative-tokens (``attnkit generate`` and ``serve``)."""
    p.add_argument("--speculative", default=None, metavar="METHOD",
                   help="ngram (prompt lookup) | draft:PATH (a smaller model with the same tokenizer, e.g. a student "
                        "from attnkit distill) | layerskip:N (the model's first N layers)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="the most draft tokens proposed per step (default: 5)")


def speculative_config(args: argparse.Namespace):
    """``--speculative``/``--num-speculative-tokens`` → a SpeculativeConfig, or None; errors name the flag."""
    from .speculative import SpeculativeConfig

    method, k = args.speculative, args.num_speculative_tokens
    if method is None:
        if k is not None:
            raise ValueError("--num-speculative-tokens needs --speculative METHOD")
        return None
    try:
        return SpeculativeConfig.parse(method, k)
    except ValueError as e:
        if str(e).startswith("--"):
            raise
        flag = f"--num-speculative-tokens {k}" if str(e).startswith("num_speculative_tokens") else f"--speculative {method}"
        raise ValueError(f"{flag}: {e}") from None


def speculative_draft(spec, opts: InferenceOptions, model):
    """The draft model ``spec`` names, loaded as ``opts`` say (as the target ``model`` was), or None; a draft that
    cannot serve ``model`` (another vocabulary, not a decoder, too many layers to skip to) is an error naming
    --speculative."""
    from ..loading import ModelLoadError
    from ..models.gpt2 import GPT2
    from ..models.llama import Llama
    from .proposers import check_draft_layers, compatible

    if spec is None or spec.method == "ngram":
        return None
    try:
        if spec.method == "draft":
            draft = opts.load(spec.draft_model).model
            if not isinstance(draft, (Llama, GPT2)):
                raise ValueError(f"a draft model must be a decoder-only model (Llama family, GPT-2), "
                                 f"not {type(draft).__name__}")
            compatible(model, draft)
            return draft
        if spec.draft_layers is not None:
            check_draft_layers(model, spec.draft_layers)
    except (ModelLoadError, ValueError) as e:
        arg = spec.draft_model if spec.method == "draft" else spec.draft_layers
        raise ValueError(f"--speculative {spec.method}:{arg}: {e}") from None
    return None


def _load(args: argparse.Namespace):
    t0 = time.perf_counter()
    opts = InferenceOptions.from_args(args)
    lm = opts.load(args.model)
    return lm, time.perf_counter() - t0


def _params(args: argparse.Namespace, generation: dict | None = None):
    """Sampling settings: command-line flags, else the checkpoint's generation_config.json, else greedy."""
    from . import SamplingParams

    gen = generation or {}
    sampling = bool(gen.get("do_sample", False))

    def pick(flag, key: str, off):
        if flag is not None:
            return flag
        return gen.get(key, off) if sampling and gen.get(key) is not None else off

    return SamplingParams(max_tokens=args.max_new_tokens, temperature=pick(args.temperature, "temperature", 0.0),
                          top_k=pick(args.top_k, "top_k", 0), top_p=pick(args.top_p, "top_p", 1.0), seed=args.seed,
                          structured=_structured(args), kv_window=getattr(args, "kv_window", None),
                          attention_sinks=getattr(args, "attention_sinks", 4), kv_budget=getattr(args, "kv_budget", None))


def _structured(args: argparse.Namespace):
    """The --json-schema/--json-object/--regex/--grammar/--choice constraint, if any (files read here)."""
    from . import StructuredOutputs

    if getattr(args, "json_schema", None):
        return StructuredOutputs(json=Path(args.json_schema).read_text())
    if getattr(args, "json_object", False):
        return StructuredOutputs(json_object=True)
    if getattr(args, "regex", None) is not None:
        return StructuredOutputs(regex=args.regex)
    if getattr(args, "grammar", None):
        return StructuredOutputs(grammar=Path(args.grammar).read_text())
    if getattr(args, "choice", None):
        return StructuredOutputs(choice=args.choice)
    return None


LORA = "cli-adapter"  # the name --lora's adapter gets in the engine


def _engine(lm, compile: bool = False, lora: str | None = None, kv_cache_dtype: str = "auto", speculative=None,
            draft_model=None, kv_exact_blocks: bool | None = None):
    """An inference engine on the loaded model, its KV pool (of ``kv_cache_dtype``) sized for one full-length
    conversation, with the LoRA adapter in directory ``lora`` loaded as :data:`LORA`; ``speculative``: a
    SpeculativeConfig (``draft_model`` for its "draft" method)."""
    from . import EngineConfig, LLMEngine

    max_len = min(getattr(lm.model.cfg, "max_seq_len", 8192), 32768)
    cfg = EngineConfig(num_blocks=-(-max_len // 16) + 1, max_model_len=max_len, compile=compile,
                       kv_cache_dtype=kv_cache_dtype, speculative=speculative, kv_exact_blocks=kv_exact_blocks)
    engine = LLMEngine(lm.model, lm.tokenizer, cfg, lm.stop_ids, draft_model)
    if lora is not None:
        engine.add_lora(LORA, lora)
    return engine


def _chat_prompt(lm, messages: list[dict[str, str]]) -> list[int]:
    from ..text.chat_template import render_chat

    tok = lm.tokenizer
    text = render_chat(tok.chat_template, messages, add_generation_prompt=True, source=str(lm.path),
                       bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")
    return tok.encode(text, add_special_tokens=False)


def stream(engine, prompt: list[int], params, out: TextIO, lora: str | None = None) -> Iterator[int]:
    """Generate from ``prompt`` on the engine, writing the text to ``out`` as it forms; yields the token ids."""
    shown = n = 0
    outputs = engine.stream(prompt, params, lora=lora) if lora is not None else engine.stream(prompt, params)
    try:
        for o in outputs:
            c = o.outputs[0]
            if len(c.text) > shown:
                out.write(c.text[shown:])
                out.flush()
                shown = len(c.text)
            yield from c.token_ids[n:]
            n = len(c.token_ids)
    finally:
        outputs.close()  # aborts the request if it was interrupted


def run_generate(args: argparse.Namespace) -> int:
    from ..loading import ModelLoadError
    from ..text.chat_template import ChatTemplateError

    from . import SamplingParamsError

    try:
        _structured(args)  # a bad schema file fails before the model loads
        spec = speculative_config(args)
        lm, load_s = _load(args)
        if args.chat:
            prompt = _chat_prompt(lm, [{"role": "user", "content": args.prompt}])
        else:
            prompt = lm.tokenizer.encode(args.prompt)
        opts = InferenceOptions.from_args(args)
        draft = speculative_draft(spec, opts, lm.model)
        engine = _engine(lm, args.compile, args.lora, opts.engine_kv_cache_dtype(), spec, draft,
                         opts.engine_kv_exact_blocks())
        params = _params(args, lm.generation)
        if params.structured is not None:
            engine.grammars.compile(params.structured)  # an invalid schema, regex or grammar: said here
    except (ModelLoadError, ChatTemplateError, SamplingParamsError, OSError) as e:
        print(f"attnkit generate: error: {e}", file=sys.stderr)
        return 2
    if not args.chat and params.structured is None:
        sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    first = None
    n = 0
    for _ in stream(engine, prompt, params, sys.stdout, LORA if args.lora else None):
        n += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    decode_tps = (n - 1) / (end - first) if first is not None and n > 1 else 0.0
    print(file=sys.stdout)
    print(f"[{n} tokens in {end - t0:.2f} s: {decode_tps:.1f} tokens/s decoding; load {load_s:.2f} s, "
          f"prompt {len(prompt)} tokens, first token after {((first or end) - t0) * 1000:.0f} ms]", file=sys.stderr)
    if engine.spec is not None:
        st = engine.spec.stats
        print(f"[speculative {spec.method}: acceptance rate {st.acceptance_rate:.2f} ({st.accepted}/{st.proposed} "
              f"draft tokens), mean accepted length {st.mean_accepted_length:.2f} tokens per step]", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from ..loading import ModelLoadError
    from ..text.chat_template import ChatTemplateError

    try:
        lm, _ = _load(args)
        if not lm.tokenizer.chat_template:
            _chat_prompt(lm, [])  # raises the ChatTemplateError explaining the missing template
    except (ModelLoadError, ChatTemplateError) as e:
        print(f"attnkit chat: error: {e}", file=sys.stderr)
        return 2
    # one engine for the session: each turn reuses the cached prefix of the conversation
    opts = InferenceOptions.from_args(args)
    engine = _engine(lm, args.compile, args.lora, opts.engine_kv_cache_dtype(),
                     kv_exact_blocks=opts.engine_kv_exact_blocks())
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    print(_INTRO.format(name=lm.path.name), file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:  # at the prompt: a fresh line, like Python's REPL
            print(file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages = list(system)
            print("[conversation cleared]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = _chat_prompt(lm, messages)
        except ChatTemplateError as e:
            print(f"attnkit chat: error: {e}", file=sys.stderr)
            messages.pop()
            continue
        ids: list[int] = []
        t0 = time.perf_counter()
        try:
            for tok in stream(engine, prompt, _params(args, lm.generation), sys.stdout, LORA if args.lora else None):
                ids.append(tok)
        except KeyboardInterrupt:
            print("\n[reply stopped]", file=sys.stderr)
        reply = lm.tokenizer.decode([t for t in ids if t not in lm.stop_ids])
        messages.append({"role": "assistant", "content": reply})
        dt = time.perf_counter() - t0
        print(file=sys.stdout)
        print(f"[{len(ids)} tokens, {len(ids) / dt:.1f} tokens/s]", file=sys.stderr)


def run_embed(args: argparse.Namespace) -> int:
    from ..loading.embedder import cosine_matrix
    from ..loading import ModelLoadError, load_sentence_encoder

    try:
        emb = load_sentence_encoder(args.model)
    except ModelLoadError as e:
        print(f"attnkit embed: error: {e}", file=sys.stderr)
        return 2
    vecs = emb.embed(args.texts)
    mode = args.output if args.output != "auto" else ("similarity" if len(args.texts) > 1 else "vectors")
    if mode == "vectors":
        for text, v in zip(args.texts, vecs.tolist()):
            print(json.dumps({"text": text, "embedding": [round(x, 6) for x in v]}, ensure_ascii=False))
        return 0
    sim = cosine_matrix(vecs)
    width = max(len(f"[{i}]") for i in range(len(args.texts)))
    for i, t in enumerate(args.texts):
        print(f"{f'[{i}]':>{width}} {t}")
    print(" " * width + "".join(f"{f'[{j}]':>8}" for j in range(len(args.texts))))
    for i in range(len(args.texts)):
        print(f"{f'[{i}]':>{width}}" + "".join(f"{sim[i, j].item():8.4f}" for j in range(len(args.texts))))
    return 0


def run_models(args: argparse.Namespace) -> int:
    """One row per decoder family (attnkit.models.registry) plus the encoder/GPT-2 ones: HF, GGUF, engine, C step, LoRA."""
    from ..models.registry import COLUMNS, support_table

    rows = support_table() + [
        {"family": "gpt2", "model_type": "gpt2", "gguf": "-", "example": "GPT-2", "HF": "yes", "GGUF": "no",
         "engine": "yes", "C step": "no", "LoRA": "yes"},
        {"family": "bert", "model_type": "bert", "gguf": "-", "example": "all-MiniLM-L6-v2 (embeddings)", "HF": "yes",
         "GGUF": "no", "engine": "no (encoder)", "C step": "no", "LoRA": "yes"}]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ["family", "model_type", "gguf", *COLUMNS, "example"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(width[c]) for c in cols))
    return 0
