"""Parallelism, measured: Transformer vs LSTM, training vs decoding, and the cost of attention heads.

    python benchmarks/parallelism.py            # the full run (≈ 5–10 min on 2 CPU cores)
    python benchmarks/parallelism.py --quick    # a smoke run (≈ 1 min)
    attnkit bench parallelism [args]            # the same script through the CLI

Parts (all on CPU, float32, dropout off):
  (a) one training step (forward + backward + Adam step) vs sequence length n for a stack of
      Transformer encoder layers (attnkit.models.transformer.Encoder) and a torch.nn.LSTM of the
      same width and depth;
  (b) the Transformer decoder: one teacher-forced parallel pass over n tokens (as in training) vs
      n sequential decoding steps with the KV cache and without it (re-running the whole prefix);
      the LSTM decoder of attnkit.models.lstm_seq2seq for comparison;
  (c) analytic counts (attnkit.analysis.flops): per-layer multiply-accumulates and sequential
      steps of self-attention vs recurrence, the crossover lengths, and the measured crossover;
  (d) 8 heads of width 64 vs 1 head of width 512 (d_model 512): counted, and timed forward and
      forward + backward for attnkit's MultiHeadAttention.

Timings are medians of ``--repeats`` runs after ``--warmup`` runs (time.perf_counter). Prints
tables, writes JSON (``--out-json``) and a PNG figure (``--out-png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # attnkit bench runs this file with runpy

from _report import cpu_model  # noqa: E402

# With more runnable threads than free cores (other jobs on a small machine), OpenMP threads that
# spin at barriers make multi-threaded CPU timings 10–25× slower; passive waiting avoids that. It only
# takes effect if torch is not imported yet (it is read when the OpenMP runtime starts).
_TORCH_PREIMPORTED = "torch" in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from attnkit.analysis import flops as F  # noqa: E402
from attnkit.models.lstm_seq2seq import LSTMSeq2Seq, LSTMSeq2SeqConfig  # noqa: E402
from attnkit.models.transformer import Encoder, Seq2SeqConfig, Seq2SeqTransformer  # noqa: E402
from attnkit.nn import MultiHeadAttention  # noqa: E402


# -- helpers --------------------------------------------------------------------------------------
def timeit(fn: Callable[[], object], warmup: int, repeats: int) -> tuple[float, float]:
    """(median, minimum) wall time of ``fn`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def first_crossing(ns: list[int], a: list[float], b: list[float]) -> float | None:
    """The first n where series a rises above series b (linear interpolation between grid points).

    Returns ns[0] if a is already above b there, None if a stays ≤ b over the whole grid.
    """
    diff = [x - y for x, y in zip(a, b)]
    if diff[0] > 0:
        return float(ns[0])
    for i in range(1, len(ns)):
        if diff[i] > 0:
            return ns[i - 1] + (ns[i] - ns[i - 1]) * (-diff[i - 1]) / (diff[i] - diff[i - 1])
    return None


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([f"\n### {title}\n", line, sep, *body])


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- (a) encoder training step vs n ----------------------------------------------------------------
def part_a(args: argparse.Namespace) -> dict:
    d, L, B, h = args.d_model, args.layers, args.batch, args.heads
    d_ff = 4 * d
    torch.manual_seed(0)
    tf = Encoder(Seq2SeqConfig(1, 1, d_model=d, n_heads=h, n_encoder_layers=L, n_decoder_layers=0, d_ff=d_ff,
                               dropout=0.0))
    lstm = nn.LSTM(d, d, num_layers=L, batch_first=True)
    rows = []
    for name, model in (("transformer", tf), ("lstm", lstm)):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        for n in args.lengths:
            x = torch.randn(B, n, d)

            def step() -> None:
                out = model(x)
                out = out[0] if isinstance(out, tuple) else out
                loss = out.square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            def fwd() -> None:
                with torch.no_grad():
                    model(x)

            t_step, min_step = timeit(step, args.warmup, args.repeats)
            t_fwd, min_fwd = timeit(fwd, args.warmup, args.repeats)
            macs = L * (F.encoder_layer_macs(n, d, h, d_ff) if name == "transformer" else F.lstm_layer_macs(n, d, d))
            rows.append({"model": name, "n": n, "step_s": t_step, "forward_s": t_fwd, "step_min_s": min_step,
                         "forward_min_s": min_fwd, "forward_macs": B * macs,
                         "forward_gflops_per_s": 2 * B * macs / t_fwd / 1e9,
                         "sequential_steps": F.sequential_steps("transformer_encoder" if name == "transformer" else "lstm",
                                                                n, L)})
            print(f"  (a) {name:11s} n={n:5d}  step {t_step * 1e3:9.1f} ms  forward {t_fwd * 1e3:9.1f} ms", flush=True)
    by = {m: [r for r in rows if r["model"] == m] for m in ("transformer", "lstm")}
    ratio = [{"n": t["n"], "lstm_over_transformer_step": l["step_s"] / t["step_s"],
              "lstm_over_transformer_forward": l["forward_s"] / t["forward_s"]}
             for t, l in zip(by["transformer"], by["lstm"])]
    return {
        "config": {"d_model": d, "n_layers": L, "batch": B, "n_heads": h, "d_ff": d_ff, "optimizer": "Adam",
                   "loss": "mean(out²)", "transformer": "attnkit Encoder (post-norm, ReLU, SDPA)",
                   "lstm": f"torch.nn.LSTM({d}, {d}, num_layers={L})"},
        "params": {"transformer": n_params(tf), "lstm": n_params(lstm)},
        "rows": rows,
        "ratios": ratio,
        "measured_crossover_step": first_crossing(args.lengths, [r["step_s"] for r in by["transformer"]],
                                                  [r["step_s"] for r in by["lstm"]]),
        "measured_crossover_forward": first_crossing(args.lengths, [r["forward_s"] for r in by["transformer"]],
                                                     [r["forward_s"] for r in by["lstm"]]),
    }


# -- (b) decoder: parallel teacher-forced pass vs sequential decoding -----------------------------
def part_b(args: argparse.Namespace) -> dict:
    d, L, B, h, V, S = args.d_model, args.layers, args.batch, args.heads, args.vocab, args.src_len
    d_ff = 4 * d
    torch.manual_seed(0)
    tf = Seq2SeqTransformer(Seq2SeqConfig(V, V, d_model=d, n_heads=h, n_encoder_layers=L, n_decoder_layers=L,
                                          d_ff=d_ff, dropout=0.0, max_len=max(1024, max(args.dec_lengths) + 1)))
    rnn = LSTMSeq2Seq(LSTMSeq2SeqConfig(V, V, d_model=d, n_layers=L, dropout=0.0))
    tf.eval()
    rnn.eval()
    src = torch.randint(3, V, (B, S))
    with torch.no_grad():
        memory, src_mask = tf.encode(src)
        r_memory, r_keep, r_state = rnn.encode(src)
        r_keys = rnn.attention.w_a(r_memory)
    opt = torch.optim.Adam(tf.parameters(), lr=1e-4)
    rows = []
    for n in args.dec_lengths:
        tgt = torch.randint(3, V, (B, n))
        mem_d = memory.detach()

        def tf_parallel() -> None:
            with torch.no_grad():
                tf.decode(tgt, memory, src_mask)

        def tf_train_step() -> None:  # teacher-forced decoder pass + backward + Adam (memory held fixed)
            logits = tf.decode(tgt, mem_d, src_mask)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def tf_cached() -> None:
            with torch.no_grad():
                cache = tf.init_cache(memory)
                for t in range(n):
                    tf.decode(tgt[:, t:t + 1], memory, src_mask, cache=cache)

        def tf_uncached() -> None:
            with torch.no_grad():
                for t in range(1, n + 1):
                    tf.decode(tgt[:, :t], memory, src_mask)[:, -1]

        def rnn_parallel() -> None:  # teacher forcing: one nn.LSTM call (the recurrence loops inside)
            with torch.no_grad():
                rnn.decode(tgt, r_memory, r_keep, r_state, keys=r_keys)

        def rnn_steps() -> None:
            with torch.no_grad():
                state = r_state
                for t in range(n):
                    _, state = rnn.decode(tgt[:, t:t + 1], r_memory, r_keep, state, keys=r_keys)

        row: dict[str, object] = {"n": n}
        for key, fn in (("tf_parallel_forward_s", tf_parallel), ("tf_train_step_s", tf_train_step),
                        ("tf_steps_kv_cache_s", tf_cached), ("tf_steps_no_cache_s", tf_uncached),
                        ("lstm_parallel_forward_s", rnn_parallel), ("lstm_steps_s", rnn_steps)):
            reps = args.repeats if key != "tf_steps_no_cache_s" or n <= 128 else max(1, args.repeats // 2)
            row[key], row[key[:-2] + "_min_s"] = timeit(fn, 1 if key.endswith("no_cache_s") else args.warmup, reps)
        row["macs_parallel"] = B * F.decoder_parallel_macs(n, S, d, h, d_ff, L, V)
        row["macs_kv_cache"] = B * F.decoder_inference_macs(n, S, d, h, d_ff, L, V, cache=True)
        row["macs_no_cache"] = B * F.decoder_inference_macs(n, S, d, h, d_ff, L, V, cache=False)
        rows.append(row)
        print(f"  (b) n={n:4d}  parallel {row['tf_parallel_forward_s'] * 1e3:8.1f} ms  train step "
              f"{row['tf_train_step_s'] * 1e3:8.1f} ms  cached {row['tf_steps_kv_cache_s'] * 1e3:8.1f} ms  "
              f"no cache {row['tf_steps_no_cache_s'] * 1e3:9.1f} ms  lstm tf {row['lstm_parallel_forward_s'] * 1e3:7.1f}"
              f" ms  lstm steps {row['lstm_steps_s'] * 1e3:7.1f} ms", flush=True)
    return {"config": {"d_model": d, "n_layers": L, "batch": B, "n_heads": h, "d_ff": d_ff, "vocab": V, "src_len": S,
                       "tokens": "fixed random target ids fed one by one (same work as greedy decoding, no argmax)"},
            "params": {"transformer": tf.num_parameters(), "lstm_seq2seq": rnn.num_parameters()},
            "rows": rows}


# -- (c) analytic counts ---------------------------------------------------------------------------
def part_c(args: argparse.Namespace, a: dict | None) -> dict:
    d = args.d_model
    d_ff = 4 * d
    rows = []
    for n in [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]:
        att = F.self_attention_macs(n, d, args.heads)
        layer = F.encoder_layer_macs(n, d, args.heads, d_ff)
        lstm = F.lstm_layer_macs(n, d, d)
        rows.append({"n": n, "attn_scores_n2d": n * n * d, "recurrence_nd2": n * d * d,
                     "attention_sublayer": att, "encoder_layer": layer, "lstm_layer": lstm,
                     "attention_over_lstm": att / lstm, "encoder_layer_over_lstm": layer / lstm,
                     "seq_steps_attention": F.sequential_steps("attention", n),
                     "seq_steps_lstm": F.sequential_steps("lstm", n)})
    c = F.crossovers(d, d_ff)
    out = {"d_model": d, "d_ff": d_ff, "rows": rows,
           "analytic_crossover": {"scores_n2d_vs_recurrence_nd2": c.scores_vs_recurrence,
                                  "attention_sublayer_vs_lstm_layer": c.attention_sublayer_vs_lstm,
                                  "encoder_layer_vs_lstm_layer": c.encoder_layer_vs_lstm}}
    if a is not None:
        out["measured_crossover_step"] = a["measured_crossover_step"]
        out["measured_crossover_forward"] = a["measured_crossover_forward"]
    return out


# -- (d) 8 heads of 64 vs 1 head of 512 ------------------------------------------------------------
def part_d(args: argparse.Namespace) -> dict:
    d, B = 512, args.heads_batch
    rows = []
    counts_checked = {}
    for impl in ("sdpa", "math"):
        for heads in (8, 1):
            torch.manual_seed(0)
            m = MultiHeadAttention(d, heads, impl=impl)
            m.load_state_dict(MultiHeadAttention(d, 8).state_dict())  # identical weights: same shapes
            for n in args.head_lengths:
                x = torch.randn(B, n, d, requires_grad=True)

                def fwd() -> None:
                    with torch.no_grad():
                        m(x)

                def fwd_bwd() -> None:
                    m.zero_grad(set_to_none=True)
                    m(x).sum().backward()

                t_f, min_f = timeit(fwd, args.warmup, args.repeats)
                t_fb, min_fb = timeit(fwd_bwd, args.warmup, args.repeats)
                macs = F.mha_macs(n, n, d, heads)
                rows.append({"impl": impl, "heads": heads, "head_dim": d // heads, "n": n, "forward_s": t_f,
                             "forward_backward_s": t_fb, "forward_min_s": min_f, "forward_backward_min_s": min_fb, "forward_macs": B * macs["total"],
                             "projection_macs": B * (macs["q_proj"] + macs["k_proj"] + macs["v_proj"] + macs["o_proj"]),
                             "score_macs": B * (macs["scores"] + macs["weighted_sum"]),
                             "softmax_elements": B * F.softmax_elements(n, n, heads)})
                print(f"  (d) {impl:4s} {heads}×{d // heads:<3d} n={n:5d}  forward {t_f * 1e3:8.2f} ms  "
                      f"fwd+bwd {t_fb * 1e3:8.2f} ms", flush=True)
    # FlopCounterMode on the real modules (math path: the counter cannot see inside the fused kernel)
    from torch.utils.flop_counter import FlopCounterMode
    n = args.head_lengths[0]
    x = torch.randn(1, n, d)
    for heads in (8, 1):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            MultiHeadAttention(d, heads, impl="math")(x)
        counts_checked[f"{heads}x{d // heads}"] = {"n": n, "flop_counter": fc.get_total_flops(),
                                                   "analytic_2x_macs": 2 * F.mha_macs(n, n, d, heads)["total"]}
    params = {f"{h_}x{d // h_}": n_params(MultiHeadAttention(d, h_)) for h_ in (8, 1)}
    return {"d_model": d, "batch": B, "params": params, "rows": rows, "flop_counter_check": counts_checked,
            "seed_003_claim": F.seed_003_claim(d, 8)}


# -- plotting ----------------------------------------------------------------------------------------
def _log_n_axis(ax, ns: list[int]) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    meta = res["meta"]
    fig.suptitle(f"attnkit parallelism benchmark — {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}",
                 fontsize=11)
    if "a" in res:
        ax = axes[0, 0]
        for model, style in (("transformer", "o-"), ("lstm", "s-")):
            rs = [r for r in res["a"]["rows"] if r["model"] == model]
            ax.plot([r["n"] for r in rs], [r["step_s"] * 1e3 for r in rs], style, label=f"{model} train step")
            ax.plot([r["n"] for r in rs], [r["forward_s"] * 1e3 for r in rs], style, alpha=0.4,
                    label=f"{model} forward")
        cfg = res["a"]["config"]
        ax.set(yscale="log", xlabel="sequence length n", ylabel="ms (median)",
               title=f"(a) encoder, d={cfg['d_model']}, {cfg['n_layers']} layers, batch {cfg['batch']}")
        _log_n_axis(ax, [r["n"] for r in res["a"]["rows"] if r["model"] == "lstm"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if "b" in res:
        ax = axes[0, 1]
        rs = res["b"]["rows"]
        ns = [r["n"] for r in rs]
        for key, label, style in (("tf_parallel_forward_s", "Transformer: 1 parallel pass (forward)", "o-"),
                                  ("tf_train_step_s", "Transformer: train step (fwd+bwd+Adam)", "o--"),
                                  ("tf_steps_kv_cache_s", "Transformer: n steps, KV cache", "^-"),
                                  ("tf_steps_no_cache_s", "Transformer: n steps, no cache", "v-"),
                                  ("lstm_parallel_forward_s", "LSTM: teacher-forced pass", "s-"),
                                  ("lstm_steps_s", "LSTM: n steps", "D-")):
            ax.plot(ns, [r[key] * 1e3 for r in rs], style, label=label)
        cfg = res["b"]["config"]
        ax.set(yscale="log", xlabel="target tokens n", ylabel="ms (median)",
               title=f"(b) decoder, d={cfg['d_model']}, {cfg['n_layers']} layers, batch {cfg['batch']}, "
                     f"source {cfg['src_len']}")
        _log_n_axis(ax, ns)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if "c" in res:
        ax = axes[1, 0]
        rs = res["c"]["rows"]
        ns = [r["n"] for r in rs]
        ax.plot(ns, [r["attention_sublayer"] for r in rs], "o-", label="self-attention sublayer 4nd²+2n²d")
        ax.plot(ns, [r["encoder_layer"] for r in rs], "o--", label="encoder layer (+FFN 8nd²)")
        ax.plot(ns, [r["lstm_layer"] for r in rs], "s-", label="LSTM layer 8nd²")
        ax.plot(ns, [r["attn_scores_n2d"] for r in rs], ":", label="Table 1: n²d")
        ax.plot(ns, [r["recurrence_nd2"] for r in rs], ":", label="Table 1: nd²")
        ax.set(yscale="log", xlabel="sequence length n", ylabel="multiply-adds per layer (batch 1)",
               title=f"(c) counted cost per layer, d={res['c']['d_model']}")
        _log_n_axis(ax, ns)
        cx = res["c"]["analytic_crossover"]["attention_sublayer_vs_lstm_layer"]
        ax.axvline(cx, color="gray", lw=0.8)
        ax.text(cx, ax.get_ylim()[0] * 3, f" attention = LSTM\n at n = 2d = {cx:.0f}", fontsize=8)
        mx = res["c"].get("measured_crossover_step")
        if mx is not None:
            ax.axvline(mx, color="tab:blue", lw=0.8, ls="--")
            ax.text(mx, ax.get_ylim()[0] * 30, f" measured (a):\n n ≈ {mx:.0f}", fontsize=8, color="tab:blue")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if "d" in res:
        ax = axes[1, 1]
        for impl in ("sdpa", "math"):
            for heads, style in ((8, "o-"), (1, "s--")):
                rs = [r for r in res["d"]["rows"] if r["impl"] == impl and r["heads"] == heads]
                if rs:
                    ax.plot([r["n"] for r in rs], [r["forward_backward_s"] * 1e3 for r in rs], style,
                            alpha=1.0 if impl == "sdpa" else 0.5, label=f"{heads}×{512 // heads} ({impl}) fwd+bwd")
        ax.set(yscale="log", xlabel="sequence length n", ylabel="ms (median)",
               title=f"(d) MultiHeadAttention d=512, batch {res['d']['batch']}: counted MACs identical")
        _log_n_axis(ax, sorted({r["n"] for r in res["d"]["rows"]}))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------
def print_tables(res: dict) -> None:
    if "a" in res:
        a = res["a"]
        t = {r["n"]: r for r in a["rows"] if r["model"] == "transformer"}
        l_ = {r["n"]: r for r in a["rows"] if r["model"] == "lstm"}
        print(table(f"(a) encoder training step vs n — d={a['config']['d_model']}, {a['config']['n_layers']} layers, "
                    f"batch {a['config']['batch']}; params: Transformer {a['params']['transformer']:,}, "
                    f"LSTM {a['params']['lstm']:,}",
                    ["n", "TF step ms", "LSTM step ms", "LSTM/TF step", "TF fwd ms", "LSTM fwd ms", "LSTM/TF fwd",
                     "TF GFLOP/s fwd", "LSTM GFLOP/s fwd", "seq. steps TF", "seq. steps LSTM"],
                    [[n, t[n]["step_s"] * 1e3, l_[n]["step_s"] * 1e3, l_[n]["step_s"] / t[n]["step_s"],
                      t[n]["forward_s"] * 1e3, l_[n]["forward_s"] * 1e3, l_[n]["forward_s"] / t[n]["forward_s"],
                      t[n]["forward_gflops_per_s"], l_[n]["forward_gflops_per_s"], t[n]["sequential_steps"],
                      l_[n]["sequential_steps"]] for n in t]))
    if "b" in res:
        b = res["b"]
        print(table(f"(b) decoder — d={b['config']['d_model']}, {b['config']['n_layers']} layers, batch "
                    f"{b['config']['batch']}, source length {b['config']['src_len']}, vocab {b['config']['vocab']}",
                    ["n", "TF parallel fwd ms", "TF train step ms", "TF n steps KV ms", "TF n steps no-cache ms",
                     "steps KV / parallel", "no-cache / KV", "LSTM t.f. ms", "LSTM n steps ms", "GMAC par", "GMAC KV",
                     "GMAC no-cache"],
                    [[r["n"], r["tf_parallel_forward_s"] * 1e3, r["tf_train_step_s"] * 1e3,
                      r["tf_steps_kv_cache_s"] * 1e3, r["tf_steps_no_cache_s"] * 1e3,
                      r["tf_steps_kv_cache_s"] / r["tf_parallel_forward_s"],
                      r["tf_steps_no_cache_s"] / r["tf_steps_kv_cache_s"], r["lstm_parallel_forward_s"] * 1e3,
                      r["lstm_steps_s"] * 1e3, r["macs_parallel"] / 1e9, r["macs_kv_cache"] / 1e9,
                      r["macs_no_cache"] / 1e9] for r in b["rows"]]))
    if "c" in res:
        c = res["c"]
        print(table(f"(c) counted multiply-adds per layer (batch 1), d={c['d_model']}, d_ff={c['d_ff']}",
                    ["n", "n²d", "nd²", "self-attn 4nd²+2n²d", "enc. layer +FFN", "LSTM 8nd²", "attn/LSTM",
                     "layer/LSTM", "seq. steps attn", "seq. steps LSTM"],
                    [[r["n"], r["attn_scores_n2d"], r["recurrence_nd2"], r["attention_sublayer"], r["encoder_layer"],
                      r["lstm_layer"], r["attention_over_lstm"], r["encoder_layer_over_lstm"],
                      r["seq_steps_attention"], r["seq_steps_lstm"]] for r in c["rows"]]))
        cx = c["analytic_crossover"]
        print(f"\nanalytic crossover (attention count > LSTM count): n²d vs nd² at n = {cx['scores_n2d_vs_recurrence_nd2']:.0f};"
              f" attention sublayer vs LSTM layer at n = {cx['attention_sublayer_vs_lstm_layer']:.0f};"
              f" encoder layer (with FFN) vs LSTM layer: "
              f"{'never (always more)' if cx['encoder_layer_vs_lstm_layer'] is None else cx['encoder_layer_vs_lstm_layer']}")
        if "measured_crossover_step" in c:
            def say(v: float | None) -> str:
                return "none in the measured range (Transformer faster at every n)" if v is None else f"n ≈ {v:.0f}"
            print(f"measured crossover (Transformer time > LSTM time): train step {say(c['measured_crossover_step'])};"
                  f" forward {say(c['measured_crossover_forward'])}")
    if "d" in res:
        d = res["d"]
        rows = []
        for impl in ("sdpa", "math"):
            for n in sorted({r["n"] for r in d["rows"]}):
                e = next(r for r in d["rows"] if r["impl"] == impl and r["heads"] == 8 and r["n"] == n)
                o = next(r for r in d["rows"] if r["impl"] == impl and r["heads"] == 1 and r["n"] == n)
                rows.append([impl, n, e["forward_macs"] / 1e9, o["forward_macs"] / 1e9, e["forward_s"] * 1e3,
                             o["forward_s"] * 1e3, e["forward_s"] / o["forward_s"], e["forward_backward_s"] * 1e3,
                             o["forward_backward_s"] * 1e3, e["forward_backward_s"] / o["forward_backward_s"]])
        print(table(f"(d) 8 heads × 64 vs 1 head × 512, d_model 512, batch {d['batch']}; params 8×64 "
                    f"{d['params']['8x64']:,}, 1×512 {d['params']['1x512']:,}",
                    ["impl", "n", "GMAC 8×64", "GMAC 1×512", "fwd ms 8×64", "fwd ms 1×512", "fwd 8×64/1×512",
                     "f+b ms 8×64", "f+b ms 1×512", "f+b 8×64/1×512"], rows))
        s = d["seed_003_claim"]
        print(f"\nseed 003's arithmetic: one head 512·512 = {s['one_head']:,}, 8 heads 8·64·64 = {s['multi_head']:,} "
              f"(claims 8× less). FlopCounterMode on the modules: "
              + ", ".join(f"{k}: {v['flop_counter']:,} FLOPs (analytic {v['analytic_2x_macs']:,}) at n={v['n']}"
                          for k, v in d["flop_counter_check"].items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parallelism", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a fast smoke run (short lengths, fewer repeats)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads (default: all cores)")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. 'ad' (default: abcd)")
    p.add_argument("--d-model", type=int, default=256, help="width for (a), (b), (c) (default 256)")
    p.add_argument("--layers", type=int, default=2, help="layers of each model in (a), (b) (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads in (a), (b) (default 4: width 64)")
    p.add_argument("--batch", type=int, default=8, help="batch size in (a), (b) (default 8)")
    p.add_argument("--vocab", type=int, default=1000, help="vocabulary in (b) (default 1000)")
    p.add_argument("--src-len", type=int, default=64, help="source length in (b) (default 64)")
    p.add_argument("--heads-batch", type=int, default=4, help="batch size in (d) (default 4)")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths for (a) (default 32 … 1024)")
    p.add_argument("--dec-lengths", type=int, nargs="+", help="target lengths for (b) (default 16 … 256)")
    p.add_argument("--head-lengths", type=int, nargs="+", help="sequence lengths for (d) (default 128 … 2048)")
    p.add_argument("--warmup", type=int, help="untimed runs before timing (default 2; quick 1)")
    p.add_argument("--repeats", type=int, help="timed runs; the median is reported (default 5; quick 2)")
    p.add_argument("--out-json", type=Path, help="default docs/results/parallelism.json (quick: parallelism_quick.json)")
    p.add_argument("--from-json", type=Path, help="re-print the tables and redraw the plot of a saved run "
                   "(no measuring); writes --out-png (default: the JSON's name with .png under docs/img/)")
    p.add_argument("--out-png", type=Path, help="default docs/img/parallelism.png (quick: parallelism_quick.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json is not None:
        try:
            res = json.loads(args.from_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"parallelism: cannot read {args.from_json}: {e}", file=sys.stderr)
            return 2
        print_tables(res)
        out_png = args.out_png or ROOT / "docs" / "img" / (args.from_json.stem + ".png")
        plot(res, out_png)
        print(f"\nwrote {out_png}")
        return 0
    q = args.quick
    args.lengths = args.lengths or ([32, 64, 128] if q else [32, 64, 128, 256, 512, 1024])
    args.dec_lengths = args.dec_lengths or ([16, 32] if q else [16, 32, 64, 128, 256])
    args.head_lengths = args.head_lengths or ([128, 256] if q else [128, 256, 512, 1024, 2048])
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.repeats = args.repeats if args.repeats is not None else (2 if q else 5)
    suffix = "_quick" if q else ""
    args.out_json = args.out_json or ROOT / "docs" / "results" / f"parallelism{suffix}.json"
    args.out_png = args.out_png or ROOT / "docs" / "img" / f"parallelism{suffix}.png"
    bad = set(args.parts) - set("abcd")
    if bad:
        print(f"parallelism: unknown part(s) {sorted(bad)}; choose from a, b, c, d", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"parallelism: --threads must be ≥ 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res: dict = {"meta": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "platform": platform.platform(), "quick": q, "warmup": args.warmup,
                          "repeats": args.repeats, "argv": sys.argv[1:] if argv is None else argv,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                          "torch_imported_before_benchmark": _TORCH_PREIMPORTED,
                          "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
                          "timing": "median wall time (time.perf_counter), float32, CPU, dropout off"}}
    print(f"parallelism benchmark: {res['meta']['cpu']}, {res['meta']['threads']} threads, torch {torch.__version__}",
          flush=True)
    if "a" in args.parts:
        res["a"] = part_a(args)
    if "b" in args.parts:
        res["b"] = part_b(args)
    if "c" in args.parts:
        res["c"] = part_c(args, res.get("a"))
    if "d" in args.parts:
        res["d"] = part_d(args)
    res["meta"]["wall_s"] = time.perf_counter() - t0
    res["meta"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print_tables(res)
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(res, indent=1))
    plot(res, args.out_png)
    print(f"\nwrote {args.out_json} and {args.out_png} ({res['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
