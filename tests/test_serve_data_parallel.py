"""Data-parallel serving (attnkit.engine.data_parallel): two replica processes of a tiny random Llama behind one
server. Greedy outputs equal one in-process engine's; requests sharing a prefix stay on one replica while distinct
ones spread by load; aborts reach the replica; a killed replica fails its requests with a 503 naming it while the
other keeps serving; a LoRA adapter is on every replica. One router serves every test (spawned processes import
torch: seconds each)."""

from __future__ import annotations

import asyncio
import functools
import os
import pickle
import signal
import threading
from collections import OrderedDict

import httpx
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from attnkit.cli import main  # noqa: E402
from attnkit.engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from attnkit.engine import CompletionOutput, RequestMetrics, RequestOutput, StructuredOutputs  # noqa: E402
from attnkit.engine.data_parallel import DataParallelEngine, ReplicaDiedError, _Replica, _SpecSum  # noqa: E402
from attnkit.engine.dp_replica import output_from_wire, output_to_wire, params_from_wire, params_to_wire  # noqa: E402
from attnkit.peft import LoraConfig, get_peft_model  # noqa: E402
from attnkit.serve import build_app  # noqa: E402
from dp_helpers import SHAPE, tiny_replica  # noqa: E402
from engine_helpers import skip_module_without_default_model, tiny_llama, tokenizer  # noqa: E402,F401
from serve_helpers import TINY, metric, running, wait_for  # noqa: E402

skip_module_without_default_model()


@pytest.fixture(scope="module")
def adapter(tokenizer, tmp_path_factory) -> str:
    peft = get_peft_model(tiny_llama(tokenizer.vocab_size, **SHAPE), LoraConfig(r=4, lora_alpha=8,
                                                                                target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in peft.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g))
    directory = tmp_path_factory.mktemp("poet")
    peft.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def router(tokenizer, adapter):
    dp = DataParallelEngine(functools.partial(tiny_replica, (("poet", adapter),)), 2, tokenizer, threads=1)
    yield dp
    dp.close()


@pytest.fixture(scope="module")
def base(router):
    with running(build_app(router, TINY)) as url:
        yield url


@pytest.fixture(scope="module")
def offline(tokenizer, adapter):
    """(an LLM on the base, an engine with the adapter), both in this process."""
    llm = LLM.from_model(tiny_llama(tokenizer.vocab_size, **SHAPE), tokenizer, EngineConfig(), eos_ids=tokenizer.eos_ids)
    return llm, tiny_replica((("poet", adapter),))


def complete(base: str, prompt, **kw) -> httpx.Response:
    body = {"model": TINY, "prompt": prompt, "temperature": 0, "max_tokens": 8} | kw
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60)


def ids_of(router, resp: httpx.Response, n: int) -> list[int]:
    return [router.routed[f"{resp.json()['id']}-{i}"] for i in range(n)]


def test_greedy_outputs_equal_one_engine_and_distinct_prompts_spread(base, router, offline, tokenizer):
    prompts = [[(97 * i + 13 * j) % tokenizer.vocab_size for j in range(5 + 7 * i)] for i in range(6)]
    ref = offline[0].generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=2))
    r = complete(base, prompts, max_tokens=12, logprobs=2)
    assert r.status_code == 200, r.text
    got = r.json()["choices"]
    assert [c["text"] for c in got] == [o.text for o in ref]
    assert [c["finish_reason"] for c in got] == [o.finish_reason for o in ref]
    for c, o in zip(got, ref):  # logprobs survive the pipe
        assert c["logprobs"]["token_logprobs"] == pytest.approx([lp[t] for lp, t in zip(o.outputs[0].logprobs,
                                                                                            o.token_ids)], abs=1e-5)
    assert r.json()["usage"]["completion_tokens"] == sum(len(o.token_ids) for o in ref)
    assert sorted(set(ids_of(router, r, len(prompts)))) == [0, 1]  # six distinct prompts at once: both replicas
    # streamed chat through the template, too
    chat = {"model": TINY, "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
            "max_tokens": 10}
    whole = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=60).json()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat | {"stream": True}, timeout=60) as s:
        text = "".join(__import__("json").loads(line[5:])["choices"][0]["delta"].get("content") or ""
                       for line in s.iter_lines() if line.startswith("data: {"))
    assert text == whole["choices"][0]["message"]["content"]


