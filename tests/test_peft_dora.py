"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") against HF PEFT's ``use_dora``:
adapters saved by one library and loaded by the other give the same logits (≤ 1e-5) on tiny random Llama
and GPT-2 checkpoints (GPT-2: bias, fused c_attn), one training step moves the same tensors by the same
amount, merging is exact, and DoRA on an Embedding is refused."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from attnkit.loading.hf import load_hf_model  # noqa: E402
from attnkit.peft import AdapterLoadError, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from attnkit.peft.lora import LoraLinear  # noqa: E402
from attnkit.peft.tuner import tuner_layers  # noqa: E402

TOL = 1e-5
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
GPT2 = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128)
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
FAMS = ("llama", "gpt2")
# PEFT's targets, attnkit's targets (GPT-2: attnkit's q/v are rows of c_attn; ffn.up is c_fc, with a bias)
HF_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
OUR_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["q_proj", "v_proj", "ffn.up"]}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{family: (HF model, checkpoint dir)}."""
    out = {}
    for fam, make in (("llama", lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))),
                      ("gpt2", lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)))):
        torch.manual_seed(0)
        hf = make().eval()
        if fam == "gpt2":
            with torch.no_grad():  # nonzero biases, so that DoRA's base(x) − bias is tested
                for n, p in hf.named_parameters():
                    if n.endswith("bias"):
                        p.normal_(0, 0.1)
        d = tmp_path_factory.mktemp(fam)
        hf.save_pretrained(d, safe_serialization=True)
        out[fam] = (hf, d)
    return out


def _peft_dora(hf, fam: str, dropout: float = 0.0):
    """A PEFT DoRA model with random B (init_lora_weights=False) and a magnitude moved off ‖W‖."""
    torch.manual_seed(2)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, init_lora_weights=False,
        target_modules=HF_TARGETS[fam]))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return pm


def _ours(d, fam: str, dropout: float = 0.0) -> PeftModel:
    torch.manual_seed(2)
    return get_peft_model(load_hf_model(d), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                                                       target_modules=OUR_TARGETS[fam]))


def _perturb(model: PeftModel) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.adapter_parameters("default").items():
            scale = 0.3 * p.abs().mean() if "magnitude" in n else 0.5
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1))


@pytest.mark.parametrize("fam", FAMS)
def test_peft_dora_to_attnkit(bases, tmp_path, fam):
    hf, d = bases[fam]
    pm = _peft_dora(hf, fam, dropout=0.1).eval()
    pm.save_pretrained(tmp_path)
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    with torch.no_grad():
        ref = pm(input_ids=IDS).logits
        base = hf(input_ids=IDS).logits
    assert (ref - base).abs().max() > 1e-2
    ours = PeftModel.from_pretrained(load_hf_model(d), tmp_path).eval()
    assert ours.peft_config["default"].use_dora
    with torch.no_grad():
        out = ours(IDS)
    diff = float((out - ref).abs().max())
    print(f"PEFT → attnkit DoRA ({fam}): max |Δlogit| = {diff:.2e}")
    assert diff <= TOL
    # the tensor name as PEFT holds it in memory (``….lora_magnitude_vector.weight``) is read too
    flat = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file({k + ".weight" if k.endswith("magnitude_vector") else k: v for k, v in flat.items()},
              str(tmp_path / "adapter_model.safetensors"))
    again = PeftModel.from_pretrained(load_hf_model(d), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(IDS), out)


@pytest.mark.parametrize("fam", FAMS)
def test_attnkit_dora_trained_to_peft(bases, tmp_path, fam):
    hf, d = bases[fam]
    ours = _ours(d, fam, dropout=0.1)
    before = {k: v.detach().clone() for k, v in ours.adapter_parameters("default").items()}
    opt = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    ours.train()
    for _ in range(5):
        opt.zero_grad()
        _loss(ours(IDS)).backward()
        opt.step()
    after = ours.adapter_parameters("default")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    ours.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        out = ours(IDS)
        with ours.disable_adapter():
            base = ours(IDS)
    assert (out - base).abs().max() > 1e-2
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()
    with torch.no_grad():
        ref = pm(input_ids=IDS).logits
    diff = float((out - ref).abs().max())
    print(f"attnkit → PEFT DoRA ({fam}): max |Δlogit| = {diff:.2e}")
    assert diff <= TOL


def test_training_step_equals_peft(bases, tmp_path):
    """One SGD step on the same adapter moves m, A and B identically in both libraries (‖W‖ detached, §4.3)."""
    hf, d = bases["llama"]
    pm = _peft_dora(hf, "llama")
    pm.save_pretrained(tmp_path / "start")
    ours = PeftModel.from_pretrained(load_hf_model(d), tmp_path / "start", is_trainable=True)
    for model, logits in ((pm, lambda: pm(input_ids=IDS).logits), (ours, lambda: ours(IDS))):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        _loss(logits()).backward()
        opt.step()
    pm.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    start, a, b = (load_file(str(tmp_path / s / "adapter_model.safetensors")) for s in ("start", "peft", "ours"))
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"one SGD step, attnkit vs PEFT: max |Δparam| = {worst:.2e}")
    assert worst <= 1e-6
    assert all((a[k] - start[k]).abs().max() > 1e-4 for k in a)


def test_dropout_in_training_equals_peft(bases, tmp_path):
    """With dropout acting, W₀x is W₀·dropout(x) (PEFT's base_result=None branch): the same masks (same seed,
    one draw per layer in both libraries; Llama, whose q/k/v are separate layers in both) give the same logits."""
    hf, d = bases["llama"]
    pm = _peft_dora(hf, "llama", dropout=0.3)
    pm.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(load_hf_model(d), tmp_path)
    pm.train(), ours.train()
    with torch.no_grad():
        torch.manual_seed(7)
        ref = pm(input_ids=IDS).logits
        torch.manual_seed(7)
        out = ours(IDS)
        evaluated = ours.eval()(IDS)
    assert (ref - evaluated).abs().max() > 1e-2
    diff = float((out - ref).abs().max())
    print(f"DoRA with dropout 0.3 in training, attnkit vs PEFT: max |Δlogit| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("fam", FAMS)
def test_training_moves_magnitude_and_both_factors(bases, fam):
    _, d = bases[fam]
    ours = _ours(d, fam)
    params = ours.adapter_parameters("default")
    mags = {k: p for k, p in params.items() if k.endswith("lora_magnitude_vector")}
    assert len(mags) == len([k for k in params if k.endswith("lora_A.weight")]) > 0
    for k, m in mags.items():  # m starts at ‖W₀‖ row-wise
        layer = dict(tuner_layers(ours.base_model))[k.rsplit(".", 1)[0]]
        torch.testing.assert_close(m.detach(), torch.linalg.norm(layer.base_layer.weight, dim=1))
    start = {k: p.detach().clone() for k, p in mags.items()}
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # B = 0 at first, so A's gradient appears at the second step
        opt.zero_grad()
        _loss(ours.train()(IDS)).backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params.values())
    assert all((mags[k].detach() - start[k]).abs().max() > 0 for k in mags)


@pytest.mark.parametrize("fam", FAMS)
def test_merge_unmerge(bases, fam):
    _, d = bases[fam]
    ours = _ours(d, fam)
    _perturb(ours)
    weights = {k: v.clone() for k, v in ours.base_model.state_dict().items() if "lora" not in k}
    with torch.no_grad():
        adapted = ours.eval()(IDS)
        ours.merge_adapter()
        merged = ours(IDS)
        merged_w = {k: ours.base_model.state_dict()[k].clone() for k in weights}
        ours.unmerge_adapter()
        unmerged = ours(IDS)
    print(f"DoRA merge ({fam}): max |Δlogit| merged {float((merged - adapted).abs().max()):.2e}, "
          f"unmerged {float((unmerged - adapted).abs().max()):.2e}")
    torch.testing.assert_close(merged, adapted, atol=TOL, rtol=0)
    torch.testing.assert_close(unmerged, adapted, atol=TOL, rtol=0)
    assert any(not torch.equal(merged_w[k], weights[k]) for k in weights)
    for k, v in ours.base_model.state_dict().items():
        if k in weights:
            torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=1e-5)
    for _, layer in tuner_layers(ours.base_model):  # W' = m/‖W₀+ΔW‖ · (W₀+ΔW)
        if isinstance(layer, LoraLinear):
            W, dW, m = layer.base_layer.weight, layer.delta_weight("default"), layer.lora_magnitude_vector["default"]
            want = (m / torch.linalg.norm(W + dW, dim=1)).view(-1, 1) * (W + dW)
            layer.merge("default")
            torch.testing.assert_close(layer.base_layer.weight.detach(), want.detach(), atol=1e-6, rtol=1e-5)
            layer.unmerge("default")
    with torch.no_grad():
        plain = ours.merge_and_unload()
        torch.testing.assert_close(plain(IDS), adapted, atol=TOL, rtol=0)


def test_dora_next_to_merged_lora_unmerges_exactly(bases):
    """A DoRA merged over a merged LoRA takes its norm on W₀ (as its forward does), and either unmerges first."""
    _, d = bases["llama"]
    ours = _ours(d, "llama")
    ours.add_adapter("plain", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _perturb(ours)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.adapter_parameters("plain").values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    w0 = {k: v.clone() for k, v in ours.base_model.state_dict().items() if "lora" not in k}
    with torch.no_grad():
        dora = ours.eval()(IDS)
        ours.merge_adapter("plain")
        ours.merge_adapter("default")
        ours.unmerge_adapter("plain")
        torch.testing.assert_close(ours(IDS), dora, atol=TOL, rtol=0)
        ours.unmerge_adapter("default")
    for k, v in ours.base_model.state_dict().items():
        if k in w0:
            torch.testing.assert_close(v, w0[k], atol=1e-5, rtol=1e-5)


def test_dora_on_embedding_is_refused(bases, tmp_path):
    hf, d = bases["llama"]
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", r=2, use_dora=True,
                                                                 target_modules=["embed_tokens", "q_proj"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match="DoRA on an Embedding"):
        PeftModel.from_pretrained(load_hf_model(d), tmp_path)


def test_magnitude_without_use_dora_is_refused(bases, tmp_path):
    hf, d = bases["llama"]
    _peft_dora(hf, "llama").save_pretrained(tmp_path)
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"use_dora": true', '"use_dora": false'))
    with pytest.raises(AdapterLoadError, match="lora_magnitude_vector"):
        PeftModel.from_pretrained(load_hf_model(d), tmp_path)


def test_multi_lora_serving_refuses_dora(tmp_path):
    """The engine's batched LoRA applies W + s·B·A only: a DoRA adapter is refused, not served without m."""
    from engine_helpers import make_llm, tiny_llama

    get_peft_model(tiny_llama(320), LoraConfig(r=2, use_dora=True)).save_pretrained(tmp_path)
    llm = make_llm(tiny_llama(320))
    with pytest.raises(AdapterLoadError, match="use_dora"):
        llm.load_lora("dora", tmp_path)


def test_finetune_cli_use_dora(tmp_path, monkeypatch):
    import json

    import attnkit.loading as loading
    from attnkit.cli import main
    from attnkit.data.sft_tasks import write_jsonl
    from finetune_helpers import chat_rows, tiny_lm

    monkeypatch.setattr(loading, "load_causal_lm", lambda *a, **k: tiny_lm())
    data, out = write_jsonl(tmp_path / "train.jsonl", chat_rows(12)), tmp_path / "run"
    assert main(["finetune", "--method", "lora", "--use-dora", "--data", str(data), "--out", str(out), "--steps", "3",
                 "--batch-size", "2", "--quiet", "--eval-every", "0"]) == 0
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    mags = {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "magnitude" in k}
    assert mags
    loaded = PeftModel.from_pretrained(tiny_lm().model, adapter)
    start = get_peft_model(tiny_lm().model, LoraConfig(use_dora=True)).adapter_parameters("default")
    assert any(not torch.equal(p, start[k]) for k, p in loaded.adapter_parameters("default").items() if "magnitude" in k)
