"""Tensor parallelism at 2 ranks (gloo, two processes) against one process on the same tiny GGUF files: the
logits of a float and a block-quantized Llama, a Qwen3 (q/k norms), a Qwen3-MoE and an HF Phi-3 (fused q/k/v and
gate/up in its checkpoint) within 1e-5, the engine's greedy tokens identical (batching,
chunked prefill, prefix caching, preemption, q8_0 KV, attention sinks, SnapKV, a speculative draft model and a layer-skip draft, a LoRA adapter), two all-reduces of d_model values per layer and decode
token, and a rank that stops is a clear error on the other, not a hang."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from attnkit.engine import EngineConfig, SamplingParams
from attnkit.engine.speculative import SpeculativeConfig
from attnkit.engine.llm import LLM
from attnkit.loading import load_causal_lm
from attnkit.loading.gguf_writer import write_llama_gguf
from attnkit.parallel.launch import free_port, join_group
from attnkit.parallel.tensor import TensorParallel, TensorParallelError

SHAPE = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256, vocab_size=510, weight_std=0.5,
             tied_embeddings=False)  # 510: the vocabulary is padded to 2 × 255 rows
IDS = [1, 5, 9, 200, 33, 7, 400, 12, 509, 0]
#: (name, engine settings): batching with chunked prefill and a shared prefix; preemption; q8_0 and q4_0 K/V pools
SCENARIOS = [("batched", dict(block_size=4, max_num_batched_tokens=64)),
             ("preempted", dict(block_size=4, num_blocks=24, max_num_batched_tokens=48)),
             ("q8_0", dict(block_size=16, kv_cache_dtype="q8_0")),
             # a q4_0 pool with its exact blocks (attnkit.engine.kv_tail): every rank keeps the tail of its heads
             ("q4_0", dict(block_size=4, kv_cache_dtype="q4_0", max_num_batched_tokens=64)),
             # speculative decoding: a whole draft model on rank 0 (always proposing), its drafts verified by the split
             ("draft", dict(block_size=16, speculative=SpeculativeConfig("draft", draft_model="{f32}", adaptive=False))),
             # a layer-skip draft: the target's first layer, split as the target, every rank running it
             ("layerskip", dict(block_size=16, speculative=SpeculativeConfig("layerskip", draft_layers=1, adaptive=False))),
             # K/V dropped: attention sinks (blocks re-rotated) and SnapKV (compacted), each broadcast as a step
             ("sinks", dict(block_size=8, max_num_batched_tokens=32), dict(kv_window=24, attention_sinks=4)),
             ("snapkv", dict(block_size=8, max_num_batched_tokens=32), dict(kv_budget=24))]


def _config(cfg: dict, files: dict[str, str]) -> EngineConfig:
    spec = cfg.get("speculative")
    if spec is not None and spec.draft_model:
        cfg = dict(cfg, speculative=replace(spec, draft_model=spec.draft_model.format(**files)))
    return EngineConfig(**cfg)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 510, (24,), generator=g).tolist()
    out = [torch.randint(0, 510, (int(n),), generator=g).tolist() for n in torch.randint(3, 50, (10,), generator=g)]
    return out + [shared + p[:5] for p in out[:4]]


def _generate(llm: LLM, **params) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(_prompts(), SamplingParams(temperature=0, max_tokens=12, **params))]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    return {"f32": str(write_llama_gguf(d / "tiny-f32.gguf", SHAPE, "F32")),
            "q8_0": str(write_llama_gguf(d / "tiny-q8_0.gguf", dict(SHAPE, tied_embeddings=True), "Q8_0")),
            "qwen3_f32": str(write_llama_gguf(d / "tiny-qwen3.gguf", dict(SHAPE, arch="qwen3"), "F32")),  # q/k norms
            "moe_q8_0": str(write_llama_gguf(d / "tiny-moe.gguf", dict(SHAPE, arch="qwen3moe", n_experts=4,
                                                                       n_experts_per_tok=2, moe_d_ff=128), "Q8_0")),
            "phi3_hf": _phi3_dir(d / "phi3")}


@pytest.fixture(scope="module")
def adapter(files, tmp_path_factory):
    """A random LoRA adapter (PEFT's format) on every projection of the float Llama, column- and row-parallel."""
    from attnkit.peft import LoraConfig, get_peft_model

    peft = get_peft_model(load_causal_lm(files["f32"]).model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    directory = tmp_path_factory.mktemp("lora")
    peft.save_pretrained(directory)
    return str(directory)


def _with_lora(llm: LLM, directory: str) -> list[list[int]]:
    """Half the prompts through the adapter, half through the base, in one batch."""
    llm.load_lora("a", directory)
    prompts = _prompts()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12), lora=["a", None] * (len(prompts) // 2))
    return [o.token_ids for o in outs]


def _phi3_dir(path) -> str:
    """An HF Phi-3 directory: q/k/v and gate/up fused in its checkpoint, LongRoPE."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Phi3Config(vocab_size=510, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  original_max_position_embeddings=32, rope_scaling={
                                      "rope_type": "longrope", "short_factor": [1.0 + i / 16 for i in range(8)],
                                      "long_factor": [2.0 + i / 4 for i in range(8)]}, pad_token_id=0)
    transformers.Phi3ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def _load(path: str, key: str, tp: TensorParallel | None = None) -> torch.nn.Module:
    """The model of one of the files (an HF directory has no tokenizer here: the model alone)."""
    if key.endswith("_hf"):
        from attnkit.loading.hf import load_hf_model, model_config, read_json

        model = load_hf_model(path, tp=tp)
        cfg = model_config(read_json(Path(path) / "config.json"), Path(path) / "config.json")
        return model if tp is None else tp.parallelize(model, cfg)
    quantize = None if key.endswith("f32") else "gguf"
    return load_causal_lm(path, quantize=quantize, tp=tp).model


def _ranks(rank: int, port: int, files: dict[str, str], lora: str, out: str) -> None:
    """Rank 0 runs the checks and writes what it saw to ``out``; rank 1 serves its steps, then stops abruptly."""
    from attnkit.parallel.engine import attach, serve_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tp = join_group(rank, 2, threads=1, timeout_s=20)
    models = {k: _load(p, k, tp) for k, p in files.items()}
    logits, counts = {}, {}
    with torch.inference_mode():  # every rank takes part in the collectives of a plain forward
        for k, m in models.items():
            tp.reset_counters()
            logits[k], counts[k] = m(torch.tensor([IDS])), dict(tp.counts)
        assert tp.shm is not None  # two ranks of one machine exchange through shared memory …
        shm, tp.shm = tp.shm, None
        logits["f32_gloo"] = models["f32"](torch.tensor([IDS]))  # … or through gloo, as across machines
        tp.shm = shm
    if rank == 1:
        serve_worker(models["f32"], tp)
        os._exit(3)  # a rank that dies: no orderly leaving of the group
    report: dict = {"forward_counts": counts}
    save_file({k: v.contiguous() for k, v in logits.items()}, out + ".logits")
    for name, cfg, *params in SCENARIOS:
        llm = LLM.from_model(models["f32"], None, _config(cfg, files), eos_ids=set())
        runner = attach(llm.engine, tp).runner
        report[name] = _generate(llm, **(params[0] if params else {}))
        report[name + "_preemptions"] = llm.engine.scheduler.num_preemptions
        if llm.engine.spec is not None:
            report[name + "_accepted"] = llm.engine.spec.stats.accepted
        if name == "batched":  # a new prompt of 10 rows in one step, then one decode row: what they move
            tp.reset_counters()
            llm.generate([IDS[::-1]], SamplingParams(temperature=0, max_tokens=2))
            report["two_steps"] = {"bytes": tp.bytes_reduced, "counts": dict(tp.counts)}
        runner.close(stop_workers=False)
    llm = LLM.from_model(models["f32"], None, EngineConfig(block_size=4), eos_ids=set())
    runner = attach(llm.engine, tp).runner
    report["lora"] = _with_lora(llm, lora)  # every rank loads its slice of the adapter
    runner.close()
    time.sleep(0.5)  # rank 1 has gone
    llm = LLM.from_model(models["f32"], None, EngineConfig(block_size=4), eos_ids=set())
    t0 = time.perf_counter()
    try:
        attach(llm.engine, tp)
        _generate(llm)
    except TensorParallelError as e:
        report["error"] = str(e)
    report["error_seconds"] = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump(report, f)
    os._exit(0)  # the group is broken: no orderly teardown


def _spawn(files: dict[str, str], lora: str, out: str) -> dict:
    ctx = mp.start_processes(_ranks, args=(free_port(), files, lora, out), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while any(p.is_alive() for p in ctx.processes) and time.monotonic() < deadline:
        time.sleep(0.2)  # not ctx.join(): it would end rank 0 as soon as rank 1 stops
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for i, p in enumerate(ctx.processes):  # a rank's exception raised here, with its traceback
        if p.exitcode not in (0, 3):
            ctx.join()
    assert os.path.exists(out), f"rank 0 wrote no report (exit codes {[p.exitcode for p in ctx.processes]})"
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def report(files, adapter, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tp-report") / "report.json")
    return _spawn(files, adapter, out), load_file(out + ".logits")


def test_two_ranks_equal_one_process(files, adapter, report):
    report, logits = report
    for key, path in files.items():
        one = _load(path, key)
        with torch.inference_mode():
            ref = one(torch.tensor([IDS]))
        assert logits[key].shape == ref.shape == (1, len(IDS), 510), key
        # within 1e-5 of the logits' scale (float32 sums in another order: rank halves, then the all-reduce)
        err = (logits[key] - ref).abs().max() / ref.abs().max()
        assert err < 1e-5, (key, float(err), float(ref.abs().max()))
    assert torch.equal(logits["f32_gloo"], logits["f32"])  # either transport: the same sums
    model = load_causal_lm(files["f32"]).model
    for name, cfg, *params in SCENARIOS:
        one = LLM.from_model(model, None, _config(cfg, files), eos_ids=set())
        assert report[name] == _generate(one, **(params[0] if params else {})), name
    assert report["preempted_preemptions"] > 0
    plain = _generate(LLM.from_model(model, None, EngineConfig(block_size=4), eos_ids=set()))
    with_lora = _with_lora(LLM.from_model(load_causal_lm(files["f32"]).model, None, EngineConfig(block_size=4),
                                          eos_ids=set()), adapter)
    assert report["lora"] == with_lora and with_lora[0::2] != plain[0::2] and with_lora[1::2] == plain[1::2]
    assert report["draft_accepted"] > 0 and report["layerskip_accepted"] > 0  # drafts verified through the split
    assert report["sinks"] != report["batched"] and report["snapkv"] != report["batched"]  # K/V were dropped
    # per row through the model: 2 all-reduces of d_model float32 values per layer, 1 for its embedding; the
    # head's gather moves each rank's 255 logits per sampled row (11 rows: the prompt's 10, one decode)
    two = report["two_steps"]
    L, d = SHAPE["n_layers"], SHAPE["d_model"]
    # a forward: 2 all-reduces per layer; + 1 for a split embedding (float); a GGUF table viewed whole needs none
    assert report["forward_counts"]["f32"] == {"all_reduce": 2 * L + 1, "all_gather": 1}
    assert report["forward_counts"]["q8_0"] == {"all_reduce": 2 * L, "all_gather": 1}
    assert two["counts"] == {"all_reduce": 2 * (2 * L + 1), "all_gather": 2}
    assert two["bytes"] == 11 * (2 * L + 1) * d * 4 + 2 * 255 * 4


def test_a_rank_that_stops_is_a_clear_error(report):
    report, _ = report
    error = report.get("error", "")
    assert "tensor-parallel rank 0/2: the step broadcast failed — rank 1 (pid " in error and "exited" in error, report
    assert report["error_seconds"] < 25  # within the group's 20 s timeout, not a hang


def test_what_the_split_refuses():
    from attnkit.models.llama import LlamaConfig

    tp = TensorParallel(0, 2)
    with pytest.raises(ValueError, match="n_kv_heads 3 is not divisible by 2 ranks"):
        tp.local_config(LlamaConfig(vocab_size=10, d_model=48, n_layers=1, n_heads=6, n_kv_heads=3, d_ff=64))
    with pytest.raises(ValueError, match="the experts' d_ff 33 is not divisible by 2 ranks"):
        tp.local_config(LlamaConfig(vocab_size=10, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                                    n_experts=4, n_experts_per_tok=2, moe_d_ff=33))
    local = tp.local_config(LlamaConfig(vocab_size=11, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64))
    assert (local.n_heads, local.n_kv_heads, local.d_ff, local.vocab_size, local.hd) == (2, 1, 32, 6, 16)
    with pytest.raises(ValueError, match="rank 2 of a world of 2"):
        join_group(2, 2)


def test_serve_tensor_parallel_size_2(tmp_path):
    """``attnkit serve --tensor-parallel-size 2``: one worker spawned, the server on rank 0 answers as one process."""
    import httpx

    from attnkit.cli import build_parser
    from attnkit.serve.cli import build_from_args
    from serve_helpers import running

    path = write_llama_gguf(tmp_path / "small.gguf", dict(SHAPE, vocab_size=None, tied_embeddings=True), "Q8_0")
    flags = ["serve", "--model", str(path), "--no-embeddings", "--kv-cache-mb", "8", "--threads", "1"]
    body = {"model": "small", "prompt": "Tensor parallel", "max_tokens": 6, "temperature": 0}
    with pytest.raises(ValueError, match="--tensor-parallel-size must be at least 1"):
        build_from_args(build_parser().parse_args([*flags, "--tensor-parallel-size", "0"]))
    app, one = build_from_args(build_parser().parse_args(flags))
    with running(app) as base:
        want = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    app, engine = build_from_args(build_parser().parse_args([*flags, "--tensor-parallel-size", "2", "--dist-timeout", "30"]))
    try:
        with running(app) as base:
            got = httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert engine.runner.tp.counts["all_reduce"] > 0 and got == want
    finally:
        engine.runner.close()
        engine.runner.tp.workers.join(30)
        dist.destroy_process_group()
    # two replicas, each rank 0 of its own group of two (four processes): each answers as one process does
    app, router = build_from_args(build_parser().parse_args([*flags, "--tensor-parallel-size", "2",
                                                            "--data-parallel-size", "2", "--dist-timeout", "30"]))
    try:
        assert [r.tensor_parallel for r in router.replicas] == [2, 2]
        with running(app) as base:
            got = [httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
                   for _ in range(4)]
        assert got == [want] * 4 and sorted(router.routed.values()) == [0, 0, 1, 1]
    finally:
        router.close()
    assert not any(r.process.is_alive() for r in router.replicas)
