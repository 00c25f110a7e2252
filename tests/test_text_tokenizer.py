"""Tokenizers built from GGUF metadata and from tokenizer.json, against the references: transformers'
tokenizers for the same files, and SentencePiece itself for a SentencePiece vocabulary. Also
BOS/EOS rules and the streaming detokenizer."""

from __future__ import annotations

import io
import os
import random

import gguf
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from attnkit.loading import ModelLoadError, defaults  # noqa: E402
from attnkit.loading.gguf_file import GGUFFile  # noqa: E402
from attnkit.text.detokenize import IncrementalDetokenizer  # noqa: E402
from attnkit.text.tokenizer import Tokenizer  # noqa: E402

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 42\n",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷 ✨",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing  ",
    "naïve café Ünïcödé – “quotes” … ½ ∑ x² ≠ y",
    "I'm sure you'll see THEY'RE right, 12345678 + 0.5 = 12345678.5",
    "",
    " ",
    "a\r\nb",
]
SPECIAL = ["<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "x<|endoftext|>y"]

try:
    GGUF_PATH = defaults.default_chat_model()
    MINILM_DIR = defaults.default_embedding_model()
except ModelLoadError as e:  # pragma: no cover
    pytest.skip(f"default models not installed: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def smol_ours():
    return Tokenizer.from_gguf(GGUFFile(GGUF_PATH).metadata, GGUF_PATH)


@pytest.fixture(scope="module")
def smol_ref():
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)


@pytest.fixture(scope="module")
def smol_dir(smol_ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol_tok")
    smol_ref.save_pretrained(str(d))
    return d


# -- byte-level BPE (gpt2 model) ---------------------------------------------------------------
def test_gguf_bpe_matches_transformers(smol_ours, smol_ref):
    from tokenizers import pre_tokenizers

    # SmolLM2's file names the pre-tokenizer "smollm": llama.cpp (and SmolLM2's own tokenizer.json)
    # isolate every numeral (Unicode category N) before the GPT-2 split; transformers' GGUF converter
    # ignores tokenizer.ggml.pre=smollm. Both agree wherever no non-ASCII numeral (½, ²) follows a space.
    digits = transformers.AutoTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)
    digits.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in CORPUS + SPECIAL:
        ids = smol_ours.encode(text)
        assert ids == digits(text)["input_ids"], text
        if not any(c in text for c in "½²"):
            assert ids == smol_ref(text)["input_ids"], text
        assert smol_ours.decode(ids, skip_special_tokens=False) == text
    assert smol_ours.encode(" ½") != smol_ref(" ½")["input_ids"]  # the documented difference is real
    ids = smol_ours.encode(SPECIAL[0])
    assert ids[0] == smol_ours.tk.token_to_id("<|im_start|>")  # special tokens are matched whole
    assert smol_ours.decode(ids) == "user\nhi there\nassistant\n"  # and skipped when decoding
    assert smol_ours.bos_id == 1 and smol_ours.eos_ids == {2}  # <|im_start|>, <|im_end|> per the file's metadata


def test_tokenizer_json_matches_transformers(smol_dir):
    ours = Tokenizer.from_dir(smol_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(smol_dir))
    for text in CORPUS + SPECIAL:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.chat_template and "im_start" in ours.chat_template


def test_minilm_wordpiece_matches_transformers():
    ours = Tokenizer.from_dir(MINILM_DIR)
    ref = transformers.AutoTokenizer.from_pretrained(str(MINILM_DIR))
    for text in CORPUS:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.encode("hi")[0] == ref.cls_token_id and ours.encode("hi")[-1] == ref.sep_token_id


def test_add_bos_from_tokenizer_config(smol_dir, tmp_path):
    """tokenizer_config.json's add_bos_token rebuilds the post-processor (transformers 4's rule for Llama)."""
    import json
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(smol_dir, d)
    plain = Tokenizer.from_dir(d).encode("hello")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, bos_token="<|endoftext|>")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours = Tokenizer.from_dir(d)
    assert ours.encode("hello") == [0] + plain
    assert ours.encode("hello", add_special_tokens=False) == plain


# -- SentencePiece (llama model) ----------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    text = [t for t in CORPUS if t.strip()] * 40 + ["the lazy dog sleeps", "return fib", "numbers 12 34"] * 40
    buf = io.BytesIO()
    # Llama's settings: BPE, byte fallback, digits split, no normalisation, whitespace kept
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=420, model_type="bpe",
                                   byte_fallback=True, split_digits=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                                   character_coverage=0.99, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    d = tmp_path_factory.mktemp("spm")
    w = gguf.GGUFWriter(str(d / "spm.gguf"), "llama")
    for k, v in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=64, head_count=2).items():
        getattr(w, f"add_{k}")(v)
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return sp, d / "spm.gguf"


def test_gguf_sentencepiece_matches_sentencepiece(spm_files):
    """Same ids as SentencePiece, except on runs of spaces: SentencePiece cuts the text at each "▁"
    before merging, llama.cpp and transformers (score-ordered merges over the whole text) do not."""
    sp, path = spm_files
    ours = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    for text in CORPUS:
        if not text.strip() or "  " in text:
            continue
        want = [sp.bos_id()] + sp.encode(text)
        assert ours.encode(text) == want, text
        assert ours.decode(want) == sp.decode(want[1:]), text
    assert any(sp.is_byte(i) for i in ours.encode(CORPUS[3]))  # emoji went through byte fallback


