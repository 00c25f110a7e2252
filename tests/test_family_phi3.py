"""The Phi-3 family (Phi-3 / Phi-3.5 / Phi-4-mini) against transformers' Phi3ForCausalLM: tiny random checkpoints
saved by transformers itself (fused qkv_proj / gate_up_proj, LongRoPE with a tiny original context so that the
long factors are exercised, Phi-4-mini's partial rotary 0.75 and tied embeddings), the same models written as
llama.cpp's converter writes phi3 GGUF files (fused attn_qkv, ffn_up holding gate and up, rope_factors_long /
short tensors), greedy decoding, the engine with the C decode step, and Phi-3.5's chat template.

Weights are drawn with a large std so that a wrong row slice cannot hide under the tolerance; every parity test
has a negative control.
"""

from __future__ import annotations

import math
import os

import gguf
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.loading.errors import ModelLoadError, UnsupportedModelError  # noqa: E402
from attnkit.loading.gguf import load_gguf_model  # noqa: E402
from attnkit.loading.hf import load_hf_model  # noqa: E402
from attnkit.models.llama import rotary_embedding  # noqa: E402
from attnkit.models.phi3 import needs_reprefill  # noqa: E402
from test_models_families import _randomize  # noqa: E402 (weights drawn wide: a wrong mapping shows)

TOL = 1e-4
VOCAB, ORIG, EOS = 128, 16, 2
HD = 16  # hidden 64 / 4 heads


def _factors(n: int, lo: float, hi: float, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(n, generator=g)).tolist()


def phi3_config(partial: float = 1.0, longrope: bool = True, tie: bool = False, **kw):
    n = int(HD * partial) // 2
    rope = {"rope_type": "longrope", "short_factor": _factors(n, 1.0, 1.5, 1), "long_factor": _factors(n, 1.5, 6.0, 2)}
    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=ORIG,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie,
                rope_scaling=rope if longrope else None, partial_rotary_factor=partial)
    args.update(kw)
    return transformers.Phi3Config(**args)


