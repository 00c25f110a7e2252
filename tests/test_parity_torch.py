"""Parity with torch.nn.Transformer and torch.nn.MultiheadAttention (same weights, dropout off)."""

import torch
from torch import nn

from attnkit.models.transformer import Decoder, Encoder, Seq2SeqConfig, Seq2SeqTransformer
from attnkit.nn import MultiHeadAttention, causal_mask, from_key_padding_mask

torch.manual_seed(0)
E, H, FF = 32, 4, 64


def copy_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    wq, wk, wv = theirs.in_proj_weight.detach().chunk(3)
    bq, bk, bv = theirs.in_proj_bias.detach().chunk(3)
    with torch.no_grad():
        for proj, w, b in ((ours.q_proj, wq, bq), (ours.k_proj, wk, bk), (ours.v_proj, wv, bv)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.o_proj.weight.copy_(theirs.out_proj.weight)
        ours.o_proj.bias.copy_(theirs.out_proj.bias)


def copy_linear_norm(dst, src) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)


def copy_from_torch(ours_enc: Encoder, ours_dec: Decoder, ref: nn.Transformer) -> None:
    for o, t in zip(ours_enc.layers, ref.encoder.layers):
        copy_mha(o.self_attn, t.self_attn)
        copy_linear_norm(o.ffn.up, t.linear1)
        copy_linear_norm(o.ffn.down, t.linear2)
        copy_linear_norm(o.norm1, t.norm1)
        copy_linear_norm(o.norm2, t.norm2)
    for o, t in zip(ours_dec.layers, ref.decoder.layers):
        copy_mha(o.self_attn, t.self_attn)
        copy_mha(o.cross_attn, t.multihead_attn)
        copy_linear_norm(o.ffn.up, t.linear1)
        copy_linear_norm(o.ffn.down, t.linear2)
        for n in ("norm1", "norm2", "norm3"):
            copy_linear_norm(getattr(o, n), getattr(t, n))
    copy_linear_norm(ours_enc.norm, ref.encoder.norm)
    copy_linear_norm(ours_dec.norm, ref.decoder.norm)


def test_multihead_attention_matches_torch():
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    for impl in ("math", "sdpa"):
        ours = MultiHeadAttention(E, H, impl=impl).eval()
        copy_mha(ours, ref)
        q, kv = torch.randn(3, 5, E), torch.randn(3, 7, E)
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[0, 5:] = True
        kpm[2, 3:] = True
        want, _ = ref(q, kv, kv, key_padding_mask=kpm)
        got = ours(q, context=kv, mask=from_key_padding_mask(kpm))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # self-attention with a causal mask
        x = torch.randn(2, 6, E)
        want, _ = ref(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(6))
        got = ours(x, mask=causal_mask(6))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_encoder_decoder_matches_torch_transformer():
    L = 2
    ref = nn.Transformer(E, H, L, L, FF, dropout=0.0, batch_first=True).eval()
    cfg = Seq2SeqConfig(11, 11, d_model=E, n_heads=H, n_encoder_layers=L, n_decoder_layers=L, d_ff=FF,
                        dropout=0.0, final_norm=True)
    enc, dec = Encoder(cfg).eval(), Decoder(cfg).eval()
    copy_from_torch(enc, dec, ref)

    src, tgt = torch.randn(3, 9, E), torch.randn(3, 6, E)
    src_kpm = torch.zeros(3, 9, dtype=torch.bool)
    src_kpm[1, 6:] = True
    tgt_kpm = torch.zeros(3, 6, dtype=torch.bool)
    tgt_kpm[2, 4:] = True
    want = ref(src, tgt, tgt_mask=~causal_mask(6), src_key_padding_mask=src_kpm,
               tgt_key_padding_mask=tgt_kpm, memory_key_padding_mask=src_kpm)

    src_mask = from_key_padding_mask(src_kpm)
    memory = enc(src, mask=src_mask)
    self_mask = causal_mask(6)[None, None] & from_key_padding_mask(tgt_kpm)
    got = dec(tgt, memory, self_mask=self_mask, cross_mask=src_mask)
    # torch's fast path leaves padded *query* rows unspecified; compare the real ones
    real = ~tgt_kpm
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def test_full_model_with_embeddings_matches_torch():
    """Embeddings ×√d_model + sinusoidal PE, then the stacks: same as feeding nn.Transformer the same sums."""
    cfg = Seq2SeqConfig(13, 13, d_model=E, n_heads=H, n_encoder_layers=1, n_decoder_layers=1, d_ff=FF,
                        dropout=0.0, final_norm=True, share_embeddings=True)
    model = Seq2SeqTransformer(cfg).eval()
    ref = nn.Transformer(E, H, 1, 1, FF, dropout=0.0, batch_first=True).eval()
    copy_from_torch(model.encoder, model.decoder, ref)
    src = torch.randint(3, 13, (2, 7))
    tgt = torch.randint(3, 13, (2, 5))
    got = model(src, tgt)
    emb = lambda t: model.pos(model.src_embed(t) * E**0.5)
    h = ref(emb(src), emb(tgt), tgt_mask=ref.generate_square_subsequent_mask(5))
    torch.testing.assert_close(got, h @ model.src_embed.weight.T, atol=1e-5, rtol=0)
