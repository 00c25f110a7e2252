"""Single-stream decode speed, attnkit against llama.cpp, interleaved in one process.

The engine benchmark measures each system once, in turn, in its own process; on a shared 2-core machine
one sample can be off by 15%. Here both run the same greedy generation (``--tokens`` new tokens after a
``--prompt``-token random prompt, ignore EOS) ``--reps`` times, taking turns, and the table shows every
sample and the medians. llama.cpp runs through ``llama-cpp-python`` (optional: without it only attnkit is
measured). Same GGUF (the embedded SmolLM2-135M-Instruct Q4_1), same threads.

    python benchmarks/single_stream.py [--threads 2] [--reps 6] [--prompt 32] [--tokens 128] [--json FILE]
    attnkit bench single_stream
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

# OMP_WAIT_POLICY is left as the user has it: PASSIVE halves both systems' decode speed on a 2-core
# AVX-512 EPYC (their OpenMP threads then sleep between the many small operations of a token)
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import write_report  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=32, help="prompt length (random ordinary-text token ids)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per generation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from attnkit import LLM, SamplingParams
    from attnkit.loading.defaults import default_chat_model

    rng = random.Random(0)
    prompt = [rng.randrange(1000, 40000) for _ in range(args.prompt)]
    n = args.tokens
    llm = LLM()
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    def attnkit() -> float:
        m = llm.generate(prompt, params)[0].metrics
        return (n - 1) / (m.finish_time - m.first_token_time)

    runners = {"attnkit": attnkit}
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp

        ref = llama_cpp.Llama(model_path=str(default_chat_model()), n_ctx=args.prompt + n + 64,
                              n_threads=args.threads, verbose=False)

        def llama_cpp_python() -> float:
            count, first = 0, time.perf_counter()
            for _ in ref.generate(prompt, temp=0.0, top_k=1, reset=True):
                count += 1
                if count == 1:
                    first = time.perf_counter()
                if count == n:
                    break
            return (n - 1) / (time.perf_counter() - first)

        runners["llama.cpp"] = llama_cpp_python
    samples: dict[str, list[float]] = {k: [] for k in runners}
    for f in runners.values():  # warm-up
        f()
    for _ in range(args.reps):
        for name, f in runners.items():
            samples[name].append(f())
            print(f"{name}: {samples[name][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print("| system | decode tok/s, each repetition | median |")
    print("|---|---|---|")
    for k, v in samples.items():
        print(f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {med[k]:.1f} |")
    report = {"samples": samples, "median_tok_s": med,
              "setup": {"prompt_tokens": args.prompt, "new_tokens": n, "reps": args.reps, "threads": args.threads},
              "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "torch": torch.__version__,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}}
    if "llama.cpp" in med:
        report["ratio_vs_llama.cpp"] = med["attnkit"] / med["llama.cpp"]
        print(f"attnkit / llama.cpp (medians): {report['ratio_vs_llama.cpp']:.2f}×")
    write_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
