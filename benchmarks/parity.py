"""Numerical parity of the embedded defaults with the reference implementations, printed as numbers.

SmolLM2-135M-Instruct (GGUF Q4_1): attnkit's float32 logits vs HF transformers loading the same file
(`gguf_file=`), over a 64-token prompt, plus greedy agreement over 64 new tokens.
all-MiniLM-L6-v2: attnkit's sentence embeddings vs sentence-transformers.
The tests (tests/test_loading_default.py) assert the tolerances; this script reports the values.

    python benchmarks/parity.py
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

TEXT = ("The Transformer is a neural network architecture based solely on attention mechanisms, dispensing with "
        "recurrence and convolutions entirely. Experiments on two machine translation tasks show these models to "
        "be superior in quality while being more parallelizable and requiring significantly less time to train. "
        "Since then it has replaced recurrent networks in language modelling, speech recognition and vision, and "
        "it is the basis of today's large language models. In this note")
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "日本語のテキスト 😀", "long " * 400]


def main() -> int:
    import sentence_transformers
    import transformers

    from attnkit.loading import defaults, load_causal_lm, load_sentence_encoder

    lm = load_causal_lm()
    path = defaults.default_chat_model()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    ids = torch.tensor([lm.tokenizer.encode(TEXT)[:64]])
    with torch.no_grad():
        logits_diff = (lm.model(ids) - ref(ids).logits).abs().max().item()
        ours, theirs = ids, ids
        for _ in range(64):  # greedy, full recompute: the simplest possible reference loop on both sides
            ours = torch.cat([ours, lm.model(ours)[:, -1:].argmax(-1)], 1)
            theirs = torch.cat([theirs, ref(theirs).logits[:, -1:].argmax(-1)], 1)
    n = ids.shape[1]
    agree = int((ours[0, n:] == theirs[0, n:]).cumprod(0).sum())

    st = sentence_transformers.SentenceTransformer(str(defaults.default_embedding_model()), device="cpu")
    emb_diff = (load_sentence_encoder().embed(SENTENCES) - st.encode(SENTENCES, convert_to_tensor=True)).abs().max().item()

    result = {"smollm2_logits_max_abs_diff": logits_diff, "smollm2_prompt_tokens": int(ids.shape[1]),
              "smollm2_greedy_tokens_identical_prefix": agree, "minilm_embedding_max_abs_diff": emb_diff}
    print("| check | value |\n|---|---|")
    print(f"| SmolLM2 Q4_1 logits, max abs diff over {ids.shape[1]} tokens | {logits_diff:.2e} |")
    print(f"| SmolLM2 greedy: identical leading tokens of 64 | {agree} |")
    print(f"| MiniLM embeddings, max abs diff ({len(SENTENCES)} sentences) | {emb_diff:.2e} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
