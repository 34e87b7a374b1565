"""Text encoders: the interface, and real semantics from the shipped MiniLM."""

import torch

from neighbor_diffusion.text import TinyTextEncoder, build_text_encoder, text_encoder_dim


def test_tiny_encoder_shapes_mask_and_determinism():
    enc = TinyTextEncoder(max_length=8)
    s, m = enc.encode(["a red toy", "", "one two three four five six seven eight nine ten"])
    assert s.shape == (3, 8, 32) and m.dtype == torch.bool
    assert m[0].sum() == 4 and m[1].sum() == 1 and m[2].all()
    s2, _ = TinyTextEncoder(max_length=8).encode(["a red toy"])
    torch.testing.assert_close(s[:1], s2)


def test_minilm_is_offline_and_semantic():
    enc = build_text_encoder("minilm", 16)
    assert enc.dim == 384 == text_encoder_dim("minilm")
    s, m = enc.encode(["a cat", "a kitten", "a tax report"])

    def pooled(i):
        return (s[i] * m[i, :, None]).sum(0) / m[i].sum()

    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled(0), pooled(1), dim=0) > cos(pooled(0), pooled(2), dim=0) + 0.1
