"""Qwen3 against transformers: tiny random checkpoints (q/k RMSNorm per head, head_dim ≠ d_model / n_heads),
from safetensors and from GGUF written as llama.cpp's converter writes ``qwen3``; the engine's greedy tokens
against transformers' generate; the chat template against apply_chat_template."""

from __future__ import annotations

import json
import os

import gguf
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from attnkit.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from attnkit.loading import load_causal_lm  # noqa: E402
from attnkit.loading.errors import UnsupportedModelError  # noqa: E402
from attnkit.loading.gguf import load_gguf_model  # noqa: E402
from attnkit.loading.hf import load_hf_model  # noqa: E402

from test_loading_gguf import GGUF_NAMES, dequant, encode  # noqa: E402

TOL = 1e-4
VOCAB = 128
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))


def tiny_qwen3(tied: bool = False, seed: int = 0, **kw):
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                                   tie_word_embeddings=tied, rms_norm_eps=1e-6, **kw)
    model = transformers.Qwen3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if "norm" in name else 0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_hf_parity_qk_norm(tmp_path, tied):
    ref = tiny_qwen3(tied)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    assert ours.cfg.qk_norm == "head" and ours.cfg.hd == 32 and ours.cfg.tie_embeddings == tied
    with torch.no_grad():
        want = ref(IDS).logits
        assert want.abs().max() > 1.0
        torch.testing.assert_close(ours(IDS), want, atol=TOL, rtol=0)
        ours.layers[0].self_attn.q_norm.weight.fill_(1.0)  # negative control: the q norm's weights matter
        assert (ours(IDS) - want).abs().max() > 1e-2


def test_sliding_window_checkpoint_is_refused(tmp_path):
    ref = tiny_qwen3(use_sliding_window=True, sliding_window=8)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        load_hf_model(tmp_path)


def _gguf_name(hf: str) -> str:
    names = {**GGUF_NAMES, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    if hf in names:
        return names[hf]
    _, _, layer, rest = hf.split(".", 3)
    key = next(k for k in names if rest == k or rest.startswith(k + "."))
    return f"blk.{layer}.{names[key]}{rest[len(key):]}"


def write_qwen3_gguf(path, model, qtype: str = "F32"):
    """As convert_hf_to_gguf.py's Qwen3Model (a Qwen2Model: no Q/K row permutation; head_dim as key_length)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            arr = p.numpy().astype(np.float32)
            t = qtype if arr.ndim == 2 else "F32"
            data = encode(arr, t, rng) if t != "F32" else arr
            p.copy_(torch.from_numpy(dequant(data, t).reshape(arr.shape)))  # the reference holds what the file holds
            w.add_tensor(_gguf_name(name), data, raw_dtype=None if t == "F32" else gguf.GGMLQuantizationType[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype,quantize,tol", [("F32", None, TOL), ("Q8_0", None, TOL), ("Q8_0", "gguf", 1e-3)])
def test_gguf_parity(tmp_path, qtype, quantize, tol):
    ref = tiny_qwen3()
    path = write_qwen3_gguf(tmp_path / f"q3-{qtype}.gguf", ref, qtype)
    ours = load_gguf_model(path, quantize=quantize)
    assert ours.cfg.qk_norm == "head" and ours.cfg.extra["family"] == "qwen3"
    with torch.no_grad():
        want = ref(IDS).logits
        got = ours(IDS)
        torch.testing.assert_close(got, want, atol=tol, rtol=0)  # prompt rows: the blocks decoded, dense product
        # (transformers' own GGUF reader cannot check this file: it ignores qwen3's key_length and wants a tokenizer)


def test_engine_greedy_equals_transformers_generate(tmp_path):
    ref = tiny_qwen3(seed=1)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_model(tmp_path)
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 11, 17)]
    llm = LLM.from_model(ours, None, EngineConfig(block_size=4, max_num_batched_tokens=8), eos_ids=set())
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == want


# Qwen3's chat template (tokenizer_config.json of Qwen/Qwen3-0.6B), without its tool-calling branches
QWEN3_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n    {%- set index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- if ns.multi_step_tool and message.role == \"user\" and message.content is string and not"
    "(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n"
    "        {%- set ns.multi_step_tool = false %}\n        {%- set ns.last_query_index = index %}\n    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n        {%- set content = message.content %}\n    {%- else %}\n"
    "        {%- set content = '' %}\n    {%- endif %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {%- set reasoning_content = '' %}\n"
    "        {%- if message.reasoning_content is string %}\n"
    "            {%- set reasoning_content = message.reasoning_content %}\n        {%- else %}\n"
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n            {%- endif %}\n"
    "        {%- endif %}\n"
    "        {%- if loop.index0 > ns.last_query_index %}\n"
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n"
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    "            {%- else %}\n                {{- '<|im_start|>' + message.role + '\\n' + content }}\n            {%- endif %}\n"
    "        {%- else %}\n            {{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n{%- endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}, {"role": "user", "content": "Und auf Deutsch?"}],
]


def _tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<think>": 3, "</think>": 4,
             **{chr(c): 5 + i for i, c in enumerate(range(ord("a"), ord("z") + 1))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                additional_special_tokens=["<|im_start|>", "<think>", "</think>"])
    fast.chat_template = QWEN3_TEMPLATE
    fast.save_pretrained(tmp_path)
    return fast


@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("thinking", [None, False])
def test_chat_template_renders_as_transformers(tmp_path, conv, thinking):
    ref_tok = _tokenizer_dir(tmp_path)
    tiny_qwen3(tied=True).save_pretrained(tmp_path, safe_serialization=True)
    lm = load_causal_lm(tmp_path)
    from attnkit.text.chat_template import render_chat

    extra = {} if thinking is None else {"enable_thinking": thinking}
    msgs = CONVERSATIONS[conv]
    want = ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **extra)
    got = render_chat(lm.tokenizer.chat_template, msgs, add_generation_prompt=True, **extra)
    assert got == want and "<|im_start|>assistant\n" in got
    assert lm.tokenizer.encode(got, add_special_tokens=False) == ref_tok.encode(want, add_special_tokens=False)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen3"
