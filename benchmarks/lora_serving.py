"""Serving several LoRA adapters at once on the default model: attnkit's engine against HF PEFT's
mixed-adapter batches (``generate(..., adapter_names=[...])``), same adapters, same requests, same run.

Four random rank-8 LoRA adapters on every projection of SmolLM2-135M (q, k, v, o, gate, up, down) are
saved in PEFT's format once; every request names one of them (round-robin), greedy with ignore_eos.

- attnkit, base only: the engine with no adapter (the cost floor);
- attnkit, 4 adapters mixed: each step batches requests for all four (weights: the GGUF's blocks, the default);
- attnkit float32, 4 adapters mixed: float32 weights, as HF's;
- HF PEFT, 4 adapters mixed: transformers + peft, batches of ``--hf-batch`` padded on the left, each row
  with its own adapter.

For the two float32 runs the report also gives the share of requests whose greedy tokens agree exactly.
Prints a table and the JSON (``--json FILE`` also writes it).

    python benchmarks/lora_serving.py [--requests 32] [--threads 2] [--hf-batch 16] [--json FILE]
    attnkit bench lora_serving -- --requests 16
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402

ADAPTERS = ["a0", "a1", "a2", "a3"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(root: Path) -> dict[str, Path]:
    from attnkit.loading import load_causal_lm
    from attnkit.peft import LoraConfig, get_peft_model

    out = {}
    for k, name in enumerate(ADAPTERS):
        peft = get_peft_model(load_causal_lm(None).model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in peft.adapter_parameters("default").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        out[name] = peft.save_pretrained(root / name)
    return out


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int, str]]:
    rng = random.Random(seed)
    return [([rng.randrange(1000, 40000) for _ in range(rng.randint(64, 192))], 64, ADAPTERS[i % len(ADAPTERS)])
            for i in range(n)]


def run_attnkit(reqs, dirs: dict[str, Path] | None, **llm_kw) -> tuple[dict, list[list[int]]]:
    from attnkit import LLM, SamplingParams

    llm = LLM(**llm_kw)
    for name, d in (dirs or {}).items():
        llm.load_lora(name, d)
    loras = [a if dirs else None for _, _, a in reqs]
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), lora=loras[0])  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n, _ in reqs]
    t = time.perf_counter()
    outs = llm.generate([p for p, _, _ in reqs], params, lora=loras)
    dt = time.perf_counter() - t
    return {"s": dt, "out_tok_s": sum(n for _, n, _ in reqs) / dt, "steps": llm.engine.num_steps}, \
        [o.outputs[0].token_ids for o in outs]


def run_hf_peft(reqs, dirs: dict[str, Path], batch: int) -> tuple[dict, list[list[int]]]:
    import transformers
    from peft import PeftModel

    from attnkit.loading.defaults import default_chat_model

    p = default_chat_model()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(dirs[ADAPTERS[0]]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.load_adapter(str(dirs[name]), adapter_name=name)
    model.eval()
    pad = base.config.eos_token_id if base.config.pad_token_id is None else base.config.pad_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def gen(chunk) -> list[list[int]]:
        width = max(len(q) for q, _, _ in chunk)
        ids = torch.tensor([[pad] * (width - len(q)) + q for q, _, _ in chunk])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q, _, _ in chunk])
        new = max(n for _, n, _ in chunk)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad, adapter_names=[a for _, _, a in chunk])
        return [row[width:width + n].tolist() for row, (_, n, _) in zip(out, chunk)]

    gen(reqs[:2])  # warm-up
    t = time.perf_counter()
    tokens = [t for i in range(0, len(reqs), batch) for t in gen(reqs[i:i + batch])]
    dt = time.perf_counter() - t
    return {"s": dt, "out_tok_s": sum(n for _, n, _ in reqs) / dt, "batch": batch}, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true", help="skip HF PEFT")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reqs = workload(args.requests)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        print("making 4 adapters …", file=sys.stderr, flush=True)
        dirs = make_adapters(Path(tmp))
        runs = [("attnkit base only", None, {}), ("attnkit 4 adapters mixed", dirs, {}),
                ("attnkit float32 4 adapters mixed", dirs, {"quantize": None})]
        tokens = {}
        for name, d, kw in runs:
            print(f"{name} …", file=sys.stderr, flush=True)
            results[name], tokens[name] = run_attnkit(reqs, d, **kw)
        if not args.no_hf:
            print("HF PEFT 4 adapters mixed …", file=sys.stderr, flush=True)
            results["HF PEFT 4 adapters mixed"], tokens["hf"] = run_hf_peft(reqs, dirs, args.hf_batch)
            same = sum(a == b for a, b in zip(tokens["attnkit float32 4 adapters mixed"], tokens["hf"]))
            results["HF PEFT 4 adapters mixed"]["greedy_agreement_with_attnkit_float32"] = same / len(reqs)
    print("| system | seconds | out tok/s |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['s']:.1f} | {r['out_tok_s']:.1f} |")
    report = {"results": results,
              "workload": {"requests": len(reqs), "input_tokens": sum(len(p) for p, _, _ in reqs),
                           "output_tokens": sum(n for _, n, _ in reqs), "adapters": len(ADAPTERS), "rank": 8,
                           "targets": TARGETS},
              "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}}
    hf = results.get("HF PEFT 4 adapters mixed")
    if hf:
        report["ratio_vs_hf_peft"] = {k: r["out_tok_s"] / hf["out_tok_s"] for k, r in results.items() if k.startswith("attnkit")}
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
