"""Diffusion math: losses, guidance identities, cached neighbor features, overfitting."""

import dataclasses

import pytest
import torch

from conftest import open_gates, random_batch
from neighbor_diffusion import diffusion as D
from neighbor_diffusion.text import null_text


def _cond(cfg, model, B=2, seed=0):
    b = random_batch(cfg, B=B, seed=seed)
    feats = model.encode_neighbors(
        b["neighbor_images"], b["neighbor_text_states"], b["neighbor_text_mask"], b["neighbor_mask"]
    )
    return b, feats


def test_condition_dropout_frequencies(cfg):
    g = torch.Generator().manual_seed(0)
    dt, dn = D.condition_dropout(200_000, cfg.diffusion, g)
    d = cfg.diffusion
    assert abs((dt & ~dn).float().mean() - d.p_drop_text) < 0.01
    assert abs((dn & ~dt).float().mean() - d.p_drop_neighbors) < 0.01
    assert abs((dt & dn).float().mean() - d.p_drop_both) < 0.01


def test_timestep_bias_frequencies(cfg):
    g = torch.Generator().manual_seed(0)
    uniform = D.sample_timesteps(200_000, cfg.diffusion, g)
    assert uniform.min() == 0 and uniform.max() == cfg.diffusion.num_train_timesteps - 1
    assert abs((uniform >= 900).float().mean() - 0.1) < 0.01
    biased = dataclasses.replace(cfg.diffusion, timestep_bias_portion=0.1, timestep_bias_multiplier=5.0)
    t = D.sample_timesteps(200_000, biased, g)
    assert t.min() == 0 and t.max() == cfg.diffusion.num_train_timesteps - 1
    assert abs((t >= 900).float().mean() - 0.5 / 1.4) < 0.01  # 0.1 x 5 against 0.9 x 1
    assert abs((t < 450).float().mean() - 0.45 / 1.4) < 0.01  # uniform below the biased portion


