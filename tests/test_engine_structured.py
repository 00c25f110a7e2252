"""Structured outputs in the engine (SamplingParams.structured): every kind holds on sampled outputs, constrained
and free requests share steps without touching each other, and greedy constrained decoding equals a plain
full-recompute loop that masks with its own xgrammar matcher."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from engine_helpers import skip_module_without_default_model, tiny_llama, tokenizer  # noqa: F401

from attnkit.engine import EngineConfig, LLMEngine, SamplingParams, SamplingParamsError, StructuredOutputs
from attnkit.engine.grammar import allowed_tokens

skip_module_without_default_model()

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def model(tokenizer):  # noqa: F811
    return tiny_llama(tokenizer.vocab_size, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=1024)


def _engine(model, tokenizer, **cfg) -> LLMEngine:  # noqa: F811
    cfg.setdefault("kv_cache_bytes", 16 << 20)
    return LLMEngine(model, tokenizer, EngineConfig(**cfg), tokenizer.eos_ids)


def _run(engine: LLMEngine, requests: list[tuple[str, SamplingParams]]) -> list:
    ids = [engine.add_request(p, sp) for p, sp in requests]
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            final[out.request_id] = out
    return [final[i] for i in ids]


def test_every_kind_holds_at_temperature_one(model, tokenizer):  # noqa: F811
    engine = _engine(model, tokenizer)
    specs = {
        "json": (StructuredOutputs(json=PERSON, disable_any_whitespace=True),
                 lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
        "json_object": (StructuredOutputs(json_object=True, disable_any_whitespace=True),
                        lambda t: isinstance(json.loads(t), dict)),
        "regex": (StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
        "choice": (StructuredOutputs(choice=["yes", "no", "maybe \"so\""]), lambda t: t in ("yes", "no", "maybe \"so\"")),
        "gbnf": (StructuredOutputs(grammar='root ::= "a" [0-9]{1,4} "b"'), lambda t: re.fullmatch(r"a[0-9]{1,4}b", t)),
        "lark": (StructuredOutputs(grammar='start: "x" NUM\nNUM: /[0-9]{2}/'), lambda t: re.fullmatch(r"x[0-9]{2}", t)),
    }
    reqs = [(f"Answer {kind}:", SamplingParams(n=4, temperature=1.0, seed=s, max_tokens=200, structured=spec))
            for kind, (spec, _) in specs.items() for s in range(3)]
    reqs.append(("Free text:", SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=20)))  # shares the steps
    outs = _run(engine, reqs)
    kinds = [k for k in specs for _ in range(3)]
    for kind, out in zip(kinds, outs):
        for c in out.outputs:
            if kind == "json_object" and c.finish_reason == "length":
                continue  # any object: a random model may write one string for ever (its text is checked below)
            assert c.finish_reason == "stop", (kind, c.text)
            assert specs[kind][1](c.text), (kind, c.text)
    objects = [c for o, k in zip(outs, kinds) if k == "json_object" for c in o.outputs]
    assert sum(c.finish_reason == "stop" for c in objects) >= 3
    assert all(c.text.startswith("{") for c in objects)
    assert max(len(c.token_ids) for c in objects) > 2  # not only "{}": the grammar leaves the model room


def test_constrained_rows_leave_free_rows_alone(model, tokenizer):  # noqa: F811
    """A free request's tokens are the same alone and beside constrained ones (the mask stays in its rows)."""
    free = ("Tell me a story", SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True))
    alone = _run(_engine(model, tokenizer), [free])[0].outputs[0].token_ids
    mixed = _run(_engine(model, tokenizer), [
        ("Pick:", SamplingParams(temperature=1.0, seed=1, max_tokens=24, structured=StructuredOutputs(choice=["x", "y"]))),
        free,
        ("JSON:", SamplingParams(temperature=1.0, seed=2, max_tokens=200,
                                 structured=StructuredOutputs(json=PERSON, disable_any_whitespace=True))),
    ])
    assert mixed[1].outputs[0].token_ids == alone


