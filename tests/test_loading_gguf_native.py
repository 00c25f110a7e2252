"""GGUF files of every common block type load with their blocks kept under attnkit's kernels (issue 14):
nothing dequantized at load, the numbers those of the dequantized reference, mixed-type projections (as
llama-quantize's _M presets write them) fused part by part, the C decode step taking them; types without a
kernel load dequantized with a warning naming them; unknown or unloadable types are refused by name."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from test_loading_gguf import IDS, Q, encode, tiny_hf, write_gguf  # noqa: E402 (the tiny-model writer)

from attnkit.kernels import library
from attnkit.loading.errors import UnsupportedModelError
from attnkit.loading.gguf import load_gguf_model
from attnkit.nn.fused import fuse_for_inference
from attnkit.quant.native import NATIVE_TYPES, GGUFBlockLinear

needs_kernels = pytest.mark.skipif(library() is None, reason="no C compiler: the kernels could not be built")
KERNEL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def _blocks_of(model) -> dict[str, str]:
    return {n: m.kind for n, m in model.named_modules() if isinstance(m, GGUFBlockLinear)}


@needs_kernels
@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_every_kernel_type_stays_in_its_blocks(tmp_path, qtype):
    assert set(KERNEL_TYPES) <= NATIVE_TYPES
    ref = tiny_hf()
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", ref, qtype)
    model = load_gguf_model(path, quantize="gguf")
    kinds = _blocks_of(model)
    assert len(kinds) == 2 * 7 + 1 and set(kinds.values()) == {qtype}  # every projection and the head
    with torch.no_grad():
        want = ref(IDS).logits
        got = model(IDS)  # 40 rows: the dense product on the decoded blocks (bf16 where the CPU has it)
        assert (got - want).abs().max() < 0.03 * want.abs().max()
        one = model(IDS[:, :5])  # 5 rows: the integer kernel with 8-bit activations
        assert (one - want[:, :5]).abs().max() < 0.05 * want.abs().max()


@needs_kernels
def test_mixed_types_fuse_part_by_part_and_decode_in_c(tmp_path):
    """llama-quantize's Q4_K_M keeps attn_v and ffn_down in Q6_K in some layers, q/k in Q4_K: the fused q/k/v
    is then one part per type, and the C decode step runs it as the eager model does."""
    from attnkit.engine import EngineConfig, LLMEngine, SamplingParams

    ref = tiny_hf()
    rng = np.random.default_rng(5)
    over = {}
    for i in range(2):
        for name, shape in ((f"blk.{i}.attn_v.weight", (128, 256)), (f"blk.{i}.ffn_down.weight", (256, 512))):
            over[name] = (encode(np.zeros(shape, np.float32), "Q6_K", rng), "Q6_K")
    path = write_gguf(tmp_path / "mixed.gguf", ref, "Q4_K", override=over)
    model = fuse_for_inference(load_gguf_model(path, quantize="gguf"))
    qkv = model.layers[0].self_attn.qkv_proj
    assert [p.kind for p in qkv.parts] == ["Q4_K", "Q4_K", "Q6_K"]
    assert model.layers[0].ffn.down_proj.kind == "Q6_K"
    engine = LLMEngine(model, config=EngineConfig(block_size=4, kv_cache_bytes=8 << 20))
    for n in (3, 9, 17):
        engine.add_request(IDS[0, :n].tolist(), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.native and engine.runner.native_reason is None


def test_types_without_a_kernel_load_dequantized_with_a_warning(tmp_path):
    q2 = np.zeros((512, 256 // 256 * 84), dtype=np.uint8)  # valid Q2_K bytes
    path = write_gguf(tmp_path / "q2.gguf", tiny_hf(), "Q8_0", override={"blk.0.ffn_up.weight": (q2, "Q2_K")})
    with pytest.warns(RuntimeWarning, match=r"Q2_K \(1 tensors\)"):
        model = load_gguf_model(path, quantize="gguf")
    up = model.layers[0].ffn.up_proj
    assert type(up) is torch.nn.Linear and torch.count_nonzero(up.weight) == 0
    load_gguf_model(path)  # quantize=None: everything dequantized as asked, no warning needed


def _retype(path, tensor: str, type_id: int) -> None:
    """Overwrite the ggml type id of ``tensor`` in the file's tensor table."""
    raw = bytearray(path.read_bytes())
    name = tensor.encode()
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    struct.pack_into("<I", raw, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("type_id,what", [(99, "unknown ggml tensor type id 99"), (int(Q.Q8_K), "Q8_K")])
def test_unknown_and_unloadable_types_are_refused_by_name(tmp_path, type_id, what):
    path = write_gguf(tmp_path / "t.gguf", tiny_hf(), "Q8_0")
    _retype(path, "blk.1.attn_k.weight", type_id)
    with pytest.raises(UnsupportedModelError) as e:
        load_gguf_model(path, quantize="gguf")
    assert e.value.tensor == "blk.1.attn_k.weight" and what in e.value.reason and str(path) in str(e.value)