def test_a_shared_prefix_stays_on_one_replica(base, router, tokenizer):
    prefix = [(31 * j + 7) % tokenizer.vocab_size for j in range(40)]  # two full blocks and a bit
    for trial in range(2):
        prompts = [prefix + [100 + 10 * trial + i] * (i + 1) for i in range(4)]
        r = complete(base, prompts)  # four at once: loads 1..3 on one replica stay within the margin
        assert r.status_code == 200, r.text
        assert len(set(ids_of(router, r, 4))) == 1
    assert metric(base, "attnkit_prefix_cache_hits_total") >= 2 * 3  # the 2nd..4th of each found the prefix


def test_routing_falls_back_to_the_least_loaded_beyond_the_margin(tokenizer):
    dp = DataParallelEngine.__new__(DataParallelEngine)  # the policy alone: no processes
    dp.replicas = [_Replica(0, None, None), _Replica(1, None, None)]
    dp.affinity_blocks, dp.affinity_margin = 4, 2
    dp._prefix, dp.routed = OrderedDict(), OrderedDict()
    dp.engine = type("Info", (), {"block_size": 16})()
    ids = list(range(50))
    picks = [dp._route(f"r{i}", ids + [i], None).index for i in range(4)]  # nothing finishes: loads grow
    assert picks == [0, 0, 0, 1]  # affinity while load 1, 2 <= 0 + 2; then the least loaded
    assert dp._route("short", [1, 2, 3], None).index == 1  # under one block: no affinity, least loaded (1 < 3)
    assert dp._route("other", list(range(100, 150)), None).index == 1
    dp.replicas[1].dead = "gone"
    assert dp._route("x", ids, None).index == 0
    dp.replicas[0].dead = "gone too"
    with pytest.raises(ReplicaDiedError, match="no data-parallel replica is alive"):
        dp._route("y", ids, None)


def test_speculative_counters_sum_over_replicas():
    a, b = _Replica(0, None, None), _Replica(1, None, None)
    a.spec = dict(proposed=10, accepted=6, verifications=4, emitted=10, rejected=2)
    b.spec = dict(proposed=5, accepted=5, verifications=2, emitted=7, rejected=0)
    st = _SpecSum([a, b, _Replica(2, None, None)]).stats  # the third: no report yet
    assert (st.proposed, st.accepted, st.verifications, st.emitted, st.rejected) == (15, 11, 6, 17, 2)
    assert st.acceptance_rate == pytest.approx(11 / 15)


def test_the_wire_format_round_trips():
    params = SamplingParams(n=2, temperature=0.5, top_k=-1, stop="x", logit_bias={5: 1.0}, seed=3, logprobs=2,
                            structured=StructuredOutputs(json={"type": "object"}, strict=False))
    sent = pickle.loads(pickle.dumps(params_to_wire(params)))
    assert params_from_wire(sent) == params and params_from_wire(None) is None
    out = RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "t", [3], "stop", 7, [{3: -0.1, 4: -2.0}])], True,
                        RequestMetrics(1.0, 2.0, 3.0, 1, 2), [None, {2: -1.0}])
    assert output_from_wire(pickle.loads(pickle.dumps(output_to_wire(out)))) == out


def test_abort_reaches_the_replica(router):
    async def go():
        stream = await router.add_request([5] * 20, SamplingParams(max_tokens=900, ignore_eos=True, temperature=0))
        async for out in stream:
            if len(out.token_ids) >= 3:
                break
        replica = router.routed[stream.request_id]
        before = router.replica_stats()[replica].aborted
        stream.close()
        return replica, before

    replica, before = asyncio.run(go())
    wait_for(lambda: router.replica_stats()[replica].aborted == before + 1, what="the replica to abort")
    assert router.replica_stats()[replica].running == 0 and router.num_unfinished_requests == 0
    assert router.stats().aborted >= 1


