"""KV memory of a long conversation on sliding-window models: blocks behind the window freed vs kept.

Two KV layouts of real models, with tiny widths (the KV cache's size depends only on the layers, KV heads, head
dim and windows): Gemma-3-1B (26 layers, 5 local : 1 global, window 512, 1 KV head of 256) and a Mistral-style
model (all 32 layers windowed, 8 KV heads of 128; window 512 here, 4096 in Mistral-7B-v0.1). One request: a
``--prompt``-token prompt, then ``--tokens`` generated. Every ``--every`` tokens the KV bytes in use are read from
the block managers (blocks in use × block bytes of the group's layers), for ``EngineConfig(free_window_kv=True)``
(the default: windowed layers free the blocks their window has passed) and ``False`` (every block kept, as
before). Also the decode time per token of each, and whether their greedy tokens agree. No peer runs here:
llama.cpp's own SWA cache (``--swa-full`` off) frees in the same way; this measures attnkit against itself.

    python benchmarks/window_kv.py [--prompt 1024] [--tokens 1536] [--every 256] [--json FILE]
    attnkit bench window_kv
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402

LAYOUTS = {
    "gemma-3-1b": dict(n_layers=26, n_heads=4, n_kv_heads=1, head_dim=256, window=512, local_per_global=5),
    "mistral-style": dict(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, window=512, local_per_global=None),
}


def model_of(layout: dict):
    import torch

    from attnkit.models.llama import Llama, LlamaConfig

    L, w, k = layout["n_layers"], layout["window"], layout["local_per_global"]
    windows = [None if k is not None and (i + 1) % (k + 1) == 0 else w for i in range(L)]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, d_model=64, n_layers=L, n_heads=layout["n_heads"], n_kv_heads=layout["n_kv_heads"],
                      head_dim=layout["head_dim"], d_ff=128, max_seq_len=8192, layer_windows=windows)
    return Llama(cfg).eval()


def kv_bytes(engine) -> int:
    """K and V bytes held by the blocks in use, over all groups."""
    runner = engine.runner
    per_slot = 2 * runner.k_pool.shape[1] * runner.k_pool.shape[-1] * runner.k_pool.dtype.itemsize  # K+V, one layer
    total = 0
    for g, m in enumerate(engine.block_manager.managers):
        layers = sum(1 for lg in runner.group_of if lg == g)
        total += (m.num_blocks - m.num_free) * m.block_size * per_slot * layers
    return total


def run(layout: dict, free: bool, prompt_len: int, tokens: int, every: int) -> dict:
    import torch

    from attnkit.engine import LLMEngine, EngineConfig, SamplingParams

    model = model_of(layout)
    engine = LLMEngine(model, None, EngineConfig(block_size=16, num_blocks=(prompt_len + tokens) // 16 + 8,
                                                 free_window_kv=free), eos_ids=set())
    prompt = torch.randint(0, 256, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True), request_id="r")
    curve, out, t_decode, n_decode = [], None, 0.0, 0
    while engine.has_unfinished_requests():
        seq = engine.scheduler.running[0] if engine.scheduler.running else None
        decoding = seq is not None and not seq.in_prefill
        t = time.perf_counter()
        outs = engine.step()
        if decoding:
            t_decode += time.perf_counter() - t
            n_decode += 1
        seq = engine.scheduler.running[0] if engine.scheduler.running else None
        if seq is not None and seq.num_computed >= prompt_len and (seq.num_computed - prompt_len) % every == 0:
            curve.append({"context": seq.num_computed, "kv_bytes": kv_bytes(engine)})
        out = outs[-1] if outs else out
    return {"kv_curve": curve, "peak_kv_bytes": max(c["kv_bytes"] for c in curve),
            "decode_ms_per_token": 1e3 * t_decode / max(n_decode, 1), "tokens": out.outputs[0].token_ids}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--every", type=int, default=256)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    report = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
              "prompt": args.prompt, "generated": args.tokens, "layouts": {}}
    print(f"{'layout':<15}{'context':>9}{'kept MiB':>10}{'freed MiB':>11}")
    for name in args.layouts.split(","):
        layout = LAYOUTS[name]
        keep, free = (run(layout, f, args.prompt, args.tokens, args.every) for f in (False, True))
        for a, b in zip(keep["kv_curve"], free["kv_curve"]):
            print(f"{name:<15}{a['context']:>9}{a['kv_bytes'] / 2**20:>10.1f}{b['kv_bytes'] / 2**20:>11.1f}")
        report["layouts"][name] = {
            **layout, "kept": {k: v for k, v in keep.items() if k != "tokens"},
            "freed": {k: v for k, v in free.items() if k != "tokens"},
            "peak_ratio_freed_over_kept": free["peak_kv_bytes"] / keep["peak_kv_bytes"],
            "same_tokens": keep["tokens"] == free["tokens"]}
        r = report["layouts"][name]
        print(f"{name}: peak KV freed/kept {r['peak_ratio_freed_over_kept']:.2f}, same tokens: {r['same_tokens']}, "
              f"decode ms/token kept {keep['decode_ms_per_token']:.1f}, freed {free['decode_ms_per_token']:.1f}")
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
