"""Properties of the encoder–decoder: causality, padding, permutation equivariance, KV-cache decoding."""

import pytest
import torch

from attnkit.decoding import beam_search, greedy_decode
from attnkit.models.transformer import Seq2SeqConfig, Seq2SeqTransformer
from attnkit.nn import padding_mask

V, PAD = 20, 0


def tiny(**kw) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    cfg = dict(src_vocab_size=V, tgt_vocab_size=V, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2,
               d_ff=64, dropout=0.0)
    cfg.update(kw)
    return Seq2SeqTransformer(Seq2SeqConfig(**cfg)).eval()


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_is_causal(norm_first):
    model = tiny(norm_first=norm_first, final_norm=norm_first)
    src = torch.randint(3, V, (2, 7))
    tgt = torch.randint(3, V, (2, 9))
    base = model(src, tgt)
    for t in range(9):
        changed = tgt.clone()
        changed[:, t + 1 :] = torch.randint(3, V, changed[:, t + 1 :].shape)
        torch.testing.assert_close(model(src, changed)[:, : t + 1], base[:, : t + 1])
    assert not torch.allclose(model(src, torch.roll(tgt, 1, 1))[:, 1:], base[:, 1:])


def test_padding_never_changes_real_positions():
    model = tiny()
    src = torch.randint(3, V, (2, 8))
    src[0, 5:] = PAD
    tgt = torch.randint(3, V, (2, 6))
    tgt[1, 4:] = PAD
    base = model(src, tgt)
    memory, _ = model.encode(src)
    # the padded tokens' *embeddings* are replaced: feed garbage through the pad positions
    src2 = src.clone()
    src2[0, 5:] = PAD  # still pad, but the source is also lengthened with more pad
    src_longer = torch.cat([src2, torch.full((2, 3), PAD)], 1)
    torch.testing.assert_close(model(src_longer, tgt), base, atol=1e-5, rtol=1e-5)
    # encoder self-attention: real source positions ignore what sits in padded slots
    emb = model._embed(model.src_embed, src)
    noisy = emb.clone()
    noisy[0, 5:] = torch.randn_like(noisy[0, 5:]) * 10
    mask = padding_mask(src, PAD)
    torch.testing.assert_close(model.encoder(noisy, mask)[0, :5], model.encoder(emb, mask)[0, :5], atol=1e-5, rtol=1e-5)
    # cross-attention: target positions ignore padded memory
    mem_noisy = memory.clone()
    mem_noisy[0, 5:] = torch.randn_like(mem_noisy[0, 5:]) * 10
    torch.testing.assert_close(model.decode(tgt, mem_noisy, mask), model.decode(tgt, memory, mask))
    # target padding: real target positions ignore later pad tokens' values (causal) — and earlier ones never exist
    tgt2 = tgt.clone()
    tgt2[1, 4:] = PAD
    torch.testing.assert_close(model(src, tgt2)[1, :4], base[1, :4])


def test_encoder_permutation_equivariant_only_without_positions():
    for positional, equivariant in (("none", True), ("sinusoidal", False), ("learned", False)):
        model = tiny(positional=positional)
        src = torch.randint(3, V, (1, 8))
        perm = torch.randperm(8)
        out, _ = model.encode(src)
        out_p, _ = model.encode(src[:, perm])
        assert torch.allclose(out_p, out[:, perm], atol=1e-5) == equivariant, positional


def test_greedy_with_cache_equals_without():
    model = tiny()
    src = torch.randint(3, V, (4, 9))
    src[2, 6:] = PAD
    a = greedy_decode(model, src, max_len=12, use_cache=True)
    b = greedy_decode(model, src, max_len=12, use_cache=False)
    assert torch.equal(a, b)
    assert a.shape[1] <= 12


def test_cached_step_logits_equal_full_pass():
    model = tiny()
    src = torch.randint(3, V, (2, 6))
    tgt = torch.randint(3, V, (2, 7))
    memory, src_mask = model.encode(src)
    full = model.decode(tgt, memory, src_mask)
    cache = model.init_cache(memory)
    steps = [model.decode(tgt[:, :3], memory, src_mask, cache=cache)]  # a 3-token chunk, then single tokens
    steps += [model.decode(tgt[:, t : t + 1], memory, src_mask, cache=cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_beam_search_size_one_is_greedy_and_scores_are_sane():
    model = tiny()
    src = torch.randint(3, V, (3, 7))
    g = greedy_decode(model, src, max_len=10)
    b, _ = beam_search(model, src, beam_size=1, max_len=10, alpha=0.0)
    assert torch.equal(b[:, : g.shape[1]], g)
    b4, s4 = beam_search(model, src, beam_size=4, max_len=10, alpha=0.0)
    # with α = 0, the beam's best sequence is at least as likely as greedy's
    def logprob(ids):
        tgt_in = torch.cat([torch.full((ids.shape[0], 1), 1), ids[:, :-1]], 1)
        lp = torch.log_softmax(model(src, tgt_in), -1).gather(-1, ids[..., None])[..., 0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        for r in range(ids.shape[0]):  # count up to and including the first <eos>
            eos = (ids[r] == 2).nonzero()
            if len(eos):
                keep[r, eos[0, 0] + 1 :] = False
        return (lp * keep).sum(-1)
    assert torch.all(logprob(b4) >= logprob(g) - 1e-4)
    torch.testing.assert_close(s4, logprob(b4), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, src, beam_size=0)


def test_config_validation_and_bad_tokens():
    with pytest.raises(ValueError, match="divisible"):
        Seq2SeqConfig(10, 10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="share_embeddings"):
        Seq2SeqConfig(10, 12, share_embeddings=True)
    with pytest.raises(ValueError, match="unknown Seq2SeqConfig fields"):
        Seq2SeqConfig.from_dict({"src_vocab_size": 3, "tgt_vocab_size": 3, "bogus": 1})
    model = tiny()
    with pytest.raises(ValueError, match=r"must lie in \[0, 20\)"):
        model(torch.tensor([[1, 25]]), torch.tensor([[1]]))
    with pytest.raises(TypeError, match="int64"):
        model(torch.randn(1, 3), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.tensor([1, 2]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(torch.tensor([[4, 5]]), torch.tensor([[1], [1]]))


def test_paper_base_preset():
    cfg = Seq2SeqConfig.paper_base(1000)
    assert (cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_encoder_layers, cfg.dropout) == (512, 8, 2048, 6, 0.1)
    model = Seq2SeqTransformer(cfg)
    # 6 enc layers of 4·512² + 2·512·2048 weights (+ biases, norms), 6 dec layers with a second attention
    assert 44_000_000 < model.num_parameters() < 45_000_000
