"""Speculative decoding in the engine: tokens per second with and without it, on the default model, same machine.

Configurations, each in a fresh process on the same workloads: ``none`` (no speculation), ``ngram`` (prompt
lookup), ``layerskip:N`` (the target's first N layers as the draft; default a quarter of them) and, given
``--draft PATH`` (or ``--make-student DIR``), ``draft:PATH`` (a smaller model with the target's vocabulary).

Workloads, all greedy:

- grounded: 32 chat requests (8 each: repeat a passage, edit it — replace a word or restore its commas —,
  list its sentences that mention a word, summarise it) on passages of 150–400 tokens cut from the shipped
  text (``attnkit.eval.shipped_text()``), rendered with the model's chat template, 128 new tokens at most;
  run one request after another (single stream) and all submitted together at 16 concurrent sequences;
- free-form chat: 16 short open questions, 128 new tokens at most, single stream;
- offline: the random-token workload of ``benchmarks/engine.py`` (64 requests, ignore EOS), all at once.

Measured per configuration: output tokens/s of each workload and its ratio to ``none``'s, the acceptance
rate and mean accepted length (tokens per verifying sequence-step) per workload, and the requests whose token
ids differ from ``none``'s (greedy outputs must be identical: 0); with ``none``, the C decode step's time for
1, 2, 4 and 8 rows of one sequence (what verifying drafts costs against one decode row). ``--quick``: 8 grounded requests, 4 chat
questions, 64 new tokens, the offline workload's quick form. A process runs its workloads in the order above
after one warm-up (a short chat request); the engine's adaptive draft length learns throughout, its step-cost
model and acceptance prior carrying from one workload to the next, as in a server. The machine's load average
is recorded: on a shared machine other processes' threads slow one configuration and not another.

``--make-student DIR`` first distills a student with half the target's layers (``attnkit distill`` on the
shipped text — the grounded passages' source —, ``--student-steps`` steps, a few minutes on 2 cores; written to
DIR/student) and then uses it as ``--draft`` (the engine quantizes a float draft beside a GGUF target to Q8_0
blocks in memory). ``--quantize none`` runs the target (and draft) dequantized to float32: decoding is then
bound by reading the weights, not by the integer kernels' arithmetic, and verifying k rows costs about one.

    python benchmarks/speculative.py [--quick] [--model PATH] [--draft PATH | --make-student DIR]
                                     [--layerskip-layers N] [--k 5] [--threads N] [--quantize gguf|none]
                                     [--configs none,ngram,...] [--rounds N] [--json FILE]
    attnkit bench speculative -- --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import cpu_model, median_result, write_report  # noqa: E402
from engine import workload as offline_workload  # noqa: E402

QUESTIONS = [
    "What makes a good friend?",
    "Why is the sky blue?",
    "Give me three ideas for a rainy afternoon.",
    "How do plants make their food?",
    "What should I pack for a weekend hike?",
    "Explain what a computer program is to a child.",
    "Why do people enjoy music?",
    "What are the benefits of learning a second language?",
    "How can I sleep better?",
    "What is the difference between weather and climate?",
    "Describe a perfect breakfast.",
    "Why do cats purr?",
    "How does a bicycle stay upright?",
    "What is a healthy way to deal with stress?",
    "Suggest a name for a small bakery and explain it.",
    "What would you take to a desert island, and why?",
]
REPLACEMENTS = ["banana", "Zebra", "purple", "Mountain", "lantern", "Oceanic", "velvet", "Comet"]
STOPWORDS = {"which", "their", "there", "these", "those", "shall", "other", "under", "being", "where", "would",
             "should", "every", "about", "after", "before", "without", "within", "against", "among", "whose"}
WORKLOADS = ("grounded_1", "grounded_16", "chat", "offline")


def passages(tok, lo: int = 150, hi: int = 400) -> list[str]:
    """Consecutive paragraphs of the shipped text grouped into passages of ``lo``–``hi`` tokens (a paragraph
    longer than ``hi`` cut at sentence ends)."""
    from attnkit.eval import shipped_text

    n = lambda s: len(tok.encode(s, add_special_tokens=False))  # noqa: E731
    pieces: list[str] = []
    for para in (p.strip() for p in shipped_text().split("\n\n") if p.strip()):
        if n(para) <= hi:
            pieces.append(para)
            continue
        cur = ""
        for sent in re.split(r"(?<=[.;:])\s+", para):
            if cur and n(cur + " " + sent) > hi:
                pieces.append(cur)
                cur = sent
            else:
                cur = f"{cur} {sent}".strip()
        pieces.append(cur)
    out, cur = [], ""
    for p in pieces:
        cand = f"{cur}\n\n{p}" if cur else p
        if cur and n(cand) > hi:
            if n(cur) >= lo:
                out.append(cur)
            cur = p
        else:
            cur = cand
        if n(cur) >= lo:
            out.append(cur)
            cur = ""
    return out


def keyword(passage: str, skip: int = 0) -> str:
    """The passage's most frequent longer word (capitalised as first seen; ties by first occurrence)."""
    words = re.findall(r"[A-Za-z]{5,}", passage)
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for w in words:
        if w.lower() in STOPWORDS:
            continue
        counts[w.lower()] = counts.get(w.lower(), 0) + 1
        first.setdefault(w.lower(), w)
    ranked = sorted(counts, key=lambda w: (-counts[w], words.index(first[w])))
    return first[ranked[min(skip, len(ranked) - 1)]]


