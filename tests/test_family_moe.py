"""The mixtures of experts — Mixtral, Qwen3-MoE, OLMoE (attnkit.models.moe, attnkit.nn.moe.SparseMoE).

Tiny random checkpoints made and saved by transformers, loaded by attnkit and compared logit by logit; the
same models written as GGUF files the way llama.cpp's converter writes them (experts stacked in 3-D tensors,
Mixtral as a ``llama`` file with Q/K permuted), dequantized and with the file's quantized expert blocks kept
(``quantize="gguf"``). Weights are drawn with a large standard deviation so that the router's choices are
decisive and a wrong mapping cannot hide; each comparison has a negative control that must fail.
"""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.loading.errors import UnsupportedModelError  # noqa: E402
from attnkit.loading.gguf import load_gguf_model  # noqa: E402
from attnkit.loading.gguf_file import GGUFFile  # noqa: E402
from attnkit.loading.hf import load_hf_model  # noqa: E402
from attnkit.models import registry  # noqa: E402
from attnkit.nn.moe import SparseMoE  # noqa: E402
from test_models_families import _randomize  # noqa: E402 (weights drawn wide: a wrong mapping shows)

Q = gguf.GGMLQuantizationType
TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
CONFIGS = {  # model_type → (transformers classes, config keywords)
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  dict(intermediate_size=96, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig",
              dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                   pad_token_id=0, eos_token_id=1)),
}
GGUF_ARCH = {"mixtral": "llama", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def hf_model(model_type: str, seed: int = 0, **kw):
    model_cls, cfg_cls, extra = CONFIGS[model_type]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra, **kw})
    return _randomize(getattr(transformers, model_cls)(cfg), seed=seed)


