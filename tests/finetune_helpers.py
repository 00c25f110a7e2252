"""A tiny chat model for the trainer tests: random Llama, word-level tokenizer, ChatML-like template."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, pre_tokenizers

from attnkit.loading import CausalLM
from attnkit.models.llama import Llama, LlamaConfig
from attnkit.text.tokenizer import Tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
WORDS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "yes", "no", "is", "it", "red",
         "blue", "green", "sky", "grass", "fire", "colour", "?", "the", "of", "what"] + [f"w{i}" for i in range(42)]


def tiny_tokenizer() -> Tokenizer:
    tk = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "<|im_start|>", "<|im_end|>")])
    return Tokenizer(tk, bos_token="<s>", eos_tokens=["<|im_end|>"], pad_token="<pad>", chat_template=TEMPLATE)


def tiny_lm(seed: int = 0, tmp: Path | None = None, n_layers: int = 2) -> CausalLM:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=len(WORDS), d_model=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=64,
                              max_seq_len=128, tie_embeddings=True)).eval()
    return CausalLM(model, tiny_tokenizer(), tmp or Path("tiny"))


QA = [("what colour is the sky ?", "blue"), ("what colour is the grass ?", "green"), ("what colour is fire ?", "red")]


def chat_rows(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (QA * n)[:n]]


def lora_llama(seed: int = 0):
    """An all-linear LoRA (r 4) over a tiny random Llama of 96 tokens, its B's drawn so that the adapter matters."""
    from attnkit.peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    model = get_peft_model(Llama(cfg), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return model