def grounded_tasks(paras: list[str], per_kind: int) -> list[tuple[str, str]]:
    """(kind, user message) for ``per_kind`` requests of each kind, on deterministic passages."""
    tasks = []
    for k, kind in enumerate(("repeat", "edit", "extract", "summarise")):
        for j in range(per_kind):
            p = paras[(k * per_kind + j * 3 + k) % len(paras)]
            if kind == "repeat":
                msg = f"Repeat the following passage exactly:\n\n{p}"
            elif kind == "edit" and j % 2 == 0:
                msg = (f"Rewrite the passage with every occurrence of \"{keyword(p)}\" replaced by "
                       f"\"{REPLACEMENTS[j % len(REPLACEMENTS)]}\". Change nothing else.\n\n{p}")
            elif kind == "edit":
                msg = ("The commas were removed from the following passage. Fix the punctuation: write the passage "
                       f"out in full with its commas restored.\n\n{p.replace(',', '')}")
            elif kind == "extract":
                msg = f"List the sentences of the passage that mention \"{keyword(p, j % 3)}\".\n\n{p}"
            else:
                msg = f"Summarise the passage in three sentences.\n\n{p}"
            tasks.append((kind, msg))
    return tasks


def stats_of(llm) -> dict | None:
    spec = llm.engine.spec
    return None if spec is None else dataclasses.asdict(spec.stats)


def spec_delta(before: dict | None, after: dict | None) -> dict:
    if before is None or after is None:
        return {"acceptance_rate": None, "mean_accepted_length": None}
    d = {k: after[k] - before[k] for k in after}
    d["acceptance_rate"] = d["accepted"] / d["proposed"] if d["proposed"] else None
    d["mean_accepted_length"] = d["emitted"] / d["verifications"] if d["verifications"] else None
    return d


def timed(llm, fn) -> tuple[list[list[int]], dict]:
    """Run ``fn`` → its outputs' token ids, and its seconds, tokens/s and the speculation statistics it added."""
    before = stats_of(llm)
    t = time.perf_counter()
    outs = fn()
    dt = time.perf_counter() - t
    ids = [list(o.token_ids) for o in outs]
    res = {"seconds": dt, "requests": len(ids), "output_tokens": sum(map(len, ids)),
           "out_tok_s": sum(map(len, ids)) / dt}
    res.update(spec_delta(before, stats_of(llm)))
    return ids, res


