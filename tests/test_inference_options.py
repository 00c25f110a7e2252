"""InferenceOptions: one home for dtype / quantize / fuse / threads / compile; bad values are named."""

from __future__ import annotations

import argparse

import pytest

from attnkit.engine.options import InferenceOptions


@pytest.mark.parametrize("kw,match", [({"dtype": "float8"}, "dtype"), ({"quantize": "int3"}, "quantize"),
                                      ({"threads": 0}, "threads"), ({"matmul_dtype": "float16"}, "matmul_dtype")])
def test_bad_options_are_named(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        InferenceOptions(**kw)


def test_flags_round_trip() -> None:
    p = argparse.ArgumentParser()
    InferenceOptions.add_flags(p)
    o = InferenceOptions.from_args(p.parse_args(["--dtype", "bfloat16", "--quantize", "none", "--threads", "2", "--compile"]))
    assert (o.dtype, o.quantize, o.threads, o.compile) == ("bfloat16", None, 2, True)
    assert str(o.torch_dtype) == "torch.bfloat16"
    assert InferenceOptions.from_args(p.parse_args([])) == InferenceOptions()


def test_matmul_dtype_auto_follows_the_cpu(monkeypatch) -> None:
    import attnkit.kernels as kernels

    p = argparse.ArgumentParser()
    InferenceOptions.add_flags(p)
    assert InferenceOptions.from_args(p.parse_args(["--matmul-dtype", "float32"])).gguf_matmul_dtype() == "float32"
    for flags, want in (({"avx512_bf16", "avx2"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"), ({"avx2", "fma"}, "float32")):
        monkeypatch.setattr(kernels, "cpu_flags", lambda f=flags: frozenset(f))
        assert InferenceOptions().gguf_matmul_dtype() == want, flags
    assert InferenceOptions(matmul_dtype="bfloat16").gguf_matmul_dtype() == "bfloat16"
