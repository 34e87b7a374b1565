"""The neighbor UNet: shapes and the invariants that make in-context learning well-posed."""

import torch
from diffusers import UNet2DConditionModel

from conftest import open_gates, random_batch
from neighbor_diffusion.model import NeighborUNet
from neighbor_diffusion.model.neighbor_attention import NeighborFeatures


def _encode(model, b, order=None):
    keys = ("neighbor_images", "neighbor_text_states", "neighbor_text_mask", "neighbor_mask")
    args = [b[k] if order is None else b[k][:, order] for k in keys]
    return model.encode_neighbors(*args)


def _inputs(cfg, b):
    t = torch.tensor([3, 700])
    return b["image"], t, b["text_states"], b["text_mask"]


def test_shapes(cfg, model):
    b = random_batch(cfg)
    feats = _encode(model, b)
    S, K = cfg.model.image_size, cfg.model.max_neighbors
    for level in cfg.model.neighbor_levels:
        side = S // 2**level
        assert feats.tokens[level].shape == (2, K * side * side, cfg.model.block_out_channels[level])
    out = model(*_inputs(cfg, b), feats)
    assert out.shape == b["image"].shape


def test_attention_heads_are_model_attention_head_dim_wide(cfg, model):
    """diffusers takes UNet2DConditionModel(attention_head_dim=...) as a head *count*; ours is a width."""
    layers = [m for n, m in model.unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert layers and all(a.inner_dim // a.heads == cfg.model.attention_head_dim for a in layers)


def test_zero_gate_equals_plain_text_only_unet(cfg, model):
    """With gates at zero the model *is* a plain UNet2DConditionModel, neighbors or not."""
    b = random_batch(cfg)
    plain = UNet2DConditionModel.from_config(model.unet.config).eval()
    plain.load_state_dict(model.unet.state_dict())  # strict: our UNet's state dict is a plain UNet's
    x, t, s, m = _inputs(cfg, b)
    with torch.no_grad():
        ref = plain(x, t, s, encoder_attention_mask=m).sample
        ours = model(x, t, s, m, _encode(model, b))
    assert torch.equal(ours, ref)


def test_pretrained_text_to_image_weights_load(cfg, model):
    torch.manual_seed(1)
    plain = UNet2DConditionModel.from_config(model.unet.config).eval()
    model.load_text_to_image_weights(plain.state_dict())
    b = random_batch(cfg)
    x, t, s, m = _inputs(cfg, b)
    with torch.no_grad():
        assert torch.equal(model(x, t, s, m, _encode(model, b)), plain(x, t, s, encoder_attention_mask=m).sample)


def test_open_gates_make_neighbors_matter(cfg, model):
    b = random_batch(cfg)
    open_gates(model)
    x, t, s, m = _inputs(cfg, b)
    with torch.no_grad():
        with_nb = model(x, t, s, m, _encode(model, b))
        without = model(x, t, s, m)
    assert (with_nb - without).abs().max() > 1e-3


def test_neighbor_order_does_not_matter(cfg, model):
    b = random_batch(cfg)
    b["neighbor_mask"][:] = True
    open_gates(model)
    x, t, s, m = _inputs(cfg, b)
    with torch.no_grad():
        a = model(x, t, s, m, _encode(model, b))
        p = model(x, t, s, m, _encode(model, b, order=torch.tensor([2, 0, 1])))
    torch.testing.assert_close(a, p, atol=1e-5, rtol=1e-4)


def test_masked_padding_neighbors_do_not_matter(cfg, model):
    b = random_batch(cfg)  # row 0: last neighbor is padding
    open_gates(model)
    x, t, s, m = _inputs(cfg, b)
    garbage = {k: v.clone() for k, v in b.items()}
    garbage["neighbor_images"][0, -1] = 5.0
    garbage["neighbor_text_states"][0, -1] = -3.0
    fewer = {k: (v[:, :-1] if k.startswith("neighbor") else v) for k, v in b.items()}
    with torch.no_grad():
        ref = model(x, t, s, m, _encode(model, b))
        torch.testing.assert_close(model(x, t, s, m, _encode(model, garbage)), ref)
        # the same row with K=2 (no padding slot at all)
        short = model(x[:1], t[:1], s[:1], m[:1], _encode(model, {k: v[:1] for k, v in fewer.items()}))
        torch.testing.assert_close(short, ref[:1], atol=1e-5, rtol=1e-4)


def test_no_neighbors_row_equals_text_only(cfg, model):
    b = random_batch(cfg)
    open_gates(model)
    x, t, s, m = _inputs(cfg, b)
    feats = _encode(model, b)
    feats.mask[1] = False  # row 1 becomes the K=0 branch
    with torch.no_grad():
        mixed = model(x, t, s, m, feats)
        text_only = model(x, t, s, m)
    torch.testing.assert_close(mixed[1], text_only[1])
    assert (mixed[0] - text_only[0]).abs().max() > 1e-3


def test_projected_keys_values_and_skipped_rows_change_nothing(cfg, model):
    """Sampling's shortcuts: keys/values projected once (NeighborFeatures.kv), rows without neighbors skipped."""
    b = random_batch(cfg)
    open_gates(model)
    x, t, s, m = _inputs(cfg, b)
    feats = _encode(model, b)
    feats.mask[1] = False  # row 1 skips the neighbor layers
    projected = model.project_neighbors(feats)
    assert set(projected.kv) == set(model.neighbor_attention)
    row0 = NeighborFeatures({lv: v[:1] for lv, v in feats.tokens.items()}, feats.mask[:1])
    with torch.no_grad():
        mixed = model(x, t, s, m, feats)
        alone = model(x[:1], t[:1], s[:1], m[:1], row0)
        torch.testing.assert_close(model(x, t, s, m, projected), mixed)
    torch.testing.assert_close(mixed[:1], alone)


def test_compiled_unet_is_one_graph_and_matches_eager(cfg, model):
    """Rows with and without neighbors in one batch: skipping the rows without them (eager) is a data-dependent
    branch, which under torch.compile split the UNet's graph at every neighbor layer; compiled, every row takes
    the dense path, one graph, and the output is the eager one."""
    b = random_batch(cfg)
    open_gates(model)
    x, t, s, m = _inputs(cfg, b)
    feats = _encode(model, b)
    feats.mask[1] = False
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(x, t, s, m, feats)
        explained = torch._dynamo.explain(model)(x, t, s, m, feats)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x, t, s, m, feats)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch.testing.assert_close(compiled, eager)
    assert compiled[1].abs().sum() > 0  # row 1 got the text-only output, not zeros


def test_neighbor_attention_is_in_state_dict_and_trainable(cfg, model):
    names = [n for n, _ in model.named_parameters() if n.startswith("neighbor_attention")]
    assert any(n.endswith(".gate") for n in names)
    assert not any(k.startswith("neighbor_attention") for k in model.unet.state_dict())
    # gates get gradient at zero init, so the branch can switch itself on
    b = random_batch(cfg)
    x, t, s, m = _inputs(cfg, b)
    model(x, t, s, m, _encode(model, b)).pow(2).mean().backward()
    assert all(a.gate.grad is not None and a.gate.grad.abs().sum() > 0 for a in model.neighbor_attention.values())


def test_all_neighbors_masked_still_runs(cfg, model):
    b = random_batch(cfg)
    b["neighbor_mask"][:] = False
    feats = _encode(model, b)
    assert not feats.mask.any()
    x, t, s, m = _inputs(cfg, b)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, s, m, open_gates(model) and feats), model(x, t, s, m))


def test_model_parameter_count_is_reported(cfg):
    m = NeighborUNet.from_model_config(cfg.model, cross_attention_dim=32)
    assert 1e5 < sum(p.numel() for p in m.parameters()) < 1e6  # debug stays tiny