def _ids(B: int = 2, T: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def _moes(model) -> list[SparseMoE]:
    return [layer.ffn for layer in model.layers]


# -- Hugging Face checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_hf_parity_and_router_normalisation(tmp_path, model_type):
    ref = hf_model(model_type)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    cfg = ours.cfg
    assert cfg.extra["family"] == model_type and registry.by_hf_type(model_type).name == model_type
    assert (cfg.n_experts, cfg.n_experts_per_tok) == ({"mixtral": 4, "qwen3_moe": 8, "olmoe": 4}[model_type], 2)
    assert cfg.norm_topk_prob == (model_type != "olmoe")
    assert cfg.qk_norm == {"mixtral": None, "qwen3_moe": "head", "olmoe": "full"}[model_type]
    moe = ours.layers[0].ffn
    assert isinstance(moe, SparseMoE) and moe.top_k == 2 and type(moe.router) is torch.nn.Linear
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        assert want.abs().max() > 1.0
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        for m in _moes(ours):  # negative control: the other normalisation of the top-k weights differs
            m.norm_topk_prob = not m.norm_topk_prob
        assert (ours(ids) - want).abs().max() > 1e-2


def test_mixtral_sliding_window_and_kv_cache(tmp_path):
    ref = hf_model("mixtral", sliding_window=6)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    assert ours.cfg.sliding_window == 6
    ids = _ids(B=1, T=20)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        cache = ours.new_cache()  # prefill then one token at a time: each step routes its own token
        steps = [ours(ids[:, :7], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), want, atol=TOL, rtol=0)
        ours.cfg.sliding_window = None  # negative control: the window matters
        assert (ours(ids) - want).abs().max() > 1e-2


def test_bfloat16_model_runs_close_to_float32(tmp_path):
    ref = hf_model("mixtral")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path, dtype=torch.bfloat16)
    assert ours.layers[0].ffn.router.weight.dtype == torch.bfloat16
    ids = _ids()
    with torch.no_grad():
        got, want = ours(ids).float(), ref(ids).logits
    assert _relative_error(got, want) < 0.05 and (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny checkpoint of each family (read-only: tests copy its config)."""
    out = {}
    for mt in CONFIGS:
        d = tmp_path_factory.mktemp(mt)
        hf_model(mt).save_pretrained(d, safe_serialization=True)
        out[mt] = d
    return out


@pytest.mark.parametrize("model_type, change, words", [
    ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "shared experts"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("mixtral", {"num_experts_per_tok": 5}, "5 experts per token"),
    ("mixtral", {"num_local_experts": None}, "number of experts"),
])
def test_hf_unsupported_configs_are_refused(tmp_path, saved, model_type, change, words):
    for f in saved[model_type].iterdir():
        (tmp_path / f.name).symlink_to(f)
    c = json.loads((saved[model_type] / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**c, **change}))
    with pytest.raises(UnsupportedModelError, match=words):
        load_hf_model(tmp_path)
    load_hf_model(saved[model_type])  # control: the unchanged checkpoint loads


# -- the layer itself -------------------------------------------------------------------------
def _moe(seed: int = 0, **kw) -> SparseMoE:
    torch.manual_seed(seed)
    m = SparseMoE(32, **{"n_experts": 8, "top_k": 2, "d_ff": 48, **kw}).eval()
    with torch.no_grad():
        m.router.weight.mul_(4)  # decisive routing, no near-ties
    return m


def test_forward_equals_per_token_sum_over_chosen_experts():
    m, x = _moe(), torch.randn(3, 7, 32)
    with torch.no_grad():
        got = m(x)
        flat = x.reshape(-1, 32)
        p = torch.softmax(flat @ m.router.weight.T, -1)
        want = torch.zeros_like(flat)
        for i in range(len(flat)):  # the definition, token by token
            w, e = p[i].topk(2)
            w = w / w.sum()
            want[i] = sum(w[j] * m.experts[int(e[j])](flat[i]) for j in range(2))
        torch.testing.assert_close(got, want.view_as(x), atol=1e-5, rtol=1e-5)
        m.norm_topk_prob = False  # negative control
        assert (m(x) - got).abs().max() > 1e-3


def test_one_token_path_is_the_grouped_path_bit_for_bit():
    m = _moe()
    with torch.no_grad():
        for i in range(6):
            x = torch.randn(1, 32, generator=torch.Generator().manual_seed(i))
            chosen, w = m.route(x)
            assert torch.equal(m._one(x, chosen, w), m._grouped(x, chosen, w))
            assert torch.equal(m(x[None]), m._grouped(x, chosen, w)[None])
        wrong = chosen.flip(-1)  # control: each weight on the other expert
        assert (m._one(x, chosen, w) - m._one(x, wrong, w)).abs().max() > 1e-3


def test_only_the_chosen_experts_run():
    m, x = _moe(), torch.randn(1, 3, 32)  # 3 tokens × top-2 of 8: at least 2 experts unchosen
    calls = []
    for e, ex in enumerate(m.experts):
        ex.register_forward_hook(lambda mod, inp, out, e=e: calls.append((e, inp[0].shape[0])))
    with torch.no_grad():
        chosen, _ = m.route(x.reshape(-1, 32))
        y = m(x)
        used = sorted(set(chosen.flatten().tolist()))
        # each chosen expert runs once, on all of its tokens together; no other expert runs
        assert sorted(e for e, _ in calls) == used
        assert sum(n for _, n in calls) == 3 * 2
        unused = next(e for e in range(8) if e not in used)
        for p in m.experts[unused].parameters():
            p.zero_()
        assert torch.equal(m(x), y)  # an unchosen expert's weights are never read
        for p in m.experts[int(chosen[0, 0])].parameters():  # token 0's first choice
            p.zero_()
        assert (m(x) - y).abs().max() > 1e-3  # a chosen one's are


# -- GGUF ------------------------------------------------------------------------------------
def _encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """GGUF data of a 2-D or stacked 3-D weight: gguf-py's quantizer, or random valid K-quant blocks (gguf-py
    cannot quantize K-quants; the reference is their dequantisation either way)."""
    if qtype == "F32":
        return w.astype(np.float32)
    if qtype == "Q4_K":
        block, size = gguf.constants.GGML_QUANT_SIZES[Q.Q4_K]
        b = rng.integers(0, 256, (*w.shape[:-1], w.shape[-1] // block, size), dtype=np.uint8)
        # w = d·sc·q − dmin·m with 6-bit sc, m and 4-bit q: dmin = 7.5·d centres the weights on zero
        b[..., 0:2] = np.full(1, 1e-3, dtype=np.float16).view(np.uint8)  # d
        b[..., 2:4] = np.full(1, 7.5e-3, dtype=np.float16).view(np.uint8)  # dmin
        return b.reshape(*w.shape[:-1], -1)
    return gguf.quants.quantize(w.astype(np.float32), Q[qtype])


def _decode(data: np.ndarray, qtype: str, shape) -> np.ndarray:
    return (data if qtype == "F32" else gguf.quants.dequantize(data, Q[qtype])).reshape(shape)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # convert_hf_to_gguf.py LlamaModel.permute (rows)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
          "mlp.gate.weight": "ffn_gate_inp.weight"}


def write_moe_gguf(path, ref, expert_type: str = "F32", skip=(), meta=None):
    """``ref`` (a transformers MoE) as llama.cpp's converter writes it — experts stacked per layer into
    ffn_{gate,up,down}_exps (E, ff, d) / (E, d, ff), the router ffn_gate_inp in F32, Q/K permuted for llama —
    with the expert tensors in ``expert_type``; ``ref`` then holds the values the file holds."""
    c, mt = ref.config, ref.config.model_type
    arch, rng = GGUF_ARCH[mt], np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    n_exp = getattr(c, "num_local_experts", None) or c.num_experts
    kv = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
          "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
          "head_count": c.num_attention_heads, "head_count_kv": c.num_key_value_heads,
          "rope_freq_base": float(c.rope_parameters["rope_theta"]), "layer_norm_rms_eps": c.rms_norm_eps,
          "vocab_size": c.vocab_size, "expert_count": n_exp, "expert_used_count": c.num_experts_per_tok}
    if mt == "qwen3_moe":
        kv["expert_feed_forward_length"] = c.moe_intermediate_size
    kv.update(meta or {})
    for k, v in kv.items():
        getattr(w, f"add_{k}")(v)

    def add(name, p: torch.Tensor, qtype="F32", heads=None):
        arr = p.detach().numpy().astype(np.float32)
        data = _encode(arr, qtype, rng)
        with torch.no_grad():
            p.copy_(torch.from_numpy(_decode(data, qtype, arr.shape)))  # the reference sees what GGUF holds
        if heads is not None:
            data = _permute(data, heads)
        if name not in skip:
            w.add_tensor(name, data, raw_dtype=None if qtype == "F32" else Q[qtype])

    m = ref.model
    add("token_embd.weight", m.embed_tokens.weight)
    add("output_norm.weight", m.norm.weight)
    add("output.weight", ref.lm_head.weight)
    for i, layer in enumerate(m.layers):
        for hf, ours in _NAMES.items():
            p = layer.get_parameter(hf) if hf in dict(layer.named_parameters()) else None
            if p is not None:
                heads = None
                if arch == "llama" and ours in ("attn_q.weight", "attn_k.weight"):
                    heads = c.num_attention_heads if ours == "attn_q.weight" else c.num_key_value_heads
                add(f"blk.{i}.{ours}", p, heads=heads)
        ex = layer.mlp.experts
        ff = ex.down_proj.shape[-1]
        add(f"blk.{i}.ffn_gate_exps.weight", ex.gate_up_proj[:, :ff], expert_type)  # views: written back in place
        add(f"blk.{i}.ffn_up_exps.weight", ex.gate_up_proj[:, ff:], expert_type)
        add(f"blk.{i}.ffn_down_exps.weight", ex.down_proj, expert_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("model_type", list(CONFIGS))
def test_gguf_f32_parity(tmp_path, model_type):
    ref = hf_model(model_type)
    path = write_moe_gguf(tmp_path / "m.gguf", ref)
    g = GGUFFile(path)
    assert g.metadata["general.architecture"] == GGUF_ARCH[model_type]
    assert g.tensors["blk.0.ffn_down_exps.weight"].shape == tuple(ref.model.layers[0].mlp.experts.down_proj.shape)
    ours = load_gguf_model(path, g=g)
    assert ours.cfg.extra["family"] == model_type  # a llama file with experts is a Mixtral
    assert ours.cfg.norm_topk_prob == (model_type != "olmoe")
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        assert want.abs().max() > 1.0
        torch.testing.assert_close(ours(ids), want, atol=TOL, rtol=0)
        _reverse_experts(ours)  # negative control: the experts in the wrong order
        assert (ours(ids) - want).abs().max() > 1e-2


def _reverse_experts(model) -> None:
    for m in _moes(model):
        m.experts = torch.nn.ModuleList(reversed(list(m.experts)))


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The median over positions of the largest logit error relative to the largest logit. A median, not a
    maximum: 8-bit activations (the integer kernels) may flip a near-tie between two experts at a position,
    which is the quantized model's own behaviour, not an error of the loader."""
    return float(((got - want).abs().amax(-1) / want.abs().max()).median())