def test_bad_input_is_a_400_from_the_replica(base):
    r = complete(base, [10**7])
    assert r.status_code == 400 and "token ids" in r.text


def test_the_lora_adapter_is_on_every_replica(base, router, offline, tokenizer):
    prompts = [[(53 * i + 11 * j) % tokenizer.vocab_size for j in range(4 + 3 * i)] for i in range(4)]
    engine = offline[1]  # the same base and adapter in this process
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=8), lora="poet")
    ref = {}
    while engine.has_unfinished_requests():
        ref.update({o.request_id: o.text for o in engine.step() if o.finished})
    assert httpx.get(f"{base}/v1/models").json()["data"][1]["id"] == f"{TINY}:poet"
    r = complete(base, prompts, model=f"{TINY}:poet")
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [ref[k] for k in sorted(ref, key=int)]
    assert sorted(set(ids_of(router, r, len(prompts)))) == [0, 1]
    assert [c["text"] for c in r.json()["choices"]] != [c["text"] for c in complete(base, prompts).json()["choices"]]


def test_the_cli_refuses_a_bad_data_parallel_size(capsys):
    assert main(["serve", "--data-parallel-size", "0", "--no-embeddings"]) != 0
    assert "--data-parallel-size must be at least 1, got 0" in capsys.readouterr().err


def test_the_cli_refuses_data_parallel_replicas_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["serve", "--data-parallel-size", "2", "--no-embeddings"]) != 0
    assert "--data-parallel-size under torchrun is not supported" in capsys.readouterr().err


def test_a_killed_replica_fails_its_requests_and_the_other_serves(base, router):
    result: dict[str, object] = {}
    prefix = list(range(300, 320))  # one full block: both requests on one replica (affinity)
    body = {"max_tokens": 900, "ignore_eos": True}

    def stream() -> None:
        events = []
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60,
                          json={"model": TINY, "prompt": prefix + [2], "stream": True} | body) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    if len(events) == 3:
                        result["streaming"] = True
        result["events"] = events

    threads = [threading.Thread(target=lambda: result.setdefault("r", complete(base, prefix + [1], **body))),
               threading.Thread(target=stream)]
    threads[0].start()
    wait_for(lambda: router.num_unfinished_requests == 1, what="the request to start")
    threads[1].start()
    wait_for(lambda: "streaming" in result, what="the stream to start")
    victim = next(r for r in router.replicas if r.load == 2)
    os.kill(victim.process.pid, signal.SIGKILL)
    for t in threads:
        t.join(30)
    died = f"data-parallel replica {victim.index} (pid {victim.process.pid}) exited with code -9"
    r = result["r"]
    assert r.status_code == 503, r.text
    assert died in r.json()["error"]["message"] and r.json()["error"]["code"] == "replica_died"
    *_, error, done = result["events"]  # the stream had begun: the error is its last event
    assert died in error and '"replica_died"' in error and done == "data: [DONE]"
    for prompt in ("Hello there", "Another prompt entirely", "A third"):  # all go to the survivor
        ok = complete(base, prompt)
        assert ok.status_code == 200, ok.text
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert metric(base, "attnkit_num_requests_running") == 0


def test_drain_finishes_the_accepted_requests_then_shutdown_stops_every_replica(base, router):
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", complete(base, "Count to ten", max_tokens=200,
                                                                        ignore_eos=True)))
    t.start()
    wait_for(lambda: router.num_unfinished_requests == 1, what="the request to start")
    assert asyncio.run(router.drain(timeout=60)) is True  # waits for it
    t.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 200
    late = complete(base, "Too late")
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{base}/health").status_code == 503
    asyncio.run(router.shutdown())
    assert not any(r.process.is_alive() for r in router.replicas)
