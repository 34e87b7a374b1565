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


def test_tiny_encoder_feeds_its_model_on_the_model_s_device():
    """The pipeline moves the encoder to its device (CUDA): token ids built on the CPU failed there at the first
    prompt. No GPU in the tests: a probe in the model's place records where its inputs are."""
    enc = TinyTextEncoder(max_length=8)
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1, device="meta"))

        def forward(self, input_ids, attention_mask):
            seen.append((input_ids.device.type, attention_mask.device.type))
            return type("Out", (), {"last_hidden_state": torch.zeros(*input_ids.shape, 32, device="meta")})()

    enc.model = Probe()
    states, mask = enc.encode(["a red toy"])
    assert seen == [("meta", "meta")] and states.device.type == mask.device.type == "meta"


def test_a_local_encoder_with_fewer_positions_than_max_length_is_refused():
    import pytest

    from neighbor_diffusion.config import ConfigError
    from neighbor_diffusion.text import HFTextEncoder, minilm_path

    with pytest.raises(ConfigError, match=r"text.max_length=600: the text encoder at .* has 512 positions"):
        HFTextEncoder(minilm_path(), max_length=600)  # CLIP's 77 failed at its first encode


def test_a_name_that_is_no_local_folder_is_refused_before_transformers_sees_it():
    """A hub id (or a typo) went to AutoConfig.from_pretrained, which looks it up on the hub: nothing may be
    downloaded at run time. Both ways of naming an encoder (its width, the encoder) refuse it, naming the field."""
    import pytest

    for call in (text_encoder_dim, lambda name: build_text_encoder(name, 16)):
        with pytest.raises(FileNotFoundError, match=r"text\.encoder='openai/clip-vit-base-patch32': no transformers"):
            call("openai/clip-vit-base-patch32")