def test_loss_uses_injected_noise_and_dropped_conditions(cfg, model):
    b = random_batch(cfg)
    sched = D.train_scheduler(cfg.diffusion)
    t = torch.tensor([10, 900])
    noise = torch.randn_like(b["image"])
    keep = (torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    l1 = D.training_losses(model, b, sched, cfg.diffusion, t=t, noise=noise, drop=keep)
    l2 = D.training_losses(model, b, sched, cfg.diffusion, t=t, noise=noise, drop=keep)
    assert torch.equal(l1, l2)
    # dropping the text equals feeding the null text by hand
    drop_text = (torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    manual = dict(b)
    manual["text_states"], manual["text_mask"] = null_text(2, b["text_states"].shape[1], 32)
    torch.testing.assert_close(
        D.training_losses(model, b, sched, cfg.diffusion, t=t, noise=noise, drop=drop_text),
        D.training_losses(model, manual, sched, cfg.diffusion, t=t, noise=noise, drop=keep),
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_bf16_training_noises_the_least_noisy_timesteps_too(cfg, prediction_type):
    """In bf16 (GPU training) diffusers' add_noise rounded alphas_cumprod near 1 to 1: x_t == x0 for t <= 20."""
    seen = []

    class Spy(torch.nn.Module):  # the model's place: records its input, predicts 0
        def encode_neighbors(self, *args):
            return None

        def forward(self, x_t, t, *args):
            seen.append(x_t)
            return torch.zeros_like(x_t)

    dcfg = dataclasses.replace(cfg.diffusion, prediction_type=prediction_type)
    sched = D.train_scheduler(dcfg)
    b = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in random_batch(cfg).items()}
    t, noise = torch.tensor([5, 15]), torch.randn_like(b["image"])
    keep = (torch.zeros(2, dtype=torch.bool),) * 2
    loss = D.training_losses(Spy(), b, sched, dcfg, t=t, noise=noise, drop=keep)
    x_t = sched.add_noise(b["image"].float(), noise.float(), t)
    assert seen[0].dtype == torch.bfloat16 and not torch.equal(seen[0], b["image"])
    torch.testing.assert_close(seen[0].float(), x_t, atol=8e-3, rtol=0)  # bf16's rounding of x_t, not of alphas
    target = noise.float() if prediction_type == "epsilon" else sched.get_velocity(b["image"].float(), noise.float(), t)
    torch.testing.assert_close(loss, target.pow(2).mean(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_is_clipped_snr_times_x0_error(cfg, model, prediction_type):
    """Min-SNR-gamma: whatever the parametrisation, the weighted loss is min(SNR, gamma) x the x0 error."""
    gamma = 5.0
    dcfg = dataclasses.replace(cfg.diffusion, prediction_type=prediction_type, snr_gamma=gamma)
    sched = D.train_scheduler(dcfg)
    b = random_batch(cfg)
    t, noise = torch.tensor([20, 700]), torch.randn_like(b["image"])  # SNR above and below gamma
    keep = (torch.zeros(2, dtype=torch.bool),) * 2
    loss = D.training_losses(model, b, sched, dcfg, t=t, noise=noise, drop=keep)
    feats = model.encode_neighbors(
        b["neighbor_images"], b["neighbor_text_states"], b["neighbor_text_mask"], b["neighbor_mask"]
    )
    x_t = sched.add_noise(b["image"], noise, t)
    pred = model(x_t, t, b["text_states"], b["text_mask"], feats)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    if prediction_type == "v_prediction":
        x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * pred
    else:
        x0_hat = (x_t - (1 - a).sqrt() * pred) / a.sqrt()
    snr = (a / (1 - a)).flatten()
    assert snr[0] > gamma > snr[1]
    x0_err = (x0_hat - b["image"]).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (snr.clamp(max=gamma) * x0_err).mean(), rtol=1e-4, atol=1e-6)


def test_v_prediction_target(cfg, model):
    dcfg = dataclasses.replace(cfg.diffusion, prediction_type="v_prediction")
    sched = D.train_scheduler(dcfg)
    b = random_batch(cfg)
    t, noise = torch.tensor([5, 500]), torch.randn_like(b["image"])
    keep = (torch.zeros(2, dtype=torch.bool),) * 2
    loss = D.training_losses(model, b, sched, dcfg, t=t, noise=noise, drop=keep)
    feats = model.encode_neighbors(
        b["neighbor_images"], b["neighbor_text_states"], b["neighbor_text_mask"], b["neighbor_mask"]
    )
    pred = model(sched.add_noise(b["image"], noise, t), t, b["text_states"], b["text_mask"], feats)
    v = sched.get_velocity(b["image"], noise, t)
    torch.testing.assert_close(loss, ((pred - v) ** 2).mean())


def test_guidance_weight_one_is_the_conditional_prediction(cfg, model):
    open_gates(model)
    b, feats = _cond(cfg, model)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    with torch.no_grad():
        cond = model(x, t, b["text_states"], b["text_mask"], feats)
        guided = D.guided_prediction(
            model, x, t, b["text_states"], b["text_mask"], feats, 1.0, 1.0, ("full", "no_text", "no_neighbors")
        )
        strong = D.guided_prediction(
            model, x, t, b["text_states"], b["text_mask"], feats, 5.0, 1.0, ("full", "no_text", "no_neighbors")
        )
    torch.testing.assert_close(guided, cond, atol=1e-5, rtol=1e-5)
    assert (strong - cond).abs().max() > 1e-3


def test_batched_branches_equal_separate_forwards(cfg, model):
    open_gates(model)
    b, feats = _cond(cfg, model)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([300, 300])
    s, m = b["text_states"], b["text_mask"]
    ns, nm = null_text(2, s.shape[1], 32)
    wt, wn = 4.0, 2.5
    with torch.no_grad():
        full = model(x, t, s, m, feats)
        no_text = model(x, t, ns, nm, feats)
        no_nb = model(x, t, s, m)
        ref = full + (wt - 1) * (full - no_text) + (wn - 1) * (full - no_nb)
        got = D.guided_prediction(model, x, t, s, m, feats, wt, wn, ("full", "no_text", "no_neighbors"))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def _sample(cfg, model, b, feats, **kw):
    d = cfg.diffusion
    sched = D.sampling_scheduler(d, kw.pop("sampler", "ddim"))
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = {**D.thresholding_of(d), **kw}
    return D.sample(model, sched, b["text_states"], b["text_mask"], feats, num_inference_steps=6, x_T=x_T, **kw)


@pytest.mark.parametrize("eta, equivalent", [(0.0, dict(neighbor_guidance=1.0)), (1.0, dict(text_guidance=1.0))])
def test_interleaved_extremes_equal_pure_guidance(cfg, model, eta, equivalent):
    open_gates(model)
    b, feats = _cond(cfg, model)
    weights = dict(text_guidance=3.0, neighbor_guidance=2.0)
    inter = _sample(cfg, model, b, feats, guidance_mode="interleaved", interleave_ratio=eta, **weights)
    pure = _sample(cfg, model, b, feats, guidance_mode="joint", **{**weights, **equivalent})
    torch.testing.assert_close(inter, pure, atol=1e-5, rtol=1e-5)
    other = _sample(cfg, model, b, feats, guidance_mode="joint", **weights)
    assert (inter - other).abs().max() > 1e-4  # the extremes are not the joint guidance


def test_interleaved_rows_take_their_choices_from_their_own_seeds(cfg, model, monkeypatch):
    """Three rows with their own seeds choose differently at some steps (where they do, one forward with a
    mixed second branch: no_neighbors in some rows, no_text in the others), and each row's sample is the one
    it gets alone with its seed."""
    open_gates(model)
    b = random_batch(cfg, B=3)
    d, seeds = cfg.diffusion, [1, 2, 3]
    x_T = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(guidance_mode="interleaved", interleave_ratio=0.5, text_guidance=3.0, neighbor_guidance=2.0)
    kw |= D.thresholding_of(d)

    @torch.no_grad()
    def run(rows, seed):
        keys = ("neighbor_images", "neighbor_text_states", "neighbor_text_mask", "neighbor_mask")
        feats = model.encode_neighbors(*(b[k][rows] for k in keys))
        states, mask = b["text_states"][rows], b["text_mask"][rows]
        sched = D.sampling_scheduler(d, "ddim")
        return D.sample(model, sched, states, mask, feats, num_inference_steps=8, x_T=x_T[rows], seed=seed, **kw)

    branches, guided = [], D.guided_prediction
    monkeypatch.setattr(D, "guided_prediction", lambda *a, **k: branches.append(a[8]) or guided(*a, **k))
    together = run([0, 1, 2], seeds)
    assert ("full", "mixed") in branches, branches
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], run([i], seeds[i]), atol=1e-5, rtol=1e-5)
    one_seed = run([0, 1, 2], seeds[0])  # every row takes row 0's choices
    assert (one_seed[1:] - together[1:]).abs().max() > 1e-3


def test_cached_neighbor_features_equal_recomputed(cfg, model):
    open_gates(model)
    b, feats = _cond(cfg, model)
    calls = []

    def recompute():
        calls.append(1)
        return _cond(cfg, model)[1]

    cached = _sample(cfg, model, b, feats, text_guidance=2.0, neighbor_guidance=2.0)
    again = _sample(cfg, model, b, recompute, text_guidance=2.0, neighbor_guidance=2.0)
    assert len(calls) == 6
    torch.testing.assert_close(cached, again)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
@pytest.mark.parametrize("thresholding", ["dynamic", "static", "none"])
def test_samplers_are_seeded_and_bounded(cfg, model, sampler, thresholding):
    open_gates(model)
    b, feats = _cond(cfg, model)
    dcfg = dataclasses.replace(cfg.diffusion, thresholding=thresholding)
    cfg = dataclasses.replace(cfg, diffusion=dcfg)
    a = _sample(cfg, model, b, feats, sampler=sampler, text_guidance=8.0)
    again = _sample(cfg, model, b, feats, sampler=sampler, text_guidance=8.0)
    assert torch.equal(a, again)
    assert a.abs().max() <= 1.0
    assert torch.isfinite(a).all()


def test_static_clipping_is_x0_clipped_to_unit_range():
    x0 = torch.tensor([[[[3.0, -2.0], [0.5, -0.25]]]])
    assert torch.equal(D.threshold_x0(x0, "static"), x0.clamp(-1, 1))
    assert torch.equal(D.threshold_x0(x0, "none"), x0)
    dyn = D.threshold_x0(x0, "dynamic")
    assert dyn.abs().max() <= 1.0 + 1e-6
    assert not torch.equal(dyn, x0.clamp(-1, 1))  # rescaled, not clipped
    inside = torch.tensor([[[[0.9, -0.5], [0.1, 0.0]]]])
    assert torch.equal(D.threshold_x0(inside, "dynamic"), inside)  # s is clamped to >= 1: nothing to do
    with pytest.raises(ValueError, match="thresholding='soft'"):
        D.threshold_x0(x0, "soft")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_scheduler_steps_with_the_thresholded_x0_and_the_noise_that_goes_with_it(cfg, prediction_type, mode):
    """A DDIM step after `thresholded_output` is DDIM's update for (the clipped x0, the eps that x_t and that
    x0 imply). diffusers' own thresholding keeps the eps of the unclipped x0, which broke guided samples."""
    d = dataclasses.replace(cfg.diffusion, prediction_type=prediction_type)
    sched = D.sampling_scheduler(d, "ddim")
    sched.set_timesteps(10)
    t, prev = int(sched.timesteps[3]), int(sched.timesteps[4])
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 3, 8, 8, generator=g), 3 * torch.randn(2, 3, 8, 8, generator=g)
    a, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[prev]
    x0 = (
        (x_t - (1 - a).sqrt() * out) / a.sqrt()
        if prediction_type == "epsilon"
        else a.sqrt() * x_t - (1 - a).sqrt() * out
    )
    clipped = D.threshold_x0(x0, mode)
    assert not torch.allclose(clipped, x0)  # the test needs an x0 that thresholding changes
    eps = (x_t - a.sqrt() * clipped) / (1 - a).sqrt()
    expected = a_prev.sqrt() * clipped + (1 - a_prev).sqrt() * eps
    got = sched.step(D.thresholded_output(out, x_t, t, sched, mode), t, x_t).prev_sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(D.thresholded_output(out, x_t, t, sched, "none"), out)


def test_debug_model_overfits_a_tiny_batch(cfg, model):
    torch.manual_seed(0)
    model.train()
    b = random_batch(cfg, B=2)
    sched = D.train_scheduler(cfg.diffusion)
    t, noise = torch.tensor([200, 600]), torch.randn_like(b["image"])
    keep = (torch.zeros(2, dtype=torch.bool),) * 2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = D.training_losses(model, b, sched, cfg.diffusion, t=t, noise=noise, drop=keep)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses[::10]
