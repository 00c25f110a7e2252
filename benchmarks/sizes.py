"""attnkit against llama.cpp at real model sizes: Llama-3.2-1B- and 3B-shaped GGUFs in llama-quantize's presets,
and the Qwen3 shapes of attnkit.loading.gguf_writer (Qwen3-1.7B; a Qwen3-MoE of 2.6B parameters, 0.48B active).

The models are random weights in these shapes with the default model's tokenizer (SmolLM2's, 49 152
tokens), written by attnkit.loading.gguf_writer in F16 once and cached under ``--work-dir``, then quantized
to each ``--presets`` entry by llama.cpp's ``llama-quantize`` when ``--llama-bin`` has it, by attnkit's own
quantizer (attnkit.quant.gguf_quantize) otherwise (``--quantizer`` forces one); the report says which. Both
systems then run the same file, each measurement in a fresh process on ``--threads`` threads:

- the machine's read bandwidth, measured in the same run (the best of torch's sum of a 1 GiB tensor and
  attnkit's C read loop, kernels/membench.c, over it and over 1 GiB on 2 MiB pages, best of 10 each; a plain
  read, so a decode step that overlaps its reads better can pass 100% of it), and again right before each
  system's run (the C loop on 2 MiB pages, best of 4: ``decode / probe beside``), since this machine's bandwidth
  moves within minutes;
- attnkit (``LLM(path)``, as benchmarks/engine.py uses it): load time, time to first token of a 32-token
  prompt, prefill of a 512-token prompt (512 / its TTFT) and decode after the 32-token prompt (each the mean of
  as many runs as llama-bench's ``-r``, as its avg_ts is), the offline
  workload of benchmarks/engine.py (64 requests, input 32–512, output 32–256 random token ids, greedy,
  ignore_eos: output tok/s), whether its 4 requests of fewest new tokens get the same tokens again alone
  (``alone_equals_batch``: batch invariance at this size) and peak RSS;
- decode taken back to back: in each attnkit run, ``--paired-decode`` times (default 4) attnkit's decode and then
  ``llama-bench -p 0 -n N -r 1``, this process idle while llama-bench runs; the median of the pairs' ratios
  (each pair from the same few seconds: this machine's speed moves within minutes, and the two systems' own
  decode figures below are taken minutes apart);
- llama.cpp: ``llama-bench -p 512 -n N`` (pp512, tgN; its peak RSS) and ``llama-server`` with the same
  offline workload at each ``--llama-slots`` count (the best is reported; its VmHWM as peak RSS);
- decode as a fraction of the bandwidth roofline: bandwidth / bytes of weights one decode step reads (every
  tensor, the token-embedding table only when it is also the output head, of a mixture of experts only the
  expert_used_count / expert_count share of the experts a batch-1 step runs; KV-cache reads left out). The report
  prints each shape's parameters, total and active per token.

``--rounds N`` runs the systems in turn N times on each file and reports each figure's median (the rounds under
``rounds`` in the JSON): this machine's speed drifts between runs, and alternating puts both systems under the same
drift. A system whose tool is missing is skipped and said so; one that fails or passes ``--timeout`` is reported
as such. attnkit is skipped, with the reason, where the file's tensor types would be dequantized to float32
beyond the memory available.

    python benchmarks/sizes.py [--sizes 1b,3b,qwen3-1.7b,moe] [--presets Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_0] [--threads 2]
                               [--llama-bin DIR] [--work-dir DIR] [--quick] [--rounds N] [--timeout S] [--json FILE]
    attnkit bench sizes -- --sizes 1b --presets Q8_0 --quick --llama-bin /opt/llama.cpp/bin

An AVX2 machine's paths on an AVX-512 one: build llama.cpp with ``-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_AVX512=OFF`` and run under ``ATTNKIT_MARCH=x86-64-v3 ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2`` (attnkit's kernels, its choices and PyTorch's all without AVX-512; recorded in the JSON's
``machine.isa_env``). ``ATEN_CPU_CAPABILITY=avx2`` breaks torch.compile's inductor on an AVX-512 machine (NaN from a
three-line function): fine here, where nothing is compiled, but leave it out for anything that compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import median_result, write_report  # noqa: E402

from engine import workload  # noqa: E402 (the offline workload of the engine benchmark)

SIZES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "qwen3-1.7b": "qwen3-1.7b",  # shapes of attnkit.loading.gguf_writer
         "moe": "qwen3-moe-2.6b-a0.5b", "small-moe": "small-qwen3moe",  # small-moe: 131M, measurable on a busy machine
         "gemma3-1b": "gemma3-1b",  # Gemma-3-1B's layers (the default tokenizer's vocabulary)
         "tiny": "tiny", "tiny-moe": "tiny-qwen3moe", "tiny-gemma3": "tiny-gemma3",  # tiny*: smoke tests
         "default": "smollm2-135m"}  # the shipped default model's own GGUF (Q4_1), as it is: no preset applies
SHIPPED = "shipped"  # the default size's one "preset": the file as the package ships it
DEFAULT_PRESETS = "Q4_K_M,Q5_K_M,Q6_K,Q8_0,Q4_0"
GIB = 1 << 30


# -- the machine ------------------------------------------------------------------------------------------------

def machine_info(threads: int) -> dict:
    info: dict = {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version(),
                  "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                  "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "(unset)"),
                  # a narrower build on this CPU (e.g. ATTNKIT_MARCH=x86-64-v3, ATEN_CPU_CAPABILITY=avx2,
                  # ONEDNN_MAX_CPU_ISA=AVX2 with an AVX2 build of llama.cpp: an AVX2 machine's paths)
                  "isa_env": {k: os.environ[k] for k in ("ATTNKIT_MARCH", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                              if k in os.environ}}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")))
        info["simd"] = sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))
        info["avx512"] = "avx512f" in flags
        info["avx2"] = "avx2" in flags
        mem = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
        info["mem_total_gb"] = mem["MemTotal"] / 2**20
    except (OSError, StopIteration, KeyError, ValueError):  # pragma: no cover - not Linux
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 1 << 62


# -- the model files ---------------------------------------------------------------------------------------------

def file_info(path: Path) -> dict:
    """Sizes of a GGUF file: tensor bytes, the bytes a decode step reads, parameter count, types used."""
    from attnkit.loading.gguf_file import GGUFFile

    g = GGUFFile(path)
    m = g.metadata
    arch = m["general.architecture"]
    total = sum(t.nbytes for t in g.tensors.values())
    tied = "output.weight" not in g.tensors
    per_token = total - (0 if tied else g.tensors["token_embd.weight"].nbytes)  # an untied table: one row a token
    params = sum(int(_prod(t.shape)) for t in g.tensors.values())
    active = params  # per token (a batch-1 step): all but the experts that do not run
    if f"{arch}.expert_count" in m:  # a batch-1 step reads expert_used_count of the expert_count experts
        E, k = m[f"{arch}.expert_count"], m[f"{arch}.expert_used_count"]
        experts = sum(t.nbytes for n, t in g.tensors.items() if "_exps." in n)
        per_token -= experts - experts * k // E
        expert_params = sum(int(_prod(t.shape)) for n, t in g.tensors.items() if "_exps." in n)
        active -= expert_params - expert_params * k // E
    types: dict[str, int] = {}
    for t in g.tensors.values():
        types[t.ggml_type.name] = types.get(t.ggml_type.name, 0) + 1
    head_dim = m.get(f"{arch}.attention.key_length", m[f"{arch}.embedding_length"] // m[f"{arch}.attention.head_count"])
    kv_per_token = 2 * m[f"{arch}.block_count"] * m[f"{arch}.attention.head_count_kv"] * head_dim * 2  # float16 K, V
    return {"file_bytes": path.stat().st_size, "tensor_bytes": total, "decode_bytes_per_token": per_token,
            "params": params, "active_params": active, "tied_embeddings": tied,
            "types": types, "kv_bytes_per_token": kv_per_token}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def ensure_f16(size: str, work: Path, threads: int) -> tuple[Path, float | None]:
    path = work / f"{SIZES[size]}-F16.gguf"
    if path.exists():
        return path, None
    from attnkit.loading.gguf_writer import write_llama_gguf

    print(f"writing {path} (random weights, F16) …", file=sys.stderr, flush=True)
    t = time.perf_counter()
    write_llama_gguf(path, SIZES[size], "F16", threads=threads, progress=True)
    return path, time.perf_counter() - t


def ensure_preset(size: str, preset: str, f16: Path, work: Path, quantizer: str, llama_quantize: Path | None,
                  threads: int) -> tuple[Path, str, float | None]:
    """The file of ``size`` in ``preset``: (path, which quantizer made it, seconds it took or None if cached)."""
    if preset == "F16":
        return f16, "attnkit writer", None
    use_llama = quantizer == "llama" or (quantizer == "auto" and llama_quantize is not None)
    tag = "llama-quantize" if use_llama else "attnkit"
    path = work / f"{SIZES[size]}-{preset}.{'lq' if use_llama else 'ak'}.gguf"
    if path.exists():
        return path, tag, None
    tmp = path.with_name(path.name + ".part")
    print(f"quantizing {f16.name} → {path.name} with {tag} …", file=sys.stderr, flush=True)
    t = time.perf_counter()
    if use_llama:
        if llama_quantize is None:
            raise FileNotFoundError("--quantizer llama needs llama-quantize in --llama-bin")
        r = subprocess.run([str(llama_quantize), str(f16), str(tmp), preset, str(threads)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"llama-quantize failed: {r.stderr[-500:]}")
    else:
        from attnkit.quant.gguf_quantize import requantize

        requantize(f16, tmp, preset, threads=threads, progress=True)
    tmp.replace(path)
    return path, tag, time.perf_counter() - t


# -- children: one measurement each, in a fresh process ---------------------------------------------------------------

def child_bandwidth(threads: int, brief: bool = False) -> dict:
    """The best of three read probes over 1 GiB (far above the L3): torch's sum of float32, and attnkit's C loop
    summing 64-bit words on the same threads (kernels/membench.c) over the same buffer and over one on 2 MiB pages
    (attnkit.quant.weight_memory, where the engine keeps its weight blocks); best of 10 passes each. ``brief``: the
    C loop on 2 MiB pages alone, best of 4 (~1 s: the probe taken beside each system's run)."""
    import ctypes

    import torch

    from attnkit.kernels import library
    from attnkit.quant.weight_memory import empty_weights

    torch.set_num_threads(threads)
    lib = library()
    x = torch.ones(GIB // 8, dtype=torch.int64) if lib is None or not brief else None  # brief: the C loop alone
    probes = {} if x is None else {"torch_sum_f32": lambda: x.view(torch.float32).sum()}
    if lib is not None:
        lib.ak_read_sum.argtypes, lib.ak_read_sum.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_uint64
        if x is not None:
            probes["c_sum_u64"] = lambda: lib.ak_read_sum(x.data_ptr(), x.numel(), threads)
        huge = empty_weights((GIB // 8,), torch.int64).fill_(1)
        probes["c_sum_u64_huge_pages"] = lambda: lib.ak_read_sum(huge.data_ptr(), huge.numel(), threads)
    res: dict = {"bytes": GIB}
    for name, f in probes.items():
        best = float("inf")
        for _ in range(5 if brief else 11):  # the first touches the pages; best of the others
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        res[f"{name}_gb_s"] = GIB / best / 1e9
    res["read_gb_s"] = max(v for k, v in res.items() if k.endswith("_gb_s"))
    return res


def _native_types() -> set[str]:
    try:
        from attnkit.quant.native import NATIVE_TYPES, library

        return set(NATIVE_TYPES) if library() is not None else set()
    except ImportError:
        try:
            from attnkit.quant.native import library

            return {"Q4_0", "Q4_1", "Q8_0"} if library() is not None else set()
        except ImportError:  # pragma: no cover
            return set()


def attnkit_memory_estimate(path: Path) -> tuple[int, list[str]]:
    """Bytes attnkit's model would take (float32 for types without a kernel) and those types."""
    from attnkit.loading.gguf_file import GGUFFile

    g = GGUFFile(path)
    native = _native_types()
    total, slow = 0, set()
    for t in g.tensors.values():
        kind = t.ggml_type.name
        if kind in native or len(t.shape) < 2:
            total += t.nbytes
        else:
            total += 4 * _prod(t.shape)
            if kind not in ("F32",):
                slow.add(kind)
    return total, sorted(slow)


def llama_bench_rows(path: Path, binary: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> list[dict]:
    """llama-bench's JSON rows for ``-p n_prompt -n n_gen -r reps`` (raises with its stderr on failure)."""
    r = subprocess.run([str(binary), "-m", str(path), "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
                        "-o", "json", "-r", str(reps)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench exit {r.returncode}: {r.stderr[-400:]}")
    return json.loads(r.stdout)


def llama_bench_decode(path: Path, binary: Path, threads: int, n_gen: int) -> float:
    """llama-bench's tg``n_gen`` tok/s, one repetition."""
    rows = llama_bench_rows(path, binary, threads, 0, n_gen, 1)
    return next(row["avg_ts"] for row in rows if row["n_gen"] and not row["n_prompt"])


def paired_decode(llm, path: Path, binary: Path, threads: int, n_new: int, pairs: int, short: list[int]) -> dict:
    """attnkit's decode and llama-bench's, taken back to back ``pairs`` times (this process idle while llama-bench
    runs): each pair's ratio comes from the same few seconds of the machine, whose speed moves within minutes."""
    from attnkit import SamplingParams

    got = []
    for i in range(pairs):
        o = llm.generate(short[10 + i:] + short[:10 + i], SamplingParams(temperature=0, max_tokens=n_new, ignore_eos=True))[0]
        m = o.metrics
        ours = (n_new - 1) / (m.finish_time - m.first_token_time)
        time.sleep(0.2)  # the OpenMP workers' spin ends before llama-bench starts
        got.append((ours, llama_bench_decode(path, binary, threads, n_new)))
    ratios = sorted(a / b for a, b in got)
    return {"pairs": got, "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]}


def context_tokens(w: dict) -> int:
    """The K/V pool attnkit gets, in tokens: the context llama-server gets with one slot per offline request
    (``-c`` = slots × the longest request, benchmarks/engine.py), or the 512-token prompt test's if that is more,
    so that peak RSS compares the same file and context (not the engine's default 1 GiB pool)."""
    reqs = w["offline"]
    return max(len(reqs) * max(len(p) + n for p, n in reqs), max(len(q) for q in w["single"]) + w["single_new"])


def child_attnkit(path: Path, threads: int, quick: bool, requests: int, kv_per_token: int,
                  llama_bench: Path | None = None, pairs: int = 0) -> dict:
    from attnkit import LLM, SamplingParams

    w = workload(quick, requests)
    kv_bytes = context_tokens(w) * kv_per_token
    t0 = time.perf_counter()
    llm = LLM(str(path), threads=threads, kv_cache_bytes=kv_bytes)
    res: dict = {"load_s": time.perf_counter() - t0, "kv_cache_bytes": kv_bytes}
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    t0 = time.perf_counter()
    llm.generate([list(range(1000, 1040))], greedy(4))  # warm-up
    res["warmup_s"] = time.perf_counter() - t0
    short, long_ = w["single"]
    n_new = w["single_new"]
    reps = 2 if quick else 3  # as many as llama-bench's -r below, averaged as its avg_ts is
    decode, prefill = [], []
    for rep in range(reps):  # each prompt turned by `rep` tokens: a new first block, so no prefix-cache hit
        o = llm.generate(short[rep:] + short[:rep], greedy(n_new))[0]
        m = o.metrics
        res.setdefault("ttft_32_s", m.ttft)
        decode.append((n_new - 1) / (m.finish_time - m.first_token_time))
        o = llm.generate(long_[rep:] + long_[:rep], greedy(2))[0]
        res.setdefault("ttft_512_s", o.metrics.ttft)
        prefill.append(len(long_) / o.metrics.ttft)
    res["decode_tok_s"], res["decode_reps"] = sum(decode) / reps, decode
    if llama_bench is not None and pairs > 0:
        res["paired_decode"] = paired_decode(llm, path, llama_bench, threads, n_new, pairs, short)
    res["decode_tokens"] = n_new
    res["prefill_512_tok_s"], res["prefill_reps"] = sum(prefill) / reps, prefill
    reqs = w["offline"]
    total_out = sum(n for _, n in reqs)
    t = time.perf_counter()
    outs = llm.generate([p for p, _ in reqs], [greedy(n) for _, n in reqs])
    dt = time.perf_counter() - t
    assert sum(len(x.token_ids) for x in outs) == total_out
    res.update(offline_s=dt, offline_out_tok_s=total_out / dt,
               offline_total_tok_s=(total_out + sum(len(p) for p, _ in reqs)) / dt,
               preemptions=llm.engine.scheduler.num_preemptions)
    # batch invariance at this size: the 4 requests of fewest new tokens again, each alone, give the tokens they got
    # among the whole workload
    check = sorted(range(len(reqs)), key=lambda i: reqs[i][1])[:4]
    alone = [llm.generate(reqs[i][0], greedy(reqs[i][1]))[0].token_ids for i in check]
    res["alone_equals_batch"] = [list(a) == list(outs[i].token_ids) for a, i in zip(alone, check)]
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def child_llama_bench(path: Path, binary: Path, threads: int, quick: bool) -> dict:
    n_gen = workload(quick, 64)["single_new"]
    rows = llama_bench_rows(path, binary, threads, 512, n_gen, 2 if quick else 3)
    res: dict = {"decode_tokens": n_gen}
    for row in rows:
        if row["n_prompt"] and not row["n_gen"]:
            res["prefill_512_tok_s"], res["prefill_512_stddev"] = row["avg_ts"], row["stddev_ts"]
        elif row["n_gen"] and not row["n_prompt"]:
            res["decode_tok_s"], res["decode_stddev"] = row["avg_ts"], row["stddev_ts"]
        res["build"] = f"{row.get('build_commit')} ({row.get('build_number')})"
        res["backend"] = row.get("backends") or row.get("backend")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # llama-bench's own
    return res


def child_llama_server(path: Path, binary: Path, threads: int, quick: bool, requests: int, slots: list[int]) -> dict:
    import attnkit.loading.defaults as defaults
    import engine

    defaults.default_chat_model = lambda: path  # engine.run_llama_server serves the default model; here, this file
    w = workload(quick, requests)
    runs = {}
    for n in slots:
        if n > len(w["offline"]) and n != slots[0]:
            continue
        print(f"  llama-server -np {n} …", file=sys.stderr, flush=True)
        runs[n] = engine.run_llama_server(w, str(binary), threads, n)
    best = max(runs, key=lambda n: runs[n]["offline_out_tok_s"])
    return {**runs[best], "by_slots": {str(n): {k: runs[n][k] for k in ("offline_out_tok_s", "load_s", "peak_rss_mb")}
                                       for n in runs}}


def child(args: argparse.Namespace) -> int:
    if args.child in ("bandwidth", "bandwidth-brief"):
        res = child_bandwidth(args.threads, args.child == "bandwidth-brief")
    elif args.child == "attnkit":
        bench = Path(args.llama_bin) / "llama-bench" if args.llama_bin and args.paired_decode else None
        res = child_attnkit(Path(args.model), args.threads, args.quick, args.requests, args.kv_per_token,
                            bench if bench is not None and bench.exists() else None, args.paired_decode)
    elif args.child == "llama-bench":
        res = child_llama_bench(Path(args.model), Path(args.llama_bin) / "llama-bench", args.threads, args.quick)
    else:
        res = child_llama_server(Path(args.model), Path(args.llama_bin) / "llama-server", args.threads, args.quick,
                                 args.requests, [int(s) for s in args.llama_slots.split(",")])
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def run_child(kind: str, args: argparse.Namespace, timeout: float, model: Path | None = None,
              extra: list[str] | None = None) -> tuple[dict | None, str | None]:
    """(result, None) or (None, why it failed). The child gets its own process group, killed on timeout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--threads", str(args.threads),
           "--requests", str(args.requests), "--llama-slots", args.llama_slots, "--paired-decode", str(args.paired_decode)] + (["--quick"] if args.quick else []) + (
        ["--model", str(model)] if model else []) + (["--llama-bin", args.llama_bin] if args.llama_bin else []) + (extra or [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"timed out after {timeout:.0f} s"
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return None, f"failed (exit {proc.returncode})"
    return json.loads(line[len("RESULT "):]), None


# -- the report --------------------------------------------------------------------------------------------------

COLUMNS = [("load_s", "load s", 1), ("ttft_32_s", "TTFT 32 s", 2), ("prefill_512_tok_s", "prefill 512 tok/s", 1),
           ("decode_tok_s", "decode tok/s", 2), ("roofline", "decode / roofline", 2),
           ("roofline_beside", "decode / probe beside", 2),
           ("offline_out_tok_s", "offline out tok/s", 2), ("peak_rss_mb", "peak RSS GB", 2)]


def _cell(res: dict, key: str, digits: int) -> str:
    v = res.get(key)
    if v is None:
        return "—"
    if key == "peak_rss_mb":
        return f"{v / 1024:.{digits}f}"
    if key in ("roofline", "roofline_beside"):
        return f"{v:.0%}"
    return f"{v:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1b,3b", help="comma-separated: 1b, 3b (Llama-3.2's shapes), qwen3-1.7b, "
                    "moe (Qwen3-MoE, 2.6B total / 0.48B active), small-moe (0.13B / 0.04B), default (the shipped "
                    "SmolLM2-135M Q4_1 file itself); tiny, tiny-moe: smoke tests")
    ap.add_argument("--presets", default=DEFAULT_PRESETS, help="llama-quantize presets (attnkit.quant.gguf_quantize.PRESETS)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bin", default=None, metavar="DIR",
                    help="llama.cpp's bin/ (llama-bench, llama-server, llama-quantize)")
    ap.add_argument("--quantizer", default="auto", choices=["auto", "llama", "attnkit"],
                    help="who quantizes the F16 file (auto: llama-quantize when --llama-bin has it)")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "attnkit" / "sizes"),
                    help="where the model files are cached (1B: ~9 GB for F16 and 5 presets; 3B: ~20 GB)")
    ap.add_argument("--quick", action="store_true", help="16 shorter offline requests, 32 decode tokens, fewer reps")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--llama-slots", default="4,16,64", help="llama-server parallel slot counts to try (-np)")
    ap.add_argument("--systems", default="attnkit,llama-bench,llama-server", help="which to run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the systems in turn this many times per file and report each figure's median (this "
                         "machine's speed drifts between runs: alternating rounds put both systems under the same drift)")
    ap.add_argument("--paired-decode", type=int, default=4,
                    help="also take attnkit's decode and llama-bench's back to back this many times in each attnkit "
                         "run (with --llama-bin; 0: not): the ratio of each pair, from the same few seconds")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds each child process may take")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kv-per-token", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from attnkit.quant.gguf_quantize import check_preset

    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r} (choose from {', '.join(SIZES)})")
    try:
        presets = [check_preset(p.strip()) for p in args.presets.split(",") if p.strip()]
    except ValueError as e:
        ap.error(str(e))
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    tools: dict[str, Path | None] = {}
    for tool in ("llama-quantize", "llama-bench", "llama-server"):
        p = Path(args.llama_bin) / tool if args.llama_bin else None
        tools[tool] = p if p is not None and p.is_file() and os.access(p, os.X_OK) else None

    machine = machine_info(args.threads)
    print(f"machine: {machine.get('cpu')}, {machine['cpus']} CPUs, threads {args.threads}, "
          f"OMP_WAIT_POLICY={machine['omp_wait_policy']}"
          + "".join(f", {k}={v}" for k, v in machine["isa_env"].items()), file=sys.stderr)
    bw, bw_why = run_child("bandwidth", args, 300)
    bandwidth = bw["read_gb_s"] if bw else None
    print(f"read bandwidth: {bandwidth:.1f} GB/s" if bandwidth else f"bandwidth: {bw_why}", file=sys.stderr)

    rows: list[dict] = []
    for size in sizes:
        shipped = size == "default"
        f16, f16_s = (None, None) if shipped else ensure_f16(size, work, args.threads)
        for preset in [SHIPPED] if shipped else presets:
            entry: dict = {"size": size, "shape": SIZES[size], "preset": preset}
            try:
                if shipped:
                    from attnkit.loading.defaults import default_chat_model

                    path, quantizer, q_s = Path(default_chat_model()), "shipped (Q4_1)", None
                else:
                    path, quantizer, q_s = ensure_preset(size, preset, f16, work, args.quantizer,
                                                         tools["llama-quantize"], args.threads)
            except (RuntimeError, FileNotFoundError, ValueError) as e:
                entry["error"] = f"quantization failed: {e}"
                rows.append(entry)
                continue
            info = file_info(path)
            entry.update(file=str(path), quantizer=quantizer, quantize_s=q_s, f16_write_s=f16_s, **info)
            entry["roofline_decode_tok_s"] = bandwidth * 1e9 / info["decode_bytes_per_token"] if bandwidth else None
            entry["results"], entry["skipped"] = {}, {}
            runnable: list[tuple[str, list[str]]] = []
            for system in systems:
                if system == "attnkit":
                    need, slow = attnkit_memory_estimate(path)
                    if need > 0.8 * mem_available():
                        entry["skipped"][system] = (f"would dequantize {', '.join(slow)} to float32: ~{need / GIB:.1f} GiB "
                                                    f"> 80% of the {mem_available() / GIB:.1f} GiB available")
                        continue
                    if slow:
                        entry.setdefault("notes", []).append(f"attnkit dequantizes {', '.join(slow)} to float32 (no kernel)")
                    runnable.append((system, ["--kv-per-token", str(info["kv_bytes_per_token"])]))
                elif tools.get(system) is None:
                    entry["skipped"][system] = (f"{system} not found in --llama-bin {args.llama_bin}" if args.llama_bin
                                                else "no --llama-bin given")
                else:
                    runnable.append((system, []))
            runs: dict[str, list[dict]] = {}
            failed: dict[str, list[str]] = {}
            for rnd in range(args.rounds):
                for system, extra in runnable:
                    print(f"[{size} {preset}] {system} (round {rnd + 1} of {args.rounds}) …", file=sys.stderr, flush=True)
                    near, _ = run_child("bandwidth-brief", args, 120)  # this machine's bandwidth moves within minutes
                    res, why = run_child(system, args, args.timeout, path, extra)
                    if res is not None and near:
                        res["bandwidth_beside_gb_s"] = near["read_gb_s"]
                        if res.get("decode_tok_s"):
                            res["roofline_beside"] = res["decode_tok_s"] * info["decode_bytes_per_token"] / (near["read_gb_s"] * 1e9)
                    if res is None:
                        failed.setdefault(system, []).append(f"round {rnd + 1}: {why}")
                    else:
                        runs.setdefault(system, []).append(res)
            for system, whys in failed.items():  # skipped only where no round ran; else the medians say which failed
                if system not in runs:
                    entry["skipped"][system] = "; ".join(whys)
                else:
                    entry.setdefault("notes", []).append(f"{system}: {len(whys)} of {args.rounds} rounds failed ({'; '.join(whys)})")
            for system, got in runs.items():
                res = got[0] if len(got) == 1 else median_result(got)
                if res.get("decode_tok_s") and entry["roofline_decode_tok_s"]:
                    res["roofline"] = res["decode_tok_s"] / entry["roofline_decode_tok_s"]
                entry["results"][system] = res
            rows.append(entry)

    w = workload(args.quick, args.requests)
    print(f"\nread bandwidth {bandwidth or float('nan'):.1f} GB/s; decode after a 32-token prompt "
          f"({w['single_new']} tokens); offline: {len(w['offline'])} requests, "
          f"{sum(n for _, n in w['offline'])} output tokens; {args.threads} threads")
    for shape in dict.fromkeys(e["shape"] for e in rows if "params" in e):
        e = next(e for e in rows if e["shape"] == shape and "params" in e)
        print(f"{shape}: {e['params'] / 1e9:.3f}B parameters, {e['active_params'] / 1e9:.3f}B active per token, "
              f"{e['decode_bytes_per_token'] / 1e9:.3f} GB read per batch-1 token ({e['preset']})")
    print()
    print("| model | preset | GB | quantizer | system | " + " | ".join(c[1] for c in COLUMNS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(COLUMNS))
    for e in rows:
        head = f"| {e['shape']} | {e['preset']} | {e.get('file_bytes', 0) / 1e9:.2f} | {e.get('quantizer', '—')} |"
        if "error" in e:
            print(f"{head} — | {e['error']} |")
            continue
        res = dict(e["results"])
        if "llama-bench" in res and "llama-server" in res:  # one llama.cpp row: bench's speeds, server's offline
            srv = res.pop("llama-server")
            res["llama-bench"] = {**res["llama-bench"], "offline_out_tok_s": srv["offline_out_tok_s"],
                                  "load_s": srv["load_s"], "slots": srv.get("slots"),
                                  "peak_rss_mb": max(res["llama-bench"]["peak_rss_mb"], srv["peak_rss_mb"])}
            res["llama.cpp"] = res.pop("llama-bench")
        for name, r in res.items():
            print(f"{head} {name} | " + " | ".join(_cell(r, k, d) for k, _, d in COLUMNS) + " |")
        for name, why in e["skipped"].items():
            print(f"{head} {name} | {why} |")
    for e in rows:
        a = e.get("results", {}).get("attnkit")
        got = [r["paired_decode"] for r in (a or {}).get("rounds", [a] if a else []) if r.get("paired_decode")]
        if got:
            ratios = sorted(x / y for g in got for x, y in g["pairs"])
            a["paired_decode_ratio"] = statistics.median(ratios)
            print(f"{e['shape']} {e['preset']}: decode taken back to back with llama-bench, {len(ratios)} pairs: "
                  f"attnkit ÷ llama.cpp median {a['paired_decode_ratio']:.2f}× (range {ratios[0]:.2f}–{ratios[-1]:.2f}×)")
    for e in rows:
        a = e.get("results", {}).get("attnkit")
        if a and "alone_equals_batch" in a:
            checks = [r["alone_equals_batch"] for r in a.get("rounds", [a])]
            print(f"{e['shape']} {e['preset']}: greedy tokens alone == in the batch: "
                  f"{sum(map(sum, checks))} of {sum(map(len, checks))} requests")
    report = {"machine": machine, "bandwidth": bw, "bandwidth_error": bw_why, "rounds": args.rounds,
              "workload": {"quick": args.quick, "requests": len(w["offline"]), "decode_tokens": w["single_new"],
                           "offline_input_tokens": sum(len(p) for p, _ in w["offline"]),
                           "offline_output_tokens": sum(n for _, n in w["offline"])},
              "tools": {k: str(v) if v else None for k, v in tools.items()}, "models": rows}
    write_report(report, args.json)
    return 0 if any(e.get("results") for e in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