@torch.inference_mode()
def _reference_greedy(model, tokenizer, prompt: list[int], grammar, max_tokens: int) -> list[int]:  # noqa: F811
    """Full recompute each token; mask the logits with an independent matcher of the same compiled grammar."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(grammar)
    ids, out = list(prompt), []
    V = model.cfg.vocab_size
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids]))[0, -1].float()
        mask = xgrammar.allocate_token_bitmask(1, V)
        matcher.fill_next_token_bitmask(mask)
        ok = torch.zeros(V, dtype=torch.bool)
        ok[allowed_tokens(mask[0], V)] = True
        tok = int(logits.masked_fill(~ok, float("-inf")).argmax())
        out.append(tok)
        ids.append(tok)
        assert matcher.accept_token(tok)
        if tok in tokenizer.eos_ids or matcher.is_terminated():
            break
    return out


def test_greedy_matches_masked_reference_with_prefix_cache_and_preemption(model, tokenizer):  # noqa: F811
    # a pool of 12 blocks of 16 tokens for 6 sequences: they preempt each other; the shared prompt hits the cache
    engine = _engine(model, tokenizer, num_blocks=12, block_size=16, max_num_seqs=6)
    spec = StructuredOutputs(json=PERSON, disable_any_whitespace=True)
    prompt = tokenizer.encode("A person, as JSON, with a name, an age and some tags: ")
    reqs = [(prompt + tokenizer.encode(f" #{i}"), SamplingParams(temperature=0, max_tokens=60, structured=spec,
                                                                 logprobs=2)) for i in range(6)]
    outs = _run(engine, reqs)
    grammar = engine.grammars.compile(spec)
    assert engine.scheduler.num_preemptions > 0
    for (p, _), out in zip(reqs, outs):
        c = out.outputs[0]
        assert c.token_ids == _reference_greedy(model, tokenizer, p, grammar, 60)
        assert all(tok in lp and lp[tok] > float("-inf") for tok, lp in zip(c.token_ids, c.logprobs))
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), PERSON)


def test_stop_strings_and_n_apply_to_constrained_output(model, tokenizer):  # noqa: F811
    spec = StructuredOutputs(regex=r"(ab|cd)+;")
    out = _run(_engine(model, tokenizer), [("Go:", SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=40,
                                                                  stop=["cd"], structured=spec))])[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert "cd" not in c.text and re.fullmatch(r"(ab)*;?", c.text), c.text


def test_invalid_specs_name_the_field(model, tokenizer):  # noqa: F811
    engine = _engine(model, tokenizer)
    for spec, field in [(StructuredOutputs(regex="(ab"), "regex"), (StructuredOutputs(grammar="root ::= foo"), "grammar"),
                        (StructuredOutputs(json={"type": "nonsense"}), "json"),
                        (StructuredOutputs(grammar="start: UNDEFINED_RULE"), "grammar")]:
        with pytest.raises(SamplingParamsError, match=rf"^SamplingParams\.structured\.{field}: invalid"):
            engine.add_request("x", SamplingParams(structured=spec))
    assert not engine.has_unfinished_requests()
    for kw, msg in [({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                    ({"json": "{not json"}, "not valid JSON"), ({"json": [1]}, "object or a boolean"),
                    ({"choice": []}, "non-empty list"), ({"choice": ["a", 3]}, "non-empty list"), ({"regex": ""}, "non-empty")]:
        with pytest.raises(SamplingParamsError, match=msg):
            StructuredOutputs(**kw)
    with pytest.raises(SamplingParamsError, match="structured"):
        SamplingParams(structured={"regex": "a"})


def test_a_complete_grammar_ends_the_sequence_even_under_ignore_eos(model, tokenizer):  # noqa: F811
    spec = StructuredOutputs(choice=["alpha", "beta"])
    out = _run(_engine(model, tokenizer), [("Go:", SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=30,
                                                                  ignore_eos=True, structured=spec))])[0]
    for c in out.outputs:
        assert c.text in ("alpha", "beta") and c.finish_reason == "stop"


def test_lora_requests_are_constrained_by_their_own_model(model, tokenizer, tmp_path):  # noqa: F811
    """Greedy constrained decoding through a LoRA adapter equals the masked reference on the merged model."""
    import copy

    from attnkit.peft import LoraConfig, PeftModel, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in peft.adapter_parameters("default").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    peft.save_pretrained(tmp_path)
    merged = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).merge_and_unload().eval()
    engine = _engine(model, tokenizer)
    engine.add_lora("a", tmp_path)
    spec = StructuredOutputs(json=PERSON, disable_any_whitespace=True)
    prompt = tokenizer.encode("Someone as JSON: ")
    params = SamplingParams(temperature=0, max_tokens=50, structured=spec)
    ids = [engine.add_request(prompt, params, lora="a"), engine.add_request(prompt, params)]
    final = {}
    while engine.has_unfinished_requests():
        final.update({o.request_id: o for o in engine.step()})
    grammar = engine.grammars.compile(spec)
    with_lora, base = (final[i].outputs[0].token_ids for i in ids)
    assert with_lora == _reference_greedy(merged, tokenizer, prompt, grammar, 50)
    assert base == _reference_greedy(model, tokenizer, prompt, grammar, 50)
    assert with_lora != base