def _check_quantized(path, ref, expert_type: str, tol: float) -> None:
    """quantize=None: exactly the file's values; quantize="gguf": every expert a GGUFBlockLinear over its own
    slice of the file's blocks (no float copy), close to the dequantized reference in prefill and decode,
    before and after fusion."""
    from attnkit.nn.fused import fuse_for_inference
    from attnkit.quant.native import GGUFBlockLinear

    g = GGUFFile(path)
    ids = _ids(B=1, T=24)
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(load_gguf_model(path, g=g)(ids), want, atol=TOL, rtol=0)
        model = load_gguf_model(path, quantize="gguf")
        moe = model.layers[0].ffn
        assert type(moe.router) is torch.nn.Linear and moe.router.weight.dtype == torch.float32  # F32 in the file
        held = 0
        for m in _moes(model):
            for ex in m.experts:
                for proj in (ex.gate_proj, ex.up_proj, ex.down_proj):
                    assert type(proj) is GGUFBlockLinear and proj.kind == expert_type
                    held += proj.blocks.numel()
        exps = sum(t.nbytes for n, t in g.tensors.items() if "_exps" in n)
        assert held == exps  # the file's blocks, each byte once
        assert not any("experts" in n for n, _ in model.named_parameters())  # no float copy of any expert
        assert _relative_error(model(ids), want) < tol  # prefill: experts with many rows take the dense product
        cache = model.new_cache()  # decode: one row at a time through the integer kernels
        steps = torch.cat([model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 24)], 1)
        assert _relative_error(steps, want) < tol
        assert (steps.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
        fuse_for_inference(model)
        ex = model.layers[0].ffn.experts[0]
        assert isinstance(ex.gate_up_proj, GGUFBlockLinear) and not hasattr(ex, "gate_proj")
        fused = model(ids)
        assert _relative_error(fused, want) < tol
        _reverse_experts(model)  # negative control: wrong experts are far outside the tolerance
        assert _relative_error(model(ids), want) > 5 * tol


def test_gguf_q8_0_experts(tmp_path):
    from attnkit.quant import Int8Linear

    ref = hf_model("qwen3_moe")
    path = write_moe_gguf(tmp_path / "q8.gguf", ref, "Q8_0")
    _check_quantized(path, ref, "Q8_0", tol=0.02)
    model = load_gguf_model(path, quantize="auto")  # the PyTorch scheme: Q8_0 experts → int8, router float
    moe = model.layers[1].ffn
    assert type(moe.router) is torch.nn.Linear and all(type(ex.down_proj) is Int8Linear for ex in moe.experts)
    ids = _ids(B=1, T=24)
    with torch.no_grad():
        assert _relative_error(model(ids).float(), ref(ids).logits) < 0.02


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_q4_experts_become_int4_exactly(tmp_path, qtype):
    """quantize="auto": each expert's slice of Q4_0 / Q4_1 blocks → Int4Linear codes and scales bit for bit."""
    from attnkit.quant import Int4Linear

    ref = hf_model("olmoe")
    path = write_moe_gguf(tmp_path / "q4.gguf", ref, qtype)
    model = load_gguf_model(path, quantize="auto", compute_dtype=torch.float32)
    assert all(type(ex.gate_proj) is Int4Linear for m in _moes(model) for ex in m.experts)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(model(ids), want, atol=TOL, rtol=0)
        _reverse_experts(model)  # negative control
        assert (model(ids) - want).abs().max() > 1e-2


def test_gguf_q4_k_experts(tmp_path):
    # K-quant super-blocks of 256: rows of 256 in every expert projection
    ref = hf_model("mixtral", hidden_size=256, intermediate_size=256)
    # tol above Q8_0's: the K-quants' products take one activation scale per 256 values (llama.cpp's q8_K)
    _check_quantized(write_moe_gguf(tmp_path / "q4k.gguf", ref, "Q4_K"), ref, "Q4_K", tol=0.03)


@pytest.mark.parametrize("skip, meta, words", [
    ({"blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate_inp.weight"}, None, "router"),
    (set(), {"expert_count": 8}, "expert_count=8"),
    (set(), {"expert_used_count": 9}, "9 experts per token"),
])
def test_gguf_broken_expert_files_are_refused(tmp_path, skip, meta, words):
    ref = hf_model("mixtral")
    path = write_moe_gguf(tmp_path / "bad.gguf", ref, skip=skip, meta=meta)
    with pytest.raises(UnsupportedModelError, match=words):
        load_gguf_model(path)


# -- generation ------------------------------------------------------------------------------
def test_greedy_tokens_match_transformers_generate(tmp_path):
    ref = hf_model("qwen3_moe")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0
    for i, n in enumerate((5, 11, 17)):
        prompt = _ids(B=1, T=n, seed=10 + i)
        with torch.no_grad():
            want = ref.generate(prompt, do_sample=False, max_new_tokens=24)[0, n:].tolist()
            cache, got = ours.new_cache(), []
            tok = ours(prompt, cache=cache)[0, -1].argmax()
            for _ in range(24):
                got.append(int(tok))
                tok = ours(tok.view(1, 1), cache=cache)[0, -1].argmax()
        assert len(want) == 24 and got == want


def test_engine_runs_moe_eagerly(tmp_path):
    """The inference engine (paged KV, prompts and decode rows packed in one batch) on a mixture of experts:
    the same greedy tokens as the model's own cache loop, every sequence routed token by token."""
    from engine_helpers import GREEDY, greedy_reference, make_llm

    ref = hf_model("olmoe")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    prompts = [_ids(B=1, T=n, seed=20 + n)[0].tolist() for n in (3, 9, 14)]
    outs = make_llm(ours, block_size=4).generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_reference(ours, prompt, GREEDY.max_tokens)


def test_lora_on_the_attention_of_a_moe_model(tmp_path):
    """LoRA (the default q/v targets) trains on a mixture of experts: gradients reach the adapters through the
    router's top-k and the grouped experts; the experts and router stay frozen."""
    from attnkit.peft import LoraConfig, get_peft_model

    ref = hf_model("qwen3_moe")
    ref.save_pretrained(tmp_path, safe_serialization=True)
    peft = get_peft_model(load_hf_model(tmp_path), LoraConfig(r=4))
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    ids = _ids(B=1, T=12)
    before = peft(ids).detach()
    peft(ids).logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()) and any(g.abs().max() > 0 for g in grads.values())
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        assert (peft(ids) - before).abs().max() > 1e-3  # the adapters act