def _ids(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    """Phi-3-mini-128k-like: LongRoPE, full rotary, untied (the transformers model and its directory)."""
    ref = _randomize(transformers.Phi3ForCausalLM(phi3_config()))
    path = tmp_path_factory.mktemp("phi3")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


@pytest.fixture(scope="module")
def phi4(tmp_path_factory):
    """Phi-4-mini-like: partial rotary 0.75 (12 of 16 dims), LongRoPE, tied embeddings."""
    ref = _randomize(transformers.Phi3ForCausalLM(phi3_config(partial=0.75, tie=True)))
    path = tmp_path_factory.mktemp("phi4")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


# -- HF safetensors ---------------------------------------------------------------------------------
def test_phi3_longrope_matches_transformers(phi3):
    ref, path = phi3
    ours = load_hf_model(path)
    assert ours.cfg.extra["family"] == "phi3" and ours.cfg.rope_scaling["rope_type"] == "longrope"
    af = math.sqrt(1 + math.log(64 / ORIG) / math.log(ORIG))
    assert ours.rotary.attention_factor == pytest.approx(af) == ref.model.rotary_emb.attention_scaling
    short, long = _ids(12), _ids(40)
    with torch.no_grad():
        want_s, want_l = ref(short).logits, ref(long).logits
        assert want_l.abs().max() > 1.0
        torch.testing.assert_close(ours(short), want_s, atol=TOL, rtol=0)  # 12 ≤ 16: short factors
        torch.testing.assert_close(ours(long), want_l, atol=TOL, rtol=0)  # 40 > 16: long factors
        long_freq = ours.rotary.long_inv_freq
        ours.rotary.long_inv_freq = ours.rotary.inv_freq  # negative control: the long factors matter …
        assert (ours(long) - want_l).abs().max() > 1e-2
        torch.testing.assert_close(ours(short), want_s, atol=TOL, rtol=0)  # … only beyond the original context
        ours.rotary.long_inv_freq = long_freq
        ours.rotary.attention_factor = 1.0  # and so does the attention factor
        assert (ours(short) - want_s).abs().max() > 1e-2


def test_phi3_kv_cache_steps_match_transformers_across_the_original_context(phi3):
    """Token by token past 16 positions: each step picks short/long by its length, in both."""
    ref, path = phi3
    ours = load_hf_model(path)
    ids = _ids(30, B=1)
    with torch.no_grad():
        cache = ours.new_cache()
        got = [ours(ids[:, :10], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(10, 30)]
        out = ref(ids[:, :10], use_cache=True)
        want, past = [out.logits], out.past_key_values
        for t in range(10, 30):
            out = ref(ids[:, t:t + 1], cache=past, use_cache=True)
            want.append(out.logits)
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=TOL, rtol=0)


def test_phi4_mini_partial_rotary_tied(phi4):
    ref, path = phi4
    ours = load_hf_model(path)
    assert ours.cfg.partial_rotary == 0.75 and ours.rotary.rotary_dim == 12 and ours.cfg.tie_embeddings
    ids = _ids(36)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        ours.cfg.partial_rotary = 1.0  # negative control: rotating the whole head differs
        ours.cfg.rope_scaling = {**ours.cfg.rope_scaling, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
        ours.rotary = rotary_embedding(ours.cfg)
        assert (ours(ids) - want).abs().max() > 1e-2


def test_phi3_default_rope_sliding_window(tmp_path):
    """Phi-3-mini-4k: no scaling, a sliding window (transformers applies it)."""
    ref = _randomize(transformers.Phi3ForCausalLM(phi3_config(longrope=False, sliding_window=6)))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    assert ours.cfg.rope_scaling is None and ours.cfg.sliding_window == 6 and ours.rotary.attention_factor == 1.0
    ids = _ids(20)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        ours.cfg.sliding_window = None
        assert (ours(ids) - want).abs().max() > 1e-2


def test_phi3_config_errors(tmp_path):
    import json

    c = phi3_config().to_dict()
    c["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    c.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(UnsupportedModelError, match="linear"):
        load_hf_model(tmp_path)
    c["rope_scaling"] = {"rope_type": "su", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(UnsupportedModelError, match="factor has 3 values, the 16 rotated dimensions need 8"):
        load_hf_model(tmp_path)


def _greedy(ours, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding with the model's own KV cache, rebuilt where transformers' Phi3 generate rebuilds it."""
    ids, cache, cached = list(prompt), ours.new_cache(), 0
    with torch.no_grad():
        for _ in range(n):
            if needs_reprefill(ours, cached, len(ids)):
                cache, cached = ours.new_cache(), 0
            logits = ours(torch.tensor([ids[cached:]]), cache=cache, last_only=True)
            cached = len(ids)
            logits[..., EOS] = -math.inf  # as min_new_tokens in transformers' generate
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("which", ["phi3", "phi4"])
def test_greedy_tokens_match_transformers_generate(which, request):
    ref, path = request.getfixturevalue(which)
    ours = load_hf_model(path)
    for i, n in enumerate((3, 9, 20)):  # crossing the original context while decoding, and starting past it
        prompt = _ids(n, B=1, seed=10 + i)
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                            min_new_tokens=24, pad_token_id=0)[0, n:].tolist()
        assert _greedy(ours, prompt[0].tolist(), 24) == want


def test_needs_reprefill_rule(phi3):
    ours = load_hf_model(phi3[1])
    assert not needs_reprefill(ours, 0, 40)  # nothing cached: a prefill anyway
    assert not needs_reprefill(ours, 10, 16)  # within the original context
    assert needs_reprefill(ours, 16, 17) and needs_reprefill(ours, 10, 30)  # crossing it with short-rotated keys
    assert not needs_reprefill(ours, 17, 18)  # already past: transformers keeps the cache


# -- GGUF -------------------------------------------------------------------------------------------
def write_phi3_gguf(path, ref, qtype: str = "F32", fused_qkv: bool = True):
    """``ref`` as llama.cpp's convert_hf_to_gguf.py (Phi3MiniModel) writes it; ref's weights are replaced by what
    the file holds (so that the reference sees the dequantized values)."""
    cfg = ref.config
    sd = ref.state_dict()
    rope = cfg.rope_parameters or {}
    partial = rope.get("partial_rotary_factor", 1.0)
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(int(partial * cfg.hidden_size) // cfg.num_attention_heads)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_sliding_window(cfg.sliding_window or 0)

    def add(name: str, t: torch.Tensor, hf: str | None = None, rows: slice | None = None):
        arr = t.detach().numpy().astype(np.float32)
        kind = qtype if arr.ndim == 2 else "F32"
        data = arr if kind == "F32" else gguf.quants.quantize(arr, gguf.GGMLQuantizationType[kind])
        back = arr if kind == "F32" else gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])
        if hf is not None:
            with torch.no_grad():
                target = sd[hf] if rows is None else sd[hf][rows]
                target.copy_(torch.from_numpy(back.reshape(arr.shape)))
        w.add_tensor(name, data, raw_dtype=None if kind == "F32" else gguf.GGMLQuantizationType[kind])

    add("token_embd.weight", sd["model.embed_tokens.weight"], "model.embed_tokens.weight")
    add("output_norm.weight", sd["model.norm.weight"], "model.norm.weight")
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"], "lm_head.weight")
    q, kv = cfg.hidden_size, cfg.num_key_value_heads * HD
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], p + "input_layernorm.weight")
        qkv = p + "self_attn.qkv_proj.weight"
        if fused_qkv:
            add(f"blk.{i}.attn_qkv.weight", sd[qkv], qkv)
        else:
            for n, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, q + 2 * kv))):
                add(f"blk.{i}.attn_{n}.weight", sd[qkv][rows], qkv, rows)
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], p + "self_attn.o_proj.weight")
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], p + "post_attention_layernorm.weight")
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"], p + "mlp.gate_up_proj.weight")
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], p + "mlp.down_proj.weight")
    if rope.get("long_factor"):
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings)))
        w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("which, fused", [("phi3", True), ("phi4", True), ("phi3", False)])
def test_gguf_f32_matches_transformers(tmp_path, which, fused, request):
    ref = request.getfixturevalue(which)[0]
    path = write_phi3_gguf(tmp_path / "phi3.gguf", ref, fused_qkv=fused)
    ours = load_gguf_model(path)
    assert ours.cfg.extra["family"] == "phi3" and ours.cfg.rope_scaling["rope_type"] == "longrope"
    ids = _ids(40)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        ours.layers[1].self_attn.k_proj.weight.copy_(ours.layers[1].self_attn.v_proj.weight)  # negative control
        assert (ours(ids) - want).abs().max() > 1e-2


def test_gguf_q8_0_kept_in_blocks(tmp_path, phi3):
    """quantize="gguf": the fused tensors' row slices stay Q8_0 blocks; against the dequantized reference."""
    from attnkit.quant.native import GGUFBlockLinear, library

    if library() is None:
        pytest.skip("attnkit's C kernels are not built")
    ref = phi3[0]
    path = write_phi3_gguf(tmp_path / "q8.gguf", ref, "Q8_0")
    dense = load_gguf_model(path)
    ours = load_gguf_model(path, quantize="gguf")
    attn, ffn = ours.layers[0].self_attn, ours.layers[0].ffn
    for m, rows in ((attn.q_proj, 64), (attn.k_proj, 32), (attn.v_proj, 32), (ffn.gate_proj, 96), (ffn.up_proj, 96)):
        assert type(m) is GGUFBlockLinear and m.kind == "Q8_0" and m.out_features == rows
    ids = _ids(40)
    with torch.no_grad():
        want = dense(ids)
        got = ours(ids)
        assert (got - want).abs().max() < 0.03 * want.abs().max()
        few = dense(ids[:, :5])  # 5 ≤ 16 tokens: short factors, 5 rows: the integer kernel with 8-bit activations
        assert (ours(ids[:, :5]) - few).abs().max() < 0.05 * few.abs().max()


def test_gguf_errors(tmp_path, phi3):
    ref = phi3[0]
    path = write_phi3_gguf(tmp_path / "ok.gguf", ref)
    from attnkit.loading.gguf_file import GGUFFile
    from attnkit.loading.gguf import gguf_config

    cfg = gguf_config(GGUFFile(path))
    assert cfg.rope_scaling["original_max_position_embeddings"] == ORIG and cfg.partial_rotary == 1.0
    bad = transformers.Phi3ForCausalLM(phi3_config(intermediate_size=64)).eval()  # ffn_up rows ≠ 2·96
    bad_path = write_phi3_gguf(tmp_path / "bad.gguf", bad)
    g = GGUFFile(bad_path)
    g.metadata["phi3.feed_forward_length"] = 96
    with pytest.raises(ModelLoadError, match="fused tensor has 128 rows"):
        load_gguf_model(bad_path, g=g)


# -- engine and C decode step ---------------------------------------------------------------------
def test_engine_and_c_step_match_the_model(tmp_path, phi3, phi4):
    """Prompts within the original context, decoding past it (the engine takes each position at its own length,
    as the model's cached loop does while decoding). Both run the C step (Phi-4-mini's RoPE on part of each head)."""
    from attnkit.engine import EngineConfig, LLMEngine, SamplingParams
    from attnkit.kernels import library
    from attnkit.nn.fused import fuse_for_inference
    from attnkit.quant.row_kernel import rows_are

    if library() is None:
        pytest.skip("attnkit's C kernels are not built")
    for which, ref in (("phi3", phi3[0]), ("phi4", phi4[0])):
        path = write_phi3_gguf(tmp_path / f"{which}.gguf", ref, "Q8_0")
        model = fuse_for_inference(load_gguf_model(path, quantize="gguf"))
        engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_bytes=8 << 20))
        prompts = [_ids(n, B=1, seed=20 + n)[0].tolist() for n in (3, 9, 14)]
        for p in prompts:
            engine.add_request(p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        outs = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[tuple(o.prompt_token_ids)] = list(o.token_ids)
        assert engine.runner.native and engine.runner.native_reason is None
        for p in prompts:  # the model's own KV-cache loop on the same blocks, each row through the product the engine
            ids, cache = list(p), model.new_cache()  # gives it (a short prompt's and a generated token's: integer)
            with torch.no_grad():
                with rows_are("short-prompt"):
                    logits = model(torch.tensor([ids]), cache=cache, last_only=True)
                for _ in range(8):
                    ids.append(int(logits[0, -1].argmax()))
                    with rows_are("generated"):
                        logits = model(torch.tensor([ids[-1:]]), cache=cache, last_only=True)
            assert outs[tuple(p)] == ids[len(p):]


# -- chat template ------------------------------------------------------------------------------------
PHI35_TEMPLATE = (  # microsoft/Phi-3.5-mini-instruct tokenizer_config.json
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_phi3_chat_template_matches_transformers(tmp_path):
    from tokenizers import Tokenizer as HFTok, models, pre_tokenizers

    from attnkit.text.chat_template import render_chat
    from attnkit.text.tokenizer import Tokenizer

    special = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = ["hi", "be", "terse", "2+2?", "4", "\n"]
    tk = HFTok(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(special)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|endoftext|>",
                                                unk_token="<unk>", chat_template=PHI35_TEMPLATE)
    fast.save_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.chat_template == PHI35_TEMPLATE
    convs = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "be terse"}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "hi"}],
             [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]]
    for msgs in convs:
        for gen in (True, False):
            want = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            got = render_chat(ours.chat_template, msgs, add_generation_prompt=gen, bos_token=ours.bos_token or "",
                              eos_token=ours.eos_token or "")
            assert got == want
    assert render_chat(ours.chat_template, convs[0], eos_token="<|endoftext|>") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    ids = ours.encode(render_chat(ours.chat_template, convs[0], eos_token=""), add_special_tokens=False)
    assert ids[0] == special.index("<|user|>") and special.index("<|end|>") in ids


# -- LoRA ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_phi3_adapters_cross_to_hf_peft_both_ways(phi3, tmp_path, method):
    """q/k/v and gate/up are rows of HF's fused qkv_proj / gate_up_proj. attnkit's adapters on some of those parts
    save as HF PEFT's adapter of the fused module (LoRA: the parts' A's stacked, each B in its rows, α scaled with the
    rank; DoRA's magnitude and IA³'s vector with the rows of the parts not adapted as they are) and HF PEFT loads them
    with attnkit's logits; HF PEFT's adapter on the fused modules loads into attnkit split by rows (A shared) with HF
    PEFT's logits."""
    peft = pytest.importorskip("peft")
    from attnkit.peft import IA3Config, LoraConfig, PeftModel, get_peft_model
    from attnkit.peft.families import hf_name_table

    _, path = phi3

    def fresh():  # a new transformers model each time (its LongRoPE keeps state from earlier calls on the fixture's)
        return transformers.Phi3ForCausalLM.from_pretrained(path).eval()

    table = hf_name_table(load_hf_model(path))
    assert table["layers.0.self_attn.k_proj"] == ("model.layers.0.self_attn.qkv_proj", 1)
    assert table["layers.0.ffn.up_proj"] == ("model.layers.0.mlp.gate_up_proj", 1)
    assert table["layers.0.self_attn.o_proj"] == ("model.layers.0.self_attn.o_proj", None)
    ids = _ids(12)

    def perturb(params):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)

    # attnkit → HF PEFT
    ours_cfg = {"lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "o_proj"]),
                "dora": LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "gate_proj"]),
                "ia3": IA3Config(target_modules=["k_proj", "v_proj", "up_proj", "down_proj"],
                                 feedforward_modules=["down_proj"])}[method]
    ours = get_peft_model(load_hf_model(path), ours_cfg)
    perturb(ours.adapter_parameters("default").values())
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        out = ours(ids)
        with ours.disable_adapter():
            assert (ours(ids) - out).abs().max() > 1e-2  # the adapter matters
    pm = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, out, atol=TOL, rtol=0)
    # HF PEFT → attnkit
    hf_cfg = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "down_proj"]),
              "dora": peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["qkv_proj", "o_proj"]),
              "ia3": peft.IA3Config(target_modules=["qkv_proj", "gate_up_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])}[method]
    pm = peft.get_peft_model(fresh(), hf_cfg)
    perturb([p for n, p in pm.named_parameters() if p.requires_grad])
    pm.eval().save_pretrained(tmp_path / "hf")
    back = PeftModel.from_pretrained(load_hf_model(path), tmp_path / "hf").eval()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        assert (want - fresh()(input_ids=ids).logits).abs().max() > 1e-2
        torch.testing.assert_close(back(ids), want, atol=TOL, rtol=0)


def test_phi3_lora_under_attnkit_part_names_still_loads(phi3, tmp_path):
    """An adapter saved before the parts took HF's fused names (``model.layers.N.self_attn.q_proj``) loads as it did."""
    import json

    from safetensors.torch import load_file, save_file

    from attnkit.peft import LoraConfig, PeftModel, get_peft_model

    _, path = phi3
    ours = get_peft_model(load_hf_model(path), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    ours.eval().save_pretrained(tmp_path)
    t = load_file(tmp_path / "adapter_model.safetensors")  # rewrite it as the old files were: q_proj's own A and B
    old = {}
    for k, v in t.items():
        if ".qkv_proj.lora_A" in k:
            old[k.replace("qkv_proj", "q_proj")] = v
        elif ".qkv_proj.lora_B" in k:
            old[k.replace("qkv_proj", "q_proj")] = v[:64]  # q's rows of the fused B: n_heads · hd = 64
        else:
            old[k] = v
    save_file(old, tmp_path / "adapter_model.safetensors")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"], cfg["rank_pattern"], cfg["alpha_pattern"] = ["q_proj"], {}, {}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    back = PeftModel.from_pretrained(load_hf_model(path), tmp_path).eval()
    ids = _ids(12)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids), atol=TOL, rtol=0)


def test_phi4_mini_config_json_as_published():
    """Phi-4-mini-instruct's config.json (transformers 4 layout: rope_scaling "longrope", partial_rotary_factor and
    original_max_position_embeddings at the top level), sizes cut down: the same RoPE as transformers builds."""
    from attnkit.loading.hf import model_config

    n = int(128 * 0.75) // 2
    c = {"model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
         "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "hidden_act": "silu",
         "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True,
         "rope_scaling": {"type": "longrope", "long_factor": _factors(n, 1.0, 40.0, 3),
                          "short_factor": _factors(n, 1.0, 1.1, 4)}}
    ours = model_config(c, None)
    assert ours.rotary_dim == 96 and ours.hd == 128 and ours.tie_embeddings
    rot = rotary_embedding(ours)
    hf_cfg = transformers.Phi3Config(**{k: v for k, v in c.items() if k != "model_type"})
    for seq_len, ours_freq in ((None, rot.inv_freq), (4097, rot.long_inv_freq)):
        want, af = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=seq_len)
        torch.testing.assert_close(ours_freq, want, atol=1e-7, rtol=1e-6)
    assert rot.attention_factor == pytest.approx(af) == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert rot.long_after == 4096
