"""attnkit.peft on tiny models of the three families: every method trains only its own parameters,
starts where the method says (identity for LoRA / IA³ / adapters), keeps cached decoding equal to a
full forward, merges exactly; several named adapters on one base; the wrapper's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from attnkit.models.bert import Bert, BertConfig
from attnkit.models.gpt2 import GPT2, GPT2Config
from attnkit.models.llama import Llama, LlamaConfig
from attnkit.peft import (
    AdapterLoadError, BottleneckConfig, IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig,
    PromptTuningConfig, get_peft_model,
)

V = 50


def make(fam: str, seed: int = 0):
    torch.manual_seed(seed)
    if fam == "llama":
        return Llama(LlamaConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)).eval()
    if fam == "gpt2":
        return GPT2(GPT2Config(vocab_size=V, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_ff=64)).eval()
    return Bert(BertConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64)).eval()


METHODS = {
    "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "adapter": lambda: BottleneckConfig(bottleneck_size=8),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "ptuning_mlp": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "ptuning_lstm": lambda: PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"),
    "ia3": lambda: IA3Config(),
}
FAMILIES = ("llama", "gpt2", "bert")
IDS = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def run(model, fam: str, ids: torch.Tensor = IDS, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model(ids, attention_mask=mask) if fam == "bert" else model(ids)


def _perturb(peft: PeftModel, name: str = "default", seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_trains_only_its_parameters(fam, method):
    model = make(fam)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = run(model, fam)
    peft = get_peft_model(model, METHODS[method]())
    trainable, total = peft.trainable_parameters()
    assert 0 < trainable < total
    assert trainable == sum(p.numel() for p in peft.adapter_parameters("default").values())
    with torch.no_grad():
        out = run(peft, fam)
    assert out.shape == ref.shape
    if method in ("lora", "adapter", "ia3"):  # these start as the identity
        torch.testing.assert_close(out, ref)
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    for _ in range(2):
        opt.zero_grad()
        (run(peft.train(), fam) - target).square().mean().backward()
        opt.step()
    peft.eval()
    with torch.no_grad():
        after = run(peft, fam)
        with peft.disable_adapter():
            disabled = run(peft, fam)
    assert (after - ref).abs().max() > 1e-4  # training moved the adapter
    torch.testing.assert_close(disabled, ref)  # ...and nothing else
    base_now = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for k, v in base_state.items():
        assert torch.equal(base_now[k], v), k


@pytest.mark.parametrize("fam", ("llama", "gpt2"))
@pytest.mark.parametrize("method", METHODS)
def test_cached_decoding_matches_full_forward(fam, method):
    peft = get_peft_model(make(fam), METHODS[method]())
    _perturb(peft)
    with torch.no_grad():
        full = peft(IDS)  # (B, T, V)
        cache = peft.new_cache()
        steps = [peft(IDS[:, :4], cache=cache)]
        for t in range(4, IDS.shape[1]):
            steps.append(peft(IDS[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning_mlp"])
def test_encoder_prompts_respect_padding(method):
    """BERT with virtual tokens: a padded batch row gives the states of the unpadded sequence."""
    peft = get_peft_model(make("bert"), METHODS[method]())
    _perturb(peft)
    mask = torch.ones_like(IDS)
    mask[1, 5:] = 0
    with torch.no_grad():
        batch = peft(IDS, attention_mask=mask)
        alone = peft(IDS[1:, :5], attention_mask=mask[1:, :5])
    torch.testing.assert_close(batch[1, :5], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("cfg", [LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "ffn.up"]),
                                 IA3Config()], ids=["lora", "ia3"])
def test_merge_unmerge(fam, cfg):
    model = make(fam)
    with torch.no_grad():
        ref = run(model, fam)
    peft = get_peft_model(model, cfg)
    _perturb(peft)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = run(peft, fam)
        peft.merge_adapter()
        merged = run(peft, fam)
        changed = {k: v.clone() for k, v in model.state_dict().items()}
        peft.unmerge_adapter()
        unmerged = run(peft, fam)
    assert (adapted - ref).abs().max() > 1e-3
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unmerged, adapted, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(changed[k], weights[k]) for k in weights)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, weights[k], atol=1e-6, rtol=1e-5)
    plain = peft.merge_and_unload()
    assert type(plain) is type(model) and not any("base_layer" in k or "lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(run(plain, fam), adapted, atol=1e-5, rtol=1e-5)


def test_several_adapters_on_one_base():
    model = make("llama")
    with torch.no_grad():
        ref = model(IDS)
    peft = get_peft_model(model, LoraConfig(r=2), adapter_name="a")
    peft.add_adapter("b", IA3Config())
    peft.add_adapter("c", PromptTuningConfig(num_virtual_tokens=2))
    peft.add_adapter("d", LoraConfig(r=3, target_modules=["q_proj"]))
    for name in "abcd":
        _perturb(peft, name, seed=ord(name))
    outs = {}
    with torch.no_grad():
        for name in "abcd":
            peft.set_adapter(name)
            trainable = {n for n, p in peft.named_parameters() if p.requires_grad}
            assert trainable and all(f".{name}." in n or n.endswith(f".{name}") for n in trainable), trainable
            outs[name] = peft(IDS)
    for x in "abcd":
        assert (outs[x] - ref).abs().max() > 1e-3
        for y in "abcd":
            if x < y:
                assert (outs[x] - outs[y]).abs().max() > 1e-3
    # each adapter alone on a fresh copy of the base gives the same output: adapters do not interfere
    solo = get_peft_model(make("llama"), LoraConfig(r=3, target_modules=["q_proj"]), adapter_name="d")
    solo.load_state_dict({k: v for k, v in peft.state_dict().items() if ".a." not in k and ".b." not in k
                          and "prompt_encoders" not in k}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(solo(IDS), outs["d"])
    peft.set_adapter("b")
    peft.delete_adapter("a")
    peft.delete_adapter("d")
    assert list(peft.peft_config) == ["b", "c"]
    assert not any(".a." in k or ".d." in k for k in peft.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(peft(IDS), outs["b"])
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        peft.set_adapter("a")
    with pytest.raises(ValueError, match="already exists"):
        peft.add_adapter("b", LoraConfig())


def test_bad_configs():
    with pytest.raises(ValueError, match="rank r must be positive"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="no module of Llama matches"):
        get_peft_model(make("llama"), LoraConfig(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match="not a Linear"):
        get_peft_model(make("llama"), LoraConfig(target_modules=["self_attn"]))
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(prompt_tuning_init="TEXT")
    with pytest.raises(ValueError, match="cannot be merged"):
        get_peft_model(make("llama"), BottleneckConfig()).merge_and_unload()
    with pytest.raises(ValueError, match="PEFT supports"):
        get_peft_model(torch.nn.Linear(2, 2), LoraConfig())


def test_prompt_tuning_text_init():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [ord(c) - 90 for c in text]  # 'a' → 7, 'b' → 8

    model = make("llama")
    peft = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                                    prompt_tuning_init_text="ab"), tokenizer=Tok())
    table = peft.prompt_encoders["default"].embedding.weight
    torch.testing.assert_close(table, model.tok_embeddings.weight[[7, 8, 7, 8, 7]])


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, fam, method):
    peft = get_peft_model(make(fam), METHODS[method]())
    _perturb(peft)
    with torch.no_grad():
        out = run(peft, fam)
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(fam), tmp_path)
    assert loaded.trainable_parameters()[0] == 0  # inference mode unless is_trainable
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, fam), out, atol=1e-4, rtol=1e-4)  # GPT-2: via fused c_attn
    again = PeftModel.from_pretrained(make(fam), tmp_path, is_trainable=True)
    assert again.trainable_parameters()[0] > 0


def test_load_adapter_into_wrong_size(tmp_path):
    peft = get_peft_model(make("llama"), PrefixTuningConfig(num_virtual_tokens=3))
    peft.save_pretrained(tmp_path)
    other = Llama(LlamaConfig(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64))
    with pytest.raises(AdapterLoadError, match="prompt_embeddings has shape"):
        PeftModel.from_pretrained(other, tmp_path)


def test_lora_under_autocast_takes_its_input_as_autocast_would():
    """Under bf16 autocast a LoRA layer feeds its bf16 input to A as it is (A's autocast casts it): output and
    gradients equal those of the same layer given the input in float32, which autocast casts to bf16 anyway."""
    from attnkit.peft.lora.layer import LoraLinear

    peft = get_peft_model(make("llama"), METHODS["lora"]())
    _perturb(peft)
    layer = next(m for m in peft.modules() if isinstance(m, LoraLinear))
    x = torch.randn(3, 5, 32).bfloat16()
    outs, grads = [], []
    for given in (x, x.float()):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(given)
        y.float().square().sum().backward()
        outs.append(y)
        grads.append([p.grad.clone() for p in layer.parameters() if p.requires_grad])
    assert outs[0].dtype == torch.bfloat16 and torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
