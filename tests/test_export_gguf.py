"""``attnkit export``: merged GGUF models and llama.cpp LoRA GGUFs (attnkit.quant.gguf_export), on a tiny random
Llama GGUF (attnkit.loading.gguf_writer) with a LoRA whose B is nonzero, read back with gguf's GGUFReader and
attnkit's loader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from attnkit.cli import main
from attnkit.loading import load_causal_lm
from attnkit.loading.gguf import load_gguf_model, unpermute_qk
from attnkit.loading.gguf_file import GGUFFile
from attnkit.loading.gguf_writer import write_llama_gguf
from attnkit.peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from attnkit.quant.gguf_export import ExportError, export_lora, export_merged, load_lora_gguf, permute_qk
from attnkit.quant.gguf_quantize import tensor_type

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128, "context_length": 512}
# r=4 everywhere but down_proj (r=2), α=8 but 6 on v_proj, rsLoRA: scalings α/√r that one file alpha cannot hold
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], use_rslora=True,
            rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 6})
IDS = torch.randint(0, 261, (1, 24), generator=torch.Generator().manual_seed(0))


def _tiny_vocab(path):
    """A GGUF holding only a byte-level BPE tokenizer: the 256 byte symbols and two merges, ChatML's control tokens and
    SmolLM2's pre-tokenizer and chat template (a 49 k vocabulary makes every GGUFReader call seconds long)."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    from attnkit.loading.defaults import default_chat_model

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["Ġt", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(GGUFFile(default_chat_model()).metadata["tokenizer.chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _adapter(base, directory, config, seed=0):
    peft = get_peft_model(load_gguf_model(base), config)
    g = torch.Generator().manual_seed(seed)
    for n, p in peft.named_parameters():
        if "lora_B" in n or "ia3_l" in n:
            p.data = (1 + 0.2 * torch.randn(p.shape, generator=g)) if "ia3" in n else 0.05 * torch.randn(p.shape, generator=g)
    peft.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    vocab = _tiny_vocab(d / "vocab.gguf")
    base = write_llama_gguf(d / "base-Q8_0.gguf", TINY, "Q8_0", tokenizer_from=vocab, threads=1)
    adapter = _adapter(base, d / "adapter", LoraConfig(**LORA))
    peft = PeftModel.from_pretrained(load_gguf_model(base), adapter)  # attnkit's merge: the reference
    with torch.no_grad():
        plain = load_gguf_model(base)(IDS)
        peft.merge_adapter()
        merged = peft(IDS)
    assert (merged - plain).norm() / plain.norm() > 0.05  # the adapter changes the model
    return {"dir": d, "base": base, "adapter": adapter, "ref": merged, "peft": peft}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _str(reader, key):
    f = reader.fields[key]
    return bytes(f.parts[f.data[0]]).decode()


# -- merged models -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tol", [("F32", 1e-5), ("F16", 2e-3), ("Q8_0", 3e-2), ("same", 3e-2)])
def test_merged_logits_match_attnkit_merge(work, kind, tol):
    out = work["dir"] / f"merged-{kind}.gguf"
    export_merged(work["base"], out, work["adapter"], kind, threads=1)
    with torch.no_grad():
        logits = load_gguf_model(out)(IDS)
    assert _rel(logits, work["ref"]) < tol


@pytest.mark.parametrize("kind", ["same", "F16", "Q8_0", "Q4_K_M"])
def test_merged_file_names_types_shapes_metadata(work, kind):
    out = work["dir"] / f"meta-{kind}.gguf"
    types = export_merged(work["base"], out, work["adapter"], kind, threads=1)
    base, r = GGUFReader(work["base"]), GGUFReader(out)
    assert [t.name for t in r.tensors] == [t.name for t in base.tensors]
    for t, b in zip(r.tensors, base.tensors):
        assert list(t.shape) == list(b.shape)
        shape = tuple(int(x) for x in reversed(b.shape))
        want = b.tensor_type.name if kind == "same" else tensor_type(kind, b.name, TINY["n_layers"], shape, True, "F32")
        assert t.tensor_type.name == want == types[t.name]
    assert _str(r, "general.architecture") == "llama"
    skip = {"general.file_type", "general.quantization_version", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key in base.fields:
        if key not in skip:
            assert r.fields[key].contents() == base.fields[key].contents(), key
    ft = r.fields["general.file_type"].contents()
    assert ft == (base.fields["general.file_type"].contents() if kind == "same" else {"F16": 1, "Q8_0": 7, "Q4_K_M": 15}[kind])


def test_same_copies_the_tensors_the_adapter_leaves_alone(work):
    out = work["dir"] / "same.gguf"
    export_merged(work["base"], out, work["adapter"], "same", threads=1)
    a, b = GGUFFile(work["base"]), GGUFFile(out)
    for name in a.tensors:
        changed = any(k in name for k in ("attn_q.", "attn_k.", "attn_v.", "ffn_down."))
        assert np.array_equal(a.raw_blocks(name), b.raw_blocks(name)) != changed, name


def test_no_adapter_same_is_the_base(work):
    out = work["dir"] / "copy.gguf"
    export_merged(work["base"], out, None, "same")
    with torch.no_grad():
        assert torch.equal(load_gguf_model(out)(IDS), load_gguf_model(work["base"])(IDS))


def test_ia3_merges_too(work):
    adapter = _adapter(work["base"], work["dir"] / "ia3", IA3Config(), seed=1)
    peft = PeftModel.from_pretrained(load_gguf_model(work["base"]), adapter)
    with torch.no_grad():
        peft.merge_adapter()
        ref = peft(IDS)
    export_merged(work["base"], work["dir"] / "ia3.gguf", adapter, "F32")
    with torch.no_grad():
        assert _rel(load_gguf_model(work["dir"] / "ia3.gguf")(IDS), ref) < 1e-5


def test_hf_base_written_as_convert_hf_to_gguf(work):
    from attnkit.train.hf_export import save_hf_llama

    lm = load_causal_lm(work["base"])
    hf = save_hf_llama(lm.model, lm.tokenizer, work["dir"] / "hf")
    out = work["dir"] / "from-hf.gguf"
    types = export_merged(hf, out, work["adapter"], "F16")
    assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}
    lm2 = load_causal_lm(out)
    with torch.no_grad():
        assert _rel(lm2.model(IDS), work["ref"]) < 2e-3
    m0, m1 = GGUFFile(work["base"]).metadata, GGUFFile(out).metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template", "llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv",
                "llama.rope.dimension_count", "llama.vocab_size"):
        assert m1[key] == m0[key], key
    text = "Hello world, 12345 tokens!\n  <|im_start|>ok"
    assert lm2.tokenizer.encode(text) == lm.tokenizer.encode(text)


def test_hf_base_of_another_family_is_refused(work, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(ExportError, match="model_type 'gemma2'.*supported: llama, mistral, qwen2, qwen3"):
        export_merged(d, tmp_path / "x.gguf")


# -- LoRA GGUF -----------------------------------------------------------------------------------------------

def test_lora_gguf_format(work):
    out = work["dir"] / "lora.gguf"
    info = export_lora(work["adapter"], work["base"], out)
    r = GGUFReader(out)
    assert (_str(r, "general.type"), _str(r, "adapter.type"), _str(r, "general.architecture")) == ("adapter", "lora", "llama")
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    assert math.isclose(alpha, 8 / math.sqrt(4) * 4, rel_tol=1e-6) and alpha == pytest.approx(info["alpha"])  # α/√r·r
    names = sorted(t.name for t in r.tensors)
    want = sorted(f"blk.{i}.{m}.weight.{ab}" for i in range(2) for m in ("attn_q", "attn_k", "attn_v", "ffn_down")
                  for ab in ("lora_a", "lora_b"))
    assert names == want
    rows = {"attn_q": 64, "attn_k": 32, "attn_v": 32, "ffn_down": 64}
    for t in r.tensors:
        m, ab = t.name.split(".")[2], t.name.rsplit(".", 1)[1]
        rank, cols = (2, 128) if m == "ffn_down" else (4, 64)
        # ggml order (ne0 innermost): lora_a [in, r], lora_b [r, out], as llama-adapter.cpp checks
        assert list(t.shape) == ([cols, rank] if ab == "lora_a" else [rank, rows[m]])
        assert t.tensor_type == GGMLQuantizationType.F32
    export_lora(work["adapter"], work["base"], work["dir"] / "lora-f16.gguf", "F16")
    assert {t.tensor_type for t in GGUFReader(work["dir"] / "lora-f16.gguf").tensors} == {GGMLQuantizationType.F16}


def test_lora_gguf_applied_by_hand_equals_the_merge(work):
    """W + (alpha/r)·B·A with llama.cpp's rule (r = lora_b's columns) from the file = attnkit's merged weights."""
    out = work["dir"] / "lora-hand.gguf"
    export_lora(work["adapter"], work["base"], out)
    r = GGUFReader(out)
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    t = {x.name: np.array(x.data, dtype=np.float32) for x in r.tensors}
    base = GGUFFile(work["base"])
    model = work["peft"].base_model  # merged
    for i in range(2):
        for gname, ours, heads in (("attn_q", "self_attn.q_proj", 4), ("attn_k", "self_attn.k_proj", 2),
                                   ("attn_v", "self_attn.v_proj", None), ("ffn_down", "ffn.down_proj", None)):
            name = f"blk.{i}.{gname}.weight"
            A, B = t[name + ".lora_a"], t[name + ".lora_b"]
            w = base.load(name) + (alpha / B.shape[1]) * (B @ A)
            w = unpermute_qk(torch.from_numpy(w), heads).numpy() if heads else w
            layer = model.get_submodule(f"layers.{i}.{ours}")
            want = (layer.base_layer if hasattr(layer, "base_layer") else layer).weight.detach().numpy()
            assert np.abs(w - want).max() < 1e-5, name


def test_lora_gguf_loads_back(work):
    out = work["dir"] / "lora-back.gguf"
    export_lora(work["adapter"], work["base"], out)
    peft = load_lora_gguf(load_gguf_model(work["base"]), out)
    with torch.no_grad():
        assert _rel(peft(IDS), work["ref"]) < 1e-5


def test_permute_qk_inverts_the_loader():
    w = torch.randn(32, 8)
    assert torch.equal(unpermute_qk(torch.from_numpy(permute_qk(w.numpy(), 4)), 4), w)


# -- bad input ------------------------------------------------------------------------------------------------

def _no_file(out):
    return not out.exists() and not out.with_name(out.name + ".part").exists()


def test_adapter_for_another_model_shape(work):
    other = write_llama_gguf(work["dir"] / "other.gguf", {**TINY, "d_model": 32, "n_heads": 2, "n_kv_heads": 1}, "F16",
                             tokenizer_from=work["dir"] / "vocab.gguf")
    adapter = _adapter(other, work["dir"] / "other-adapter", LoraConfig(r=4, target_modules=["q_proj"]))
    for fn, out in ((lambda o: export_merged(work["base"], o, adapter), work["dir"] / "bad.gguf"),
                    (lambda o: export_lora(adapter, work["base"], o), work["dir"] / "bad-lora.gguf")):
        with pytest.raises(ExportError, match=r"layers\.0\.self_attn\.q_proj has lora_A \(4, 32\).*blk\.0\.attn_q\.weight.*another model"):
            fn(out)
        assert _no_file(out)


def test_missing_files(work, tmp_path):
    out = tmp_path / "o.gguf"
    with pytest.raises(ExportError, match="nope.gguf: no such GGUF file"):
        export_merged(tmp_path / "nope.gguf", out)
    with pytest.raises(ExportError, match="no-adapter: no such adapter directory"):
        export_merged(work["base"], out, tmp_path / "no-adapter")
    empty = tmp_path / "empty-adapter"
    empty.mkdir()
    with pytest.raises(ExportError, match="adapter_config.json: missing"):
        export_lora(empty, work["base"], out)
    assert _no_file(out)


def test_dora_merges_into_the_model_file_and_is_refused_as_a_lora_gguf(work, tmp_path):
    dora = _adapter(work["base"], tmp_path / "dora", LoraConfig(**{**LORA, "use_dora": True}))
    peft = PeftModel.from_pretrained(load_gguf_model(work["base"]), dora)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    peft.save_pretrained(dora)
    with torch.no_grad():
        peft.merge_adapter()
        ref = peft(IDS)
    out = tmp_path / "dora-F32.gguf"
    export_merged(work["base"], out, dora, "F32", threads=1)
    with torch.no_grad():
        assert _rel(load_gguf_model(out)(IDS), ref) < 1e-5
    with pytest.raises(ExportError, match="DoRA"):
        export_lora(dora, work["base"], tmp_path / "o.gguf")
    assert _no_file(tmp_path / "o.gguf")


def test_other_methods_are_refused(work, tmp_path):
    out = tmp_path / "o.gguf"
    ia3 = _adapter(work["base"], tmp_path / "ia3", IA3Config())
    with pytest.raises(ExportError, match="a IA3 adapter cannot be written as a llama.cpp LoRA GGUF"):
        export_lora(ia3, work["base"], out)
    assert _no_file(out)


def test_a_failed_write_leaves_no_file(work, monkeypatch):
    import attnkit.quant.gguf_export as ge

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ge, "quantize_rows", boom)
    out = work["dir"] / "interrupted.gguf"
    with pytest.raises(RuntimeError, match="disk full"):
        export_merged(work["base"], out, work["adapter"], "F16")
    assert _no_file(out)


# -- the command line ------------------------------------------------------------------------------------------

def test_cli(work, capsys):
    merged, lora = work["dir"] / "cli-merged.gguf", work["dir"] / "cli-lora.gguf"
    assert main(["export", "--model", str(work["base"]), "--adapter", str(work["adapter"]), "--gguf", str(merged),
                 "--type", "Q8_0", "--lora-gguf", str(lora), "--quiet"]) == 0
    assert merged.exists() and lora.exists()
    assert main(["export", "--model", str(work["base"]), "--gguf", str(work["dir"] / "x.gguf"), "--type", "Q3_X"]) == 2
    assert "unknown preset 'Q3_X'" in capsys.readouterr().err
    assert main(["export", "--lora-gguf", str(work["dir"] / "y.gguf")]) == 2
    assert "--lora-gguf needs --adapter" in capsys.readouterr().err


def test_pre_tokenizer_found_by_convert_hf_to_gguf_hash():
    """SmolLM2's vocabulary (rebuilt from the embedded GGUF) hashes to convert_hf_to_gguf.py's 'smollm' entry."""
    from attnkit.loading.defaults import default_chat_model
    from attnkit.quant.gguf_export import _pre_tokenizer
    from attnkit.text.tokenizer import Tokenizer

    tk = Tokenizer.from_gguf(GGUFFile(default_chat_model()).metadata).tk
    assert _pre_tokenizer(tk, {}, default_chat_model()) == "smollm"
