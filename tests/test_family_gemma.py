"""Gemma, Gemma 2 and Gemma 3 (text) against transformers: tiny random checkpoints saved by transformers
itself (safetensors) and written as GGUF the way llama.cpp's converter does (conversion/gemma.py), loaded by
attnkit and compared logit by logit; greedy decoding with the KV cache against ``generate``; the Gemma chat
templates against ``apply_chat_template``.

Weights are re-drawn with a large standard deviation (norm offsets γ around 0, as Gemma stores them) so
that every parameter moves the output; the sequences are longer than the sliding window so that the local
layers differ from the global ones, and every test has negative controls: dropping an option that Gemma
needs (soft-capping, the window, the local RoPE, QK-norm's offset, the softmax scale, …) changes the logits.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.loading.errors import UnsupportedModelError  # noqa: E402
from attnkit.loading.gguf import load_gguf_model  # noqa: E402
from attnkit.loading.hf import load_hf_model  # noqa: E402
from attnkit.models.llama import Llama  # noqa: E402
from attnkit.quant.native import library  # noqa: E402
from attnkit.text.chat_template import ChatTemplateError, render_chat  # noqa: E402
from attnkit.text.tokenizer import Tokenizer  # noqa: E402

TOL = 1e-4
VOCAB, WINDOW, T = 128, 8, 24  # T > WINDOW: the local layers see less than the global ones
HD = 24  # head_dim ≠ d_model / n_heads (16), as in Gemma
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=HD, max_position_embeddings=256, rms_norm_eps=1e-6)
# query_pre_attn_scalar ≠ head_dim: a softmax scale of head_dim^−½ would show
GEMMA2 = dict(BASE, num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=40,
              attn_logit_softcapping=8.0, final_logit_softcapping=12.0)
GEMMA3 = dict(BASE, num_hidden_layers=6, sliding_window=WINDOW, query_pre_attn_scalar=40,
              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})


def _randomize(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Weights N(0, std²); Gemma's (1 + γ) norms γ ~ N(0, 0.2²) (so their scales are 1 + 0.2·N as elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name.lower():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def _ids(B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def gemma1():
    return _randomize(transformers.GemmaForCausalLM(transformers.GemmaConfig(**BASE, num_hidden_layers=2)))


def gemma2(**kw):
    return _randomize(transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**{**GEMMA2, **kw})))


def gemma3(**kw):
    return _randomize(transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**{**GEMMA3, **kw})))


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def _differs(model, want, ids, by: float = 1e-2) -> bool:
    with torch.no_grad():
        return bool((model(ids) - want).abs().max() > by)


# -- HF safetensors ----------------------------------------------------------------------------
def test_gemma2_hf_parity_and_controls(tmp_path):
    ref = gemma2()
    ours = load_hf_model(_save(ref, tmp_path))
    cfg = ours.cfg
    assert isinstance(ours, Llama) and cfg.extra["family"] == "gemma2" and cfg.tie_embeddings and ours.lm_head is None
    assert cfg.layer_windows == [WINDOW, None, WINDOW, None]  # layer 0 local, then alternating
    assert (cfg.attn_softcap, cfg.final_softcap, cfg.norm_offset, cfg.act) == (8.0, 12.0, 1.0, "gelu_tanh")
    assert cfg.attn_scale == pytest.approx(40 ** -0.5) and cfg.embed_scale == pytest.approx(8.0)
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert want.abs().max() > 3.0  # large, yet under the final cap of 12
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # negative controls: each Gemma 2 option matters
    ours.cfg = replace(cfg, final_softcap=None)
    assert _differs(ours, want, ids)
    ours.cfg = replace(cfg, layer_windows=None)
    assert _differs(ours, want, ids)
    ours.cfg = cfg
    for layer in ours.layers:
        layer.self_attn.softcap = None
    assert _differs(ours, want, ids)
    for layer in ours.layers:
        layer.self_attn.softcap, layer.self_attn.scale = 8.0, HD ** -0.5
    assert _differs(ours, want, ids)
    for layer in ours.layers:
        layer.self_attn.scale = 40 ** -0.5
        layer.post_attn_norm = torch.nn.Identity()
    assert _differs(ours, want, ids)


def test_gemma3_hf_parity_and_controls(tmp_path):
    ref = gemma3(tie_word_embeddings=False)
    ours = load_hf_model(_save(ref, tmp_path))
    cfg = ours.cfg
    assert cfg.extra["family"] == "gemma3" and cfg.qk_norm == "head" and not cfg.tie_embeddings
    assert cfg.layer_windows == [WINDOW] * 5 + [None]  # 5 local : 1 global
    assert cfg.attn_softcap is None and cfg.final_softcap is None
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling["factor"]) == (1_000_000.0, 10_000.0, 8.0)
    ids = _ids()
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert want.abs().max() > 3.0
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # negative controls: the local RoPE base, the global RoPE's scaling, the window, QK-norm's (1 + γ)
    local, ours.rotary_local = ours.rotary_local, None
    assert _differs(ours, want, ids)
    ours.rotary_local, glob = local, ours.rotary
    ours.rotary = local
    assert _differs(ours, want, ids)
    ours.rotary = glob
    ours.cfg = replace(cfg, layer_windows=None)
    assert _differs(ours, want, ids)
    ours.cfg = cfg
    for layer in ours.layers:
        layer.self_attn.q_norm.offset = 0.0
    assert _differs(ours, want, ids)


def test_gemma3_legacy_config_and_final_softcap(tmp_path):
    """A transformers-4 config.json (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern,
    no layer_types) loads to the same model; final_logit_softcapping, off in the released models, is honoured."""
    ref = gemma3(num_hidden_layers=4, final_logit_softcapping=6.0, rope_parameters=None, sliding_window_pattern=2,
                 rope_theta=50_000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert ref.config.layer_types == ["sliding_attention", "full_attention"] * 2
    _save(ref, tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    for k in ("layer_types", "rope_parameters"):
        c.pop(k, None)
    c.update(rope_theta=50_000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
             sliding_window_pattern=2, transformers_version="4.50.0")
    (tmp_path / "config.json").write_text(json.dumps(c))
    ours = load_hf_model(tmp_path)
    cfg = ours.cfg
    assert cfg.layer_windows == [WINDOW, None, WINDOW, None] and cfg.final_softcap == 6.0
    assert (cfg.rope_theta, cfg.rope_local_theta) == (50_000.0, 100.0)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
    assert want.abs().max() < 6.0
    ours.cfg = replace(cfg, final_softcap=None)
    assert _differs(ours, want, ids)


def test_gemma1_hf_parity(tmp_path):
    ref = gemma1()
    _save(ref, tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**c, "hidden_act": "gelu"}))  # google/gemma-2b's legacy value
    ours = load_hf_model(tmp_path)
    cfg = ours.cfg
    assert cfg.extra["family"] == "gemma" and not cfg.post_norms and cfg.attn_softcap is None and cfg.attn_scale is None
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
    # negative controls: the embedding scale and the norms' offset
    ours.cfg = replace(cfg, embed_scale=1.0)
    assert _differs(ours, want, ids)
    ours.cfg = cfg
    ours.norm.offset = 0.0
    assert _differs(ours, want, ids)


@pytest.mark.parametrize("change, message", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_activation": "relu"}, "'relu'"),
    ({"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"layer_types": ["sliding_attention", "chunked_attention"] * 2}, "layer_types"),
    ({"sliding_window": None}, "sliding_window=None"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "sliding-window layers"),
    ({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}}, "model_type 'gemma3'"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**GEMMA3, "num_hidden_layers": 4, "model_type": "gemma3_text",
                                                      **change}))
    with pytest.raises(UnsupportedModelError, match=message):
        load_hf_model(tmp_path)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_hf_peft_adapter_on_gemma2(tmp_path, method):
    """An HF PEFT adapter of a Gemma 2 gives the same logits in attnkit. Prompt tuning: the soft prompt lives
    among the √d-scaled input embeddings (transformers' inputs_embeds are not scaled again)."""
    peft = pytest.importorskip("peft")
    from attnkit.peft import PeftModel

    ref = gemma2()
    _save(ref, tmp_path / "base")
    if method == "lora":
        config, P = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                    target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]), 0
    else:
        config, P = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), 4
    torch.manual_seed(2)
    pm = peft.get_peft_model(ref, config).eval()
    pm.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits[:, P:]
    ours = PeftModel.from_pretrained(load_hf_model(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        with ours.disable_adapter():  # negative control: the adapter matters
            assert (ours(ids) - want).abs().max() > 1e-2


# -- GGUF, as llama.cpp's converter writes it --------------------------------------------------
_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, _, kind = rest.rpartition(".")
    if arch == "gemma" and module == "post_attention_layernorm":  # Gemma 1's pre-FFN norm (tensor_mapping FFN_NORM)
        return f"blk.{layer}.ffn_norm.{kind}"
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{kind}"


def write_gemma_gguf(path, model, arch: str, qtype: str = "F32", meta_skip=(), extra_meta=None):
    """``model`` as convert_hf_to_gguf.py's GemmaModel / Gemma2Model / Gemma3Model (conversion/gemma.py) writes it:
    norms + 1, lm_head skipped for gemma and gemma2, the metadata its set_gguf_parameters writes. The model's weights
    are replaced by what the file holds (their quantized values, minus the norms' 1) for the reference."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = {"context_length": c.max_position_embeddings, "embedding_length": c.hidden_size,
            "block_count": c.num_hidden_layers, "feed_forward_length": c.intermediate_size,
            "head_count": c.num_attention_heads, "head_count_kv": c.num_key_value_heads,
            "layer_norm_rms_eps": c.rms_norm_eps, "key_length": c.head_dim, "value_length": c.head_dim}
    if arch == "gemma2":  # Gemma2Model.set_gguf_parameters
        meta.update(attn_logit_softcapping=c.attn_logit_softcapping, final_logit_softcapping=c.final_logit_softcapping,
                    sliding_window=c.sliding_window)
    elif arch == "gemma3":  # TextModel.set_gguf_parameters + Gemma3Model's
        full, local = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
        if full.get("rope_type") == "linear":
            meta.update(rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=full["factor"])
        meta.update(rope_freq_base=full["rope_theta"], rope_freq_base_swa=local["rope_theta"],
                    sliding_window=c.sliding_window)
        if c.final_logit_softcapping:
            meta["final_logit_softcapping"] = c.final_logit_softcapping
    meta.update(extra_meta or {})
    for k, v in meta.items():
        if k not in meta_skip:
            getattr(w, f"add_{k}")(v)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and arch in ("gemma", "gemma2"):
                continue  # GemmaModel / Gemma2Model.filter_tensors
            shift = 1.0 if name.endswith("norm.weight") else 0.0
            arr = p.numpy().astype(np.float32) + shift
            if qtype != "F32" and arr.ndim == 2:
                data = gguf.quants.quantize(arr, gguf.GGMLQuantizationType[qtype])
                held = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(arr.shape)
                w.add_tensor(_gguf_name(name, arch), data, raw_dtype=gguf.GGMLQuantizationType[qtype])
            else:
                held = arr
                w.add_tensor(_gguf_name(name, arch), arr)
            p.copy_(torch.from_numpy(held - shift))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# llama.cpp has no query_pre_attn_scalar: below 27B it scales by head_dim^−½, so the GGUF references do too
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gguf_f32_parity(tmp_path, arch):
    ref = gemma1() if arch == "gemma" else {"gemma2": gemma2, "gemma3": gemma3}[arch](query_pre_attn_scalar=HD)
    ours = load_gguf_model(write_gemma_gguf(tmp_path / f"{arch}.gguf", ref, arch))
    cfg = ours.cfg
    assert cfg.extra["family"] == arch and cfg.norm_offset == 0.0  # the converter added the 1
    pre_ffn = "post_attention_layernorm" if arch == "gemma" else "pre_feedforward_layernorm"
    torch.testing.assert_close(ours.layers[0].norm2.weight, 1 + getattr(ref.model.layers[0], pre_ffn).weight)
    if arch == "gemma":
        assert not cfg.post_norms and cfg.attn_scale is None and cfg.layer_windows is None
    else:
        assert cfg.attn_scale == pytest.approx(HD ** -0.5)  # not (d_model / n_heads)^−½ = 16^−½ (27B only)
    if arch == "gemma2":
        assert cfg.layer_windows == [WINDOW, None] * 2 and (cfg.attn_softcap, cfg.final_softcap) == (8.0, 12.0)
    elif arch == "gemma3":
        assert cfg.layer_windows == [WINDOW] * 5 + [None] and cfg.rope_local_theta == 10_000.0
        assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0} and cfg.qk_norm == "head"
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
    # negative control: the norms must not get a second 1
    ours.norm.offset = 1.0
    assert _differs(ours, want, ids)


def test_gguf_gemma2_llamacpp_defaults(tmp_path):
    """Without the soft-capping and window keys llama.cpp assumes 50 / 30 / 4096 (src/models/gemma2.cpp):
    so does attnkit — and the tiny model (caps 8 / 12, window 8) then computes something else."""
    ref = gemma2(query_pre_attn_scalar=HD)
    skip = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window")
    ours = load_gguf_model(write_gemma_gguf(tmp_path / "g2.gguf", ref, "gemma2", meta_skip=skip))
    assert (ours.cfg.attn_softcap, ours.cfg.final_softcap, ours.cfg.layer_windows) == (50.0, 30.0, [4096, None] * 2)
    with torch.no_grad():
        assert _differs(ours, ref(_ids()).logits, _ids())


def test_gguf_gemma3_without_window_is_all_global(tmp_path):
    """A gemma3 file without attention.sliding_window (the converter's sliding_window_pattern == 1): every
    layer global with the global RoPE, as llama.cpp's graph<false>."""
    ref = gemma3(query_pre_attn_scalar=HD, layer_types=["full_attention"] * 6)
    ours = load_gguf_model(write_gemma_gguf(tmp_path / "g3.gguf", ref, "gemma3", meta_skip=("sliding_window",)))
    assert ours.cfg.layer_windows is None and ours.rotary_local is None
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()), ref(_ids()).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gguf_q8_0(tmp_path, arch):
    """Q8_0 weights: dequantized at load, exact against the dequantized reference; quantize="gguf" (the
    file's blocks under attnkit's kernels, or int8) within a bfloat16 compute's tolerance."""
    ref = gemma2(query_pre_attn_scalar=HD) if arch == "gemma2" else gemma3(query_pre_attn_scalar=HD)
    path = write_gemma_gguf(tmp_path / f"{arch}-q8.gguf", ref, arch, "Q8_0")
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(load_gguf_model(path)(ids), want, atol=TOL, rtol=0)
        quantized = load_gguf_model(path, quantize="gguf")
        got = quantized(ids)
    if library() is not None:  # the blocks themselves under attnkit's kernel (else int8)
        assert type(quantized.layers[0].self_attn.q_proj).__name__ == "GGUFBlockLinear"
    err = (got - want).abs().max() / want.abs().max()
    assert err < 5e-2, err
    assert got.argmax(-1).eq(want.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gguf_blocks_decode_in_the_c_step_as_eagerly(tmp_path, arch):
    """The engine on a Q8_0 file's blocks: Gemma, Gemma 2 and Gemma 3 decode in the C step ((1 + γ) norms folded by
    the converter, sandwich norms, GeGLU, q/k norms, query_pre_attn_scalar, soft-capped scores and logits, local layers
    with their own block tables, window and RoPE base) with the eager engine's greedy tokens, past the window."""
    from engine_helpers import engine_greedy

    from attnkit.engine import EngineConfig, LLMEngine
    from attnkit.engine.native_decode import NativeDecoder
    from attnkit.nn.fused import fuse_for_inference

    if library() is None:
        pytest.skip("attnkit's C kernels are not built")
    ref = gemma1() if arch == "gemma" else {"gemma2": gemma2, "gemma3": gemma3}[arch]()
    path = write_gemma_gguf(tmp_path / f"{arch}.gguf", ref, arch, "Q8_0")
    prompts = [_ids(B=1, seed=s)[0, :n].tolist() for s, n in ((3, 5), (4, 13), (5, 20))]
    outs = {}
    for native in (True, False):
        engine = LLMEngine(fuse_for_inference(load_gguf_model(path, quantize="gguf")),
                           config=EngineConfig(block_size=4, kv_cache_bytes=4 << 20))
        outs[native] = engine_greedy(engine, prompts, 16, c_step=native)
        if native:
            assert isinstance(engine.runner.native, NativeDecoder), engine.runner.native_reason
            assert len(set(engine.runner.native.layer_views)) == (1 if arch == "gemma" else 2)
    assert outs[True] == outs[False]


# llama.cpp itself: a small C program against libllama that prints the logits of every position
_LLAMA_CPP_MAIN = r"""
#include <stdio.h>
#include <stdlib.h>
#include "llama.h"
static void quiet(enum ggml_log_level l, const char * t, void * u) { (void) l; (void) t; (void) u; }
int main(int argc, char ** argv) {  /* logits model.gguf id0 id1 ... */
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model * m = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!m) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 256; cp.n_threads = cp.n_threads_batch = 1;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED; cp.type_k = cp.type_v = GGML_TYPE_F32;
    struct llama_context * ctx = llama_init_from_model(m, cp);
    int n = argc - 2;
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = atoi(argv[i + 2]); b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
    }
    b.n_tokens = n;
    if (!ctx || llama_decode(ctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
    int nv = llama_vocab_n_tokens(llama_model_get_vocab(m));
    for (int i = 0; i < n; i++) {
        const float * l = llama_get_logits_ith(ctx, i);
        for (int j = 0; j < nv; j++) printf("%.8g%c", l[j], j + 1 < nv ? ' ' : '\n');
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def llama_cpp_logits(tmp_path_factory):
    """(GGUF path, token ids) → llama.cpp's logits (T, vocab); skipped without llama.cpp's headers and built
    libllama (ATTNKIT_LLAMA_CPP: its source tree, default the one vendored by llama-cpp-python in /opt) or a C
    compiler."""
    import glob
    import shutil
    import subprocess

    trees = sorted(glob.glob(os.environ.get("ATTNKIT_LLAMA_CPP", "/opt/llama.cpp/src/*/vendor/llama.cpp")))
    found = [r for r in trees if os.path.exists(f"{r}/include/llama.h") and glob.glob(f"{r}/build/bin/libllama.so*")]
    root = found[0] if found else None
    cc = shutil.which("cc") or shutil.which("gcc")
    if root is None or cc is None:
        pytest.skip("llama.cpp (include/llama.h and build/bin/libllama.so) or a C compiler not found")
    d = tmp_path_factory.mktemp("llama_cpp")
    (d / "main.c").write_text(_LLAMA_CPP_MAIN)
    lib = f"{root}/build/bin"
    r = subprocess.run([cc, "-O1", "-o", str(d / "logits"), str(d / "main.c"), f"-I{root}/include",
                        f"-I{root}/ggml/include", f"-L{lib}", "-lllama", f"-Wl,-rpath,{lib}"],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot build against llama.cpp: {r.stderr[-500:]}")

    def run(path, ids: list[int]) -> torch.Tensor:
        out = subprocess.run([str(d / "logits"), str(path), *map(str, ids)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return torch.tensor(np.loadtxt(out.stdout.splitlines(), ndmin=2), dtype=torch.float32)

    return run


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_gguf_runs_as_in_llama_cpp(tmp_path, llama_cpp_logits, arch):
    """llama.cpp's own gemma / gemma2 / gemma3 graphs on the written file agree with attnkit and transformers up
    to llama.cpp's CPU precision (its GELU is a float16 table): the writer writes what llama.cpp expects, and
    attnkit reads it as llama.cpp does. Negative control at that tolerance: the window one key wider."""
    ref = gemma1() if arch == "gemma" else {"gemma2": gemma2, "gemma3": gemma3}[arch](query_pre_attn_scalar=HD)
    path = write_gemma_gguf(tmp_path / f"{arch}.gguf", ref, arch,
                            extra_meta={"tokenizer_model": "no_vocab", "vocab_size": VOCAB})  # llama.cpp needs a vocab
    ids = _ids(B=1)
    theirs = llama_cpp_logits(path, ids[0].tolist())
    ours = load_gguf_model(path)
    with torch.no_grad():
        want, got = ref(ids).logits[0], ours(ids)[0]
    assert want.abs().max() > 3.0
    torch.testing.assert_close(theirs, want, atol=2e-2, rtol=0)
    torch.testing.assert_close(theirs, got, atol=2e-2, rtol=0)
    if arch == "gemma":  # no windows: the softmax scale instead
        for layer in ours.layers:
            layer.self_attn.scale *= 1.1
    else:
        ours.cfg = replace(ours.cfg, layer_windows=[w and w + 1 for w in ours.cfg.layer_windows])
    with torch.no_grad():
        assert (ours(ids)[0] - theirs).abs().max() > 0.1


# -- greedy decoding with the KV cache -------------------------------------------------------
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_greedy_generation_matches_transformers(tmp_path, family):
    ref = gemma2() if family == "gemma2" else gemma3()
    ref.generation_config.eos_token_id = None  # 24 tokens every time
    ours = load_hf_model(_save(ref, tmp_path))
    prompts = [[2, 17, 99, 5], [2, 40, 41, 42, 43, 44, 45, 46, 47, 48, 3], [2, 120]]
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = ref.generate(ids, do_sample=False, max_new_tokens=24, pad_token_id=0)[0, len(prompt):].tolist()
            cache, x, got = ours.new_cache(), ids, []
            for _ in range(24):
                nxt = int(ours(x, cache=cache, last_only=True)[0, -1].argmax())
                got.append(nxt)
                x = torch.tensor([[nxt]])
        assert len(prompt) + 24 > 2 * WINDOW and got == want, (prompt, got, want)


# -- chat templates ----------------------------------------------------------------------------
# google/gemma-2-2b-it's tokenizer_config.json chat_template
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# google/gemma-3-1b-it's chat_template (system prompt folded into the first user turn)
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
CHATS = [
    [{"role": "user", "content": "  Hi there!  "}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "und 3+3?"}],
]
SYSTEM_CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi!"}]


def _gemma_tokenizer_dir(path, template: str):
    """A tiny word-level ``tokenizers`` tokenizer with Gemma's special tokens, saved by transformers."""
    from tokenizers import AddedToken, Tokenizer as HFTok, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "model", "user", "Hi", "there", "!", "2+2", "?", "4", "und", "3+3",
             "Be", "terse", "."]
    tk = HFTok(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>", chat_template=template)
    fast.save_pretrained(path)
    return path


@pytest.mark.parametrize("template", [GEMMA2_TEMPLATE, GEMMA3_TEMPLATE], ids=["gemma2", "gemma3"])
def test_chat_template_matches_transformers(tmp_path, template):
    path = _gemma_tokenizer_dir(tmp_path, template)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    ours = Tokenizer.from_dir(path)
    assert ours.chat_template == template and ours.bos_token == "<bos>"
    chats = CHATS + ([SYSTEM_CHAT] if template is GEMMA3_TEMPLATE else [])
    for msgs in chats:
        for gen in (True, False):
            want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            got = render_chat(ours.chat_template, msgs, add_generation_prompt=gen, bos_token=ours.bos_token)
            assert got == want
            assert ours.encode(got, add_special_tokens=False) == ref(want, add_special_tokens=False)["input_ids"]
    assert got.startswith("<bos><start_of_turn>user\n")
    assert "<start_of_turn>model\n4<end_of_turn>\n" in render_chat(ours.chat_template, CHATS[1], bos_token="<bos>")
    # the templates' own refusals surface as ChatTemplateError
    with pytest.raises(ChatTemplateError, match="alternate"):
        render_chat(ours.chat_template, CHATS[1][:2] + CHATS[1][1:2], bos_token="<bos>")
    if template is GEMMA2_TEMPLATE:
        with pytest.raises(ChatTemplateError, match="System role not supported"):
            render_chat(ours.chat_template, SYSTEM_CHAT, bos_token="<bos>")
    else:
        assert render_chat(ours.chat_template, SYSTEM_CHAT, bos_token="<bos>").startswith(
            "<bos><start_of_turn>user\nBe terse.\n\nHi!<end_of_turn>\n")