def test_gguf_sentencepiece_matches_transformers(spm_files):
    _, path = spm_files
    ours = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in CORPUS + ["<s> mid-text special </s> tokens"]:
        assert ours.encode(text) == ref(text)["input_ids"], text


def test_gguf_add_bos_flag(spm_files, smol_ours):
    _, path = spm_files
    meta = dict(GGUFFile(path).metadata)
    assert Tokenizer.from_gguf(meta).encode("fox")[0] == 1  # SentencePiece files add BOS unless told not to
    meta["tokenizer.ggml.add_bos_token"] = False
    assert Tokenizer.from_gguf(meta).encode("fox")[0] != 1
    assert smol_ours.encode("fox")[0] != smol_ours.bos_id  # SmolLM2's file says add_bos_token = false


def test_gguf_unsupported_tokenizer():
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model 'rwkv'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.pre 'mystery'"):
        Tokenizer.from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery", "tokenizer.ggml.tokens": ["a"]})


# -- streaming detokenisation -------------------------------------------------------------------
def _stream(tok: Tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    d = IncrementalDetokenizer(tok, context=context)
    return [d.push(i) for i in ids] + [d.flush()]


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_incremental_detokenizer(which, smol_ours, spm_files):
    tok = smol_ours if which == "bpe" else Tokenizer.from_gguf(GGUFFile(spm_files[1]).metadata)
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), text
    # an emoji split over several tokens is emitted once, whole
    ids = tok.encode("ok 😀", add_special_tokens=False)
    pieces = _stream(tok, ids)
    assert "😀" in pieces[-2] or "😀" in pieces[-1] or any(p.endswith("😀") for p in pieces)
    assert sum(p == "" for p in pieces[:-1]) >= 1  # held back while incomplete
    # with the end of the prompt as context the continuation keeps its leading space
    prompt, cont = tok.encode("The fox", add_special_tokens=False), tok.encode(" jumps over 日本", add_special_tokens=False)
    full = tok.decode(prompt + cont)
    assert "".join(_stream(tok, cont, context=prompt[-4:])) == full[len(tok.decode(prompt)):]


def test_detokenizer_random_token_streams(smol_ours):
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(3, smol_ours.vocab_size) for _ in range(rng.randrange(1, 20))]
        pieces = _stream(smol_ours, ids)
        assert "".join(pieces) == smol_ours.decode(ids)  # append-only pieces: nothing emitted was ever wrong


# -- the pre-tokenizers named by tokenizer.ggml.pre ------------------------------------------------
@pytest.fixture(scope="module")
def trained_bpe():
    """A small byte-level BPE trained here, with merges across digits, spaces and punctuation."""
    import json

    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([t for t in CORPUS if t] * 30 + ["2024-01-01 12:30, 3.14159 and 1234567"] * 30, trainer)
    m = json.loads(tk.to_str())["model"]
    tokens = [t for t, _ in sorted(m["vocab"].items(), key=lambda kv: kv[1])]
    return tokens, [" ".join(x) if isinstance(x, list) else x for x in m["merges"]]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2", "smollm"])
def test_gguf_pre_tokenizers_match_transformers(trained_bpe, tmp_path, pre):
    from tokenizers import pre_tokenizers

    tokens, merges = trained_bpe
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    for k, v in dict(block_count=1, context_length=64, embedding_length=32, feed_forward_length=64, head_count=2).items():
        getattr(w, f"add_{k}")(v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(2)
    w.add_add_bos_token(pre == "llama-bpe")
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    ours = Tokenizer.from_gguf(GGUFFile(tmp_path / "t.gguf").metadata)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    if pre == "smollm":  # transformers ignores this name; llama.cpp isolates numerals first (see above)
        ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    texts = CORPUS + ["2024-01-01 12:30, 3.14159 and 1234567", "<|begin_of_text|>hi<|eot_id|>"]
    for text in texts:
        assert ours.encode(text) == ref(text)["input_ids"], text
    assert ours.eos_ids == {1, 2}  # EOS and end-of-turn both stop generation
    assert (ours.encode("hi")[0] == 0) == (pre == "llama-bpe")
    if pre in ("gpt2", "llama-bpe"):  # the pre-tokenizer matters: splitting digits changes these ids
        meta = dict(GGUFFile(tmp_path / "t.gguf").metadata, **{"tokenizer.ggml.pre": "smollm"})
        assert Tokenizer.from_gguf(meta).encode(texts[-2]) != ours.encode(texts[-2])


def test_gguf_end_of_turn_tokens_stop_without_an_eot_id(spm_files):
    """A file with no eot_token_id (Gemma's converter writes none): control tokens that end a turn by their text
    (<end_of_turn>, <|im_end|>, …) stop generation as llama.cpp's vocabulary makes them; a user token does not."""
    _, path = spm_files
    meta = dict(GGUFFile(path).metadata)
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.token_type"])
    tokens[-2:], types[-2:] = ["<end_of_turn>", "<|im_end|>"], [3, 4]  # control, user-defined
    meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"] = tokens, types
    ids = Tokenizer.from_gguf(meta).eos_ids
    assert len(tokens) - 2 in ids and len(tokens) - 1 not in ids and meta["tokenizer.ggml.eos_token_id"] in ids
    meta["tokenizer.ggml.eot_token_id"] = meta["tokenizer.ggml.eos_token_id"]  # an explicit one: only that
    assert len(tokens) - 2 not in Tokenizer.from_gguf(meta).eos_ids
