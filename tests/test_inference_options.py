"""InferenceOptions: one home for dtype / quantize / fuse / threads / compile; bad values are named."""

from __future__ import annotations

import argparse

import pytest

from attnkit.inference_options import InferenceOptions


@pytest.mark.parametrize("kw,match", [({"dtype": "float8"}, "dtype"), ({"quantize": "int3"}, "quantize"),
                                      ({"threads": 0}, "threads")])
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