def one_by_one(llm, prompts: list, params) -> list:
    return [llm.generate(p, params)[0] for p in prompts]


def concurrently(llm, prompts: list, params, max_seqs: int) -> list:
    sched = llm.engine.scheduler
    saved, sched.max_num_seqs = sched.max_num_seqs, max_seqs
    try:
        return llm.generate(prompts, params)
    finally:
        sched.max_num_seqs = saved


def llm_for(config: str, args: argparse.Namespace):
    from attnkit import LLM

    kw: dict = {} if config == "none" else {"speculative": config, "num_speculative_tokens": args.k}
    return LLM(args.model, quantize=None if args.quantize == "none" else "gguf", **kw)


def row_costs(llm, rows=(1, 2, 4, 8), position: int = 400) -> dict | None:
    """Milliseconds of the C decode step (layers, then the head) for 1, 2, 4, 8 rows of one sequence at
    ``position``: what verifying k drafts costs against one decode row (None off the C step: no such split)."""
    import torch

    nat = llm.engine.runner.native
    if not nat:
        return None
    out = {}
    for n in rows:
        ids = torch.randint(1000, 2000, (n,))
        pos = torch.arange(position, position + n)
        tables = torch.arange(-(-(position + n) // llm.engine.config.block_size)).repeat(n, 1)
        args = (ids, pos, pos.clone(), tables, pos + 1, torch.zeros(n, dtype=torch.long))
        best_h = best_l = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            h = nat.hidden(*args)
            t1 = time.perf_counter()
            nat.logits(h)
            best_h, best_l = min(best_h, t1 - t), min(best_l, time.perf_counter() - t1)
        out[n] = {"layers_ms": best_h * 1e3, "head_ms": best_l * 1e3}
    return out


def child(config: str, args: argparse.Namespace) -> int:
    import torch

    from attnkit import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    llm = llm_for(config, args)
    res: dict = {"load_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                 "layers": len(llm.engine.model.layers), "model": str(llm.path)}
    hello = llm.render_chat([{"role": "user", "content": "Say hello."}])
    llm.generate(hello, SamplingParams(temperature=0, max_tokens=8))
    res["warmup_spec"] = stats_of(llm)
    if config == "none":
        res["row_cost"] = row_costs(llm)
    new = 64 if args.quick else 128
    greedy = SamplingParams(temperature=0, max_tokens=new)
    tasks = grounded_tasks(passages(llm.tokenizer), 2 if args.quick else 8)
    grounded = [llm.render_chat([{"role": "user", "content": m}]) for _, m in tasks]
    chat = [llm.render_chat([{"role": "user", "content": q}]) for q in QUESTIONS[:4 if args.quick else 16]]
    off = offline_workload(args.quick, 64)["offline"]
    off_params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in off]
    runs = {
        "grounded_1": lambda: one_by_one(llm, grounded, greedy),
        "grounded_16": lambda: concurrently(llm, grounded, greedy, 16),
        "chat": lambda: one_by_one(llm, chat, greedy),
        "offline": lambda: llm.generate([p for p, _ in off], off_params),
    }
    res["workloads"], res["token_ids"] = {}, {}
    for name, fn in runs.items():
        print(f"  {config}: {name} …", file=sys.stderr, flush=True)
        ids, r = timed(llm, fn)
        res["workloads"][name], res["token_ids"][name] = r, ids
    res["grounded_kinds"] = [k for k, _ in tasks]
    res["grounded_prompt_tokens"] = [len(p) for p in grounded]
    if llm.engine.spec is not None:
        cfg = llm.engine.spec.config
        res["speculative"] = {"method": cfg.method, "num_speculative_tokens": cfg.num_speculative_tokens,
                              "draft_layers": cfg.draft_layers or (res["layers"] // 4 if cfg.method == "layerskip"
                                                                    else None),
                              "draft_model": cfg.draft_model, "adaptive": cfg.adaptive}
    print("RESULT " + json.dumps(res))
    return 0


def run_child(config: str, args: argparse.Namespace) -> dict | str:
    cmd = [sys.executable, __file__, "--child", config, "--k", str(args.k), "--threads", str(args.threads),
           "--quantize", args.quantize]
    cmd += (["--quick"] if args.quick else []) + (["--model", args.model] if args.model else [])
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        return f"failed (exit {r.returncode})"
    return json.loads(line[len("RESULT "):])


def make_student(out: str, steps: int, model: str | None, threads: int) -> str:
    """Distill a student with half the teacher's layers on the shipped text → OUT/student."""
    from attnkit.eval import shipped_text

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    data = d / "shipped_text.jsonl"
    paras = [p.strip() for p in shipped_text().split("\n\n") if p.strip()]
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
    cmd = [sys.executable, "-c", "import sys; from attnkit.cli import main; sys.exit(main(sys.argv[1:]))",
           "distill", "--out", str(d), "--data", str(data), "--stages", "half", "--steps-per-stage", str(steps),
           "--batch-size", "4", "--seq-len", "128", "--warmup", str(max(1, steps // 10)), "--lr", "2e-4",
           "--speed-tokens", "16"]
    cmd += (["--model", model] if model else []) + (["--threads", str(threads)] if threads else [])
    print(f"distilling a student ({steps} steps) into {d / 'student'} …", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return str(d / "student")


def merge_rounds(runs: list[dict]) -> dict:
    """A configuration's runs → the first run with each workload's numbers the medians over the runs (each run's
    own figures under the workload's ``rounds``)."""
    res = dict(runs[0])
    res["workloads"] = {w: median_result([r["workloads"][w] for r in runs]) for w in WORKLOADS}
    return res


def differing(ids: dict, ref: dict) -> int:
    return sum(a != b for w in WORKLOADS for a, b in zip(ids[w], ref[w]))


def fmt(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def label(config: str, res: dict | str) -> str:
    if config == "layerskip" and isinstance(res, dict) and res.get("speculative"):
        return f"layerskip:{res['speculative']['draft_layers']}"
    return config


def table(results: dict, skipped: dict) -> None:
    head = ["grounded 1-stream tok/s", "grounded 16-seq tok/s", "chat tok/s", "offline tok/s",
            "draft tokens (g1/g16/chat/off)", "acceptance (g1/g16/chat/off)",
            "mean accepted length (g1/g16/chat/off)", "differing requests"]
    print("| configuration | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    base = results.get("none")
    for name, res in results.items():
        w = res["workloads"]
        cells = []
        for k in WORKLOADS:
            ratio = w[k]["out_tok_s"] / base["workloads"][k]["out_tok_s"] if base else None
            cells.append(f"{w[k]['out_tok_s']:.1f} ({fmt(ratio, 2)}×)")
        cells.append("/".join(str(w[k].get("proposed", "—")) for k in WORKLOADS))
        cells.append("/".join(fmt(w[k]["acceptance_rate"], 2) for k in WORKLOADS))
        cells.append("/".join(fmt(w[k]["mean_accepted_length"], 2) for k in WORKLOADS))
        cells.append(str(res.get("differing_requests", "—")))
        print(f"| {name} | " + " | ".join(cells) + " |")
    for name, why in skipped.items():
        print(f"| {name} | {why} |")
    cost = (base or {}).get("row_cost")
    if cost:
        print("\nthe C decode step, rows of one sequence at position 400 (ms, best of 5): "
              + ", ".join(f"{n} rows {c['layers_ms']:.2f} + head {c['head_ms']:.2f}" for n, c in cost.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 grounded requests, 4 chat questions, 64 new tokens")
    ap.add_argument("--model", default=None, metavar="PATH", help="the target (default: the embedded SmolLM2)")
    ap.add_argument("--draft", default=None, metavar="PATH", help="a draft model: also measure draft:PATH")
    ap.add_argument("--make-student", default=None, metavar="DIR",
                    help="distill a half-depth student of the target into DIR/student and use it as --draft")
    ap.add_argument("--student-steps", type=int, default=40, help="distillation steps for --make-student")
    ap.add_argument("--layerskip-layers", type=int, default=None, metavar="N",
                    help="layerskip's draft layers (default: a quarter of the target's)")
    ap.add_argument("--k", type=int, default=5, help="num_speculative_tokens: the most draft tokens per step")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--quantize", choices=["gguf", "none"], default="gguf",
                    help="gguf: the file's blocks under attnkit's kernels (default); none: dequantized to float32")
    ap.add_argument("--configs", default=None, help="only these configurations (comma-separated, e.g. none,ngram)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the configurations in turn this many times; each figure the median over the rounds")
    ap.add_argument("--json", default=None, help="also write the JSON report to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args([a for a in sys.argv[1:] if a != "--"])
    if args.child:
        return child(args.child, args)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.make_student:
        if args.draft:
            ap.error("--draft and --make-student exclude each other")
        args.draft = make_student(args.make_student, args.student_steps, args.model, args.threads)

    configs = ["none", "ngram", f"layerskip:{args.layerskip_layers}" if args.layerskip_layers else "layerskip"]
    skipped: dict[str, str] = {}
    if args.draft:
        configs.append(f"draft:{args.draft}")
    else:
        skipped["draft"] = "skipped: no --draft"
    if args.configs:  # in the order given; "layerskip:N" picks its own N
        by_kind = {c.split(":")[0]: c for c in configs}
        wanted = args.configs.split(",")
        unknown = [w for w in wanted if w.split(":")[0] not in (*by_kind, "draft")]
        if unknown:
            ap.error(f"--configs: unknown {', '.join(unknown)} (none, ngram, layerskip[:N], draft)")
        configs = [w if w.startswith("layerskip:") else by_kind[w.split(":")[0]] for w in wanted
                   if w.split(":")[0] in by_kind]
    rounds: dict[str, list[dict]] = {}
    load_start = os.getloadavg()
    for r in range(args.rounds):  # the configurations in turn, round after round: a slow spell hits each alike
        for i, config in enumerate(configs):
            if config in skipped:
                continue
            print(f"[round {r + 1}/{args.rounds}, {i + 1}/{len(configs)}] {config} …", file=sys.stderr, flush=True)
            res = run_child(config, args)
            if isinstance(res, str):
                skipped[config] = res
            else:
                rounds.setdefault(config, []).append(res)
    base = rounds.get("none")
    results: dict = {}
    for config, runs in rounds.items():
        if config in skipped:
            continue
        res = merge_rounds(runs)
        if base is not None:  # every round's tokens against the same round's (or the first) run without speculation
            res["differing_requests"] = sum(differing(run["token_ids"], base[min(j, len(base) - 1)]["token_ids"])
                                            for j, run in enumerate(runs))
        results[label(config, res)] = res
    ref = results.get("none")
    table(results, skipped)
    any_res = next(iter(results.values()), {})
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(),
                    "torch_threads": any_res.get("torch_threads"),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "model": any_res.get("model"), "quick": args.quick, "rounds": args.rounds, "num_speculative_tokens": args.k,
        "quantize": args.quantize,
        "results": {n: {k: v for k, v in r.items() if k != "token_ids"} for n, r in results.items()},
        "ratio_vs_none": {n: {w: r["workloads"][w]["out_tok_s"] / ref["workloads"][w]["out_tok_s"] for w in WORKLOADS}
                          for n, r in results.items()} if ref else {},
        "skipped": skipped,
    }
    write_report(report, args.json)
    return 0 if ref is not None and all(r.get("differing_requests") == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
