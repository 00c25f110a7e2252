"""Tokenizers: text ↔ token ids, built as a ``tokenizers.Tokenizer`` from tokenizer.json or GGUF metadata.

Two vocabularies appear in GGUF files (``tokenizer.ggml.model``):

- ``gpt2``: byte-level BPE (Radford et al. 2019, §2.2; Sennrich et al. 2016). Every byte is spelled
  as a printable character, text is pre-split by a regex (which one: ``tokenizer.ggml.pre``, as in
  llama.cpp's ``llama-vocab.cpp``), and pieces are merged by the file's ranked merge list.
- ``llama``: SentencePiece BPE (Kudo & Richardson 2018). Spaces become "▁" (plus one in front of the
  text), pieces merge in the order of their scores, and a character missing from the vocabulary
  falls back to its UTF-8 bytes ``<0xNN>``. Unless the file lists merges, the merge list is rebuilt
  from the scores, as transformers' converter does.

Control tokens (type 3) become special added tokens (matched whole, skipped when decoding),
user-defined ones (type 4) plain added tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

from ..loading.errors import ModelLoadError, UnsupportedModelError

# pre-tokenizer regexes of llama.cpp (llama-vocab.cpp) by tokenizer.ggml.pre
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {
    # name: (regexes applied in turn, ignore_merges)
    "default": ([_GPT2], False), "gpt2": ([_GPT2], False), "gpt-2": ([_GPT2], False),
    "smollm": ([r"\p{N}", _GPT2], False), "starcoder": ([r"\p{N}", _GPT2], False),
    "refact": ([r"\p{N}", _GPT2], False), "codeshell": ([r"\p{N}", _GPT2], False),
    "llama3": ([_LLAMA3], True), "llama-v3": ([_LLAMA3], True), "llama-bpe": ([_LLAMA3], True),
    "smaug-bpe": ([_LLAMA3], False), "dbrx": ([_LLAMA3], False),
    "qwen2": ([_QWEN2], False), "deepseek-r1-qwen": ([_QWEN2], False),
}
CONTROL, USER_DEFINED = 3, 4


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the model's special tokens and chat template.

    ``encode(text)`` adds BOS/EOS as the model's rules say (``add_special_tokens=False`` for text
    that a chat template already marked up); ``decode`` drops special tokens by default.
    """

    def __init__(self, tk: HFTokenizer, bos_token: str | None = None, eos_tokens: Sequence[str] = (),
                 pad_token: str | None = None, chat_template: str | None = None, source: str = "") -> None:
        self.tk, self.chat_template, self.source = tk, chat_template, source
        self.bos_token, self.pad_token = bos_token, pad_token
        self.eos_tokens = [t for t in eos_tokens if t is not None]
        self.bos_id = None if bos_token is None else tk.token_to_id(bos_token)
        self.eos_ids = {i for t in self.eos_tokens if (i := tk.token_to_id(t)) is not None}
        self.pad_id = None if pad_token is None else tk.token_to_id(pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str | None:
        return self.eos_tokens[0] if self.eos_tokens else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) of an HF directory."""
        from ..loading.hf import read_json

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(directory, "no tokenizer.json (only tokenizers in the `tokenizers` JSON format are loaded)")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses
            raise ModelLoadError(path, f"cannot parse tokenizer: {e}") from e
        tk.no_padding()
        tk.no_truncation()
        tc = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
        bos, eos, pad = (_token_str(tc.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        # transformers rebuilds the post-processor when the config states add_bos/add_eos (or there is none)
        if "add_bos_token" in tc or "add_eos_token" in tc or tk.post_processor is None:
            _set_bos_eos(tk, bos if tc.get("add_bos_token", False) else None, eos if tc.get("add_eos_token", False) else None)
        template = tc.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tk, bos, [eos] if eos else [], pad, template, source=str(directory))

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], file: str | Path = "<gguf>") -> Tokenizer:
        """Rebuild the tokenizer described by a GGUF file's ``tokenizer.*`` metadata."""
        kind = meta.get("tokenizer.ggml.model")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        if not tokens:
            raise ModelLoadError(file, "GGUF has no tokenizer.ggml.tokens")
        if kind == "gpt2":
            tk, add_bos_default = _byte_level_bpe(meta, tokens, file)
        elif kind == "llama":
            tk, add_bos_default = _sentencepiece_bpe(meta, tokens), True
        else:
            raise UnsupportedModelError(file, f"tokenizer.ggml.model {kind!r} is not supported (supported: gpt2, llama)")
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == CONTROL])
        tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = tok("bos_token_id"), tok("eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))  # llama.cpp's defaults
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        _set_bos_eos(tk, bos if add_bos else None, eos if add_eos else None)
        eos_list = [eos] + [t for t in (tok("eot_token_id"), tok("eom_token_id")) if t not in (None, eos)]
        if tok("eot_token_id") is None:  # as llama.cpp's vocabulary: end-of-turn control tokens known by their text
            control = {t for t, ty in zip(tokens, types) if ty == CONTROL}
            eos_list += [t for t in END_OF_TURN if t in control and t not in eos_list]
        return cls(tk, bos, eos_list, tok("padding_token_id"), meta.get("tokenizer.chat_template"), source=str(file))


#: control tokens that end a turn in the chat formats in use (llama.cpp's llama_vocab's list, less <|endoftext|>)
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|eom_id|>", "<EOT>")


def _byte_level_bpe(meta: dict[str, Any], tokens: list[str], file: str | Path) -> tuple[HFTokenizer, bool]:
    """``gpt2`` vocabularies: byte-level BPE with the file's merges, split by the regexes of its ``pre``."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedModelError(file, f"tokenizer.ggml.pre {pre!r} is not supported "
                                          f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tk = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=ignore_merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk, pre in ("llama3", "llama-v3", "llama-bpe")  # llama.cpp adds BOS for Llama 3's vocabulary


def _sentencepiece_bpe(meta: dict[str, Any], tokens: list[str]) -> HFTokenizer:
    """``llama`` vocabularies: SentencePiece BPE with byte fallback, "▁" for spaces (and one in front)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    listed = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    merges = listed or sentencepiece_merges(vocab, dict(zip(tokens, scores)))
    tk = HFTokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True,
                                unk_token=None if unk is None else tokens[unk]))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tk.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tk


def _token_str(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def _set_bos_eos(tk: HFTokenizer, bos: str | None, eos: str | None) -> None:
    """Post-processor adding ``bos`` before and ``eos`` after the text (either may be None)."""
    specials = [(t, tk.token_to_id(t)) for t in (bos, eos) if t is not None and tk.token_to_id(t) is not None]
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
    pair = single + " " + " ".join(([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
    tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def sentencepiece_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merge list equivalent to SentencePiece's score-ordered merging.

    Every token that can be split into two vocabulary tokens yields those merges, ranked by the
    merged token's score (higher first); ties as transformers' ``generate_merges`` breaks them.
    """
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
