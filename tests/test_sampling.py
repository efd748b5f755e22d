"""Sampler maths against closed-form answers (DESIGN.md §1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from omnisync_core.errors import InputError
from omnisync_core.sampling import (DSCFGGuidance, DSCFGParams, constant_guidance, ds_cfg_weight, flow_sigmas,
                                    progressive_init, sample, seeded_noise, truncate_sigmas)


# ---------------------------------------------------------------- schedule and progressive init

def test_flow_sigmas_endpoints_and_shift():
    for steps, shift in [(1, 1.0), (50, 5.0), (30, 3.0), (7, 1.0)]:
        sigmas = flow_sigmas(steps, shift).double()
        assert sigmas.shape == (steps + 1,)
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
        assert torch.all(sigmas[1:] < sigmas[:-1])
        for i in range(steps + 1):
            s = 1.0 - i / steps
            assert sigmas[i].item() == pytest.approx(shift * s / (1 + (shift - 1) * s), abs=1e-6)
    assert torch.allclose(flow_sigmas(10, 1.0), torch.linspace(1, 0, 11))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_flow_sigmas_rejects_bad_steps(bad):
    with pytest.raises(InputError, match="steps"):
        flow_sigmas(bad)


def test_progressive_init_closed_form():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 3, 8, 8, generator=gen)
    eps = torch.randn(z.shape, generator=gen)
    for tau in (0.0, 0.3, 0.92, 1.0):
        out = progressive_init(z, tau, eps)
        expected = z.numpy() * (1 - tau) + eps.numpy() * tau
        np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    assert torch.equal(progressive_init(z, 0.0, eps), z)
    assert torch.equal(progressive_init(z, 1.0, eps), eps)


def test_progressive_init_rejects_bad_input():
    z = torch.zeros(1, 4, 1, 2, 2)
    with pytest.raises(InputError, match="shape"):
        progressive_init(z, 0.5, torch.zeros(1, 4, 1, 2, 3))
    with pytest.raises(InputError, match="tau"):
        progressive_init(z, 1.5, z)


def test_truncate_sigmas_starts_at_tau():
    sigmas = flow_sigmas(50, 5.0)
    run = truncate_sigmas(sigmas, 0.92)
    assert run[0].item() == pytest.approx(0.92)
    assert torch.all(run[1:] < 0.92)
    assert len(run) == 1 + int((sigmas < 0.92).sum())
    assert torch.equal(truncate_sigmas(sigmas, 1.0), sigmas)
    assert truncate_sigmas(sigmas, 0.0).tolist() == [0.0]
    # A tau that is itself on the schedule is not duplicated.
    on_grid = float(sigmas[10])
    assert len(truncate_sigmas(sigmas, on_grid)) == len(sigmas) - 10


# ---------------------------------------------------------------- DS-CFG weight

def _weight_reference(sigma, mouth, hw, width, base, peak, gamma, s_ratio, floor, sigma_max):
    """Eq. 7-9 (normalised) evaluated pixel by pixel in float64, cell centres at j + 0.5."""
    out = np.zeros((len(mouth), 1, hw[0], hw[1]))
    for b, (mx, my) in enumerate(mouth):
        s = s_ratio * width[b]
        for i in range(hw[0]):
            for j in range(hw[1]):
                d2 = (j + 0.5 - mx) ** 2 + (i + 0.5 - my) ** 2
                spatial = base + (peak - base) * math.exp(-d2 / (2 * s * s))
                out[b, 0, i, j] = max(floor, spatial * (sigma / sigma_max) ** gamma)
    return out


@pytest.mark.parametrize("floor", [1.0, 0.0])
def test_ds_cfg_weight_matches_formula(floor):
    gen = torch.Generator().manual_seed(1)
    hw = (12, 10)
    mouth = torch.rand(3, 2, generator=gen) * torch.tensor([hw[1], hw[0]])
    width = 4 + 6 * torch.rand(3, generator=gen)
    for sigma in (0.92, 0.6, 0.2, 0.0):
        params = dict(omega_base=1.2, omega_peak=5.0, gamma=1.5, s_ratio=0.3, floor=floor, sigma_max=0.92)
        got = ds_cfg_weight(sigma, mouth, hw, width, **params)
        want = _weight_reference(sigma, mouth.double().tolist(), hw, width.double().tolist(),
                                 1.2, 5.0, 1.5, 0.3, floor, 0.92)
        assert got.shape == (3, 1, *hw)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_ds_cfg_weight_peak_and_base():
    hw = (16, 16)
    mouth = torch.tensor([[8.5, 10.5]])         # the centre of cell (row 10, column 8)
    at_start = ds_cfg_weight(0.9, mouth, hw, 6.0, omega_base=1.0, omega_peak=4.5, gamma=1.5, s_ratio=0.15,
                             floor=0.0, sigma_max=0.9)
    assert at_start[0, 0, 10, 8].item() == pytest.approx(4.5, abs=1e-6)
    assert at_start[0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)   # far from the mouth: omega_base
    assert at_start.max().item() == pytest.approx(4.5, abs=1e-6)
    half = ds_cfg_weight(0.45, mouth, hw, 6.0, floor=0.0, sigma_max=0.9)
    assert half[0, 0, 10, 8].item() == pytest.approx(4.5 * 0.5 ** 1.5, abs=1e-5)
    assert half[0, 0, 0, 0].item() == pytest.approx(0.5 ** 1.5, abs=1e-6)
    floored = ds_cfg_weight(0.45, mouth, hw, 6.0, floor=1.0, sigma_max=0.9)
    assert floored[0, 0, 0, 0].item() == 1.0
    assert ds_cfg_weight(0.0, mouth, hw, 6.0, floor=1.0).eq(1.0).all()
    assert ds_cfg_weight(0.0, mouth, hw, 6.0, floor=0.0).eq(0.0).all()


def test_ds_cfg_weight_no_face_is_flat():
    got = ds_cfg_weight(1.0, torch.tensor([[float("nan"), float("nan")]]), (4, 5), 3.0, omega_base=1.5, floor=0.0)
    assert torch.allclose(got, torch.full((1, 1, 4, 5), 1.5))


def test_ds_cfg_guidance_per_frame_layout():
    mouth = torch.tensor([[[1.5, 1.5], [6.5, 4.5], [3.5, 2.5]]])         # [B=1, T=3, 2]
    guide = DSCFGGuidance(mouth, torch.full((1, 3), 4.0), (6, 8), sigma_max=0.9, params=DSCFGParams(floor=0.0))
    maps = guide(0.9)
    assert maps.shape == (1, 1, 3, 6, 8)
    for t, (x, y) in enumerate([(1, 1), (6, 4), (3, 2)]):
        assert maps[0, 0, t].argmax().item() == y * 8 + x


# ---------------------------------------------------------------- the sampler on an analytic problem

MU = torch.tensor([1.5, -2.0, 0.5, 3.0], dtype=torch.float64)
STD = torch.tensor([0.5, 1.5, 0.1, 1.0], dtype=torch.float64)


def gaussian_velocity(mu, std):
    """Exact flow-matching velocity E[eps - x0 | x_sigma = x] for data x0 ~ N(mu, diag(std^2))."""
    def velocity(x, sigma, with_audio=True):
        t = sigma.to(torch.float64)
        var = (1 - t) ** 2 * std ** 2 + t ** 2
        centred = x - (1 - t) * mu
        mean_x0 = mu + (1 - t) * std ** 2 / var * centred
        mean_eps = t / var * centred
        return mean_eps - mean_x0
    return velocity


def test_sampler_converges_to_the_data_distribution():
    noise = seeded_noise((4096, 4), seed=3, dtype=torch.float64)
    exact = MU + STD * noise                   # the probability-flow ODE maps eps to mu + std * eps
    errors = []
    for steps in (4, 16, 64, 256):
        x, stats = sample(gaussian_velocity(MU, STD), torch.zeros_like(noise), noise, flow_sigmas(steps, 1.0), tau=1.0)
        assert stats.steps == steps and stats.cond_calls == steps and stats.uncond_calls == 0
        errors.append((x - exact).abs().max().item())
    # Euler is first order: 4x the steps gives about 4x less error, down to a small one.
    assert all(a / b > 3.0 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.03
    x, _ = sample(gaussian_velocity(MU, STD), torch.zeros_like(noise), noise, flow_sigmas(1024, 5.0), tau=1.0)
    # With Wan's shift too, the samples have the data's mean and spread (up to the noise draw's own).
    assert torch.allclose(x.mean(0), MU + STD * noise.mean(0), atol=0.02)
    assert torch.allclose(x.std(0), STD * noise.std(0), rtol=0.03)


def test_progressive_init_keeps_samples_near_the_source():
    gen = torch.Generator().manual_seed(4)
    z_src = MU + STD * torch.randn(512, 4, generator=gen, dtype=torch.float64)
    noise = seeded_noise(z_src.shape, seed=5, dtype=torch.float64)
    distances, counts = [], []
    for tau in (1.0, 0.92, 0.7, 0.5, 0.2, 0.0):
        x, stats = sample(gaussian_velocity(MU, STD), z_src, noise, flow_sigmas(50, 5.0), tau=tau)
        distances.append((x - z_src).norm(dim=1).mean().item())
        counts.append(stats.steps)
    assert all(b < a for a, b in zip(distances, distances[1:])), distances
    assert distances[-1] == 0.0 and counts[-1] == 0
    sigmas = flow_sigmas(50, 5.0)
    assert counts[1] == int((sigmas < 0.92).sum())   # steps below tau, the first one starting at tau


def test_one_euler_step_applies_cfg_formula():
    cond, uncond = gaussian_velocity(MU, STD), gaussian_velocity(-MU, STD)

    def velocity(x, sigma, with_audio):
        return cond(x, sigma) if with_audio else uncond(x, sigma)

    noise = seeded_noise((8, 4), seed=6, dtype=torch.float64)
    x, stats = sample(velocity, torch.zeros_like(noise), noise, flow_sigmas(1, 1.0), tau=1.0,
                      guidance=constant_guidance(3.0))
    one = torch.tensor(1.0)
    expected = noise - (uncond(noise, one) + 3.0 * (cond(noise, one) - uncond(noise, one)))
    assert torch.allclose(x, expected, atol=1e-12)
    assert (stats.cond_calls, stats.uncond_calls, stats.skipped_uncond) == (1, 1, 0)
    _, plain = sample(velocity, torch.zeros_like(noise), noise, flow_sigmas(5, 1.0), tau=1.0,
                      guidance=constant_guidance(1.0))
    assert plain.uncond_calls == 0 and plain.skipped_uncond == 5


def test_ds_cfg_skips_unconditional_pass_where_weight_is_one():
    calls = {True: 0, False: 0}
    base = gaussian_velocity(torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))

    def velocity(x, sigma, with_audio):
        calls[with_audio] += 1
        return base(x, sigma) * (1.0 if with_audio else 0.5)

    tau, peak, gamma = 0.92, 4.5, 1.5
    latent = torch.zeros(1, 2, 3, 8, 8, dtype=torch.float64)
    mouth = torch.tensor([[[3.5, 4.5]] * 3])                     # on a cell centre: max S = peak
    guide = DSCFGGuidance(mouth, torch.full((1, 3), 5.0), (8, 8), sigma_max=tau,
                          params=DSCFGParams(omega_peak=peak, gamma=gamma, floor=1.0))
    noise = seeded_noise(latent.shape, seed=7, dtype=torch.float64)
    sigmas = flow_sigmas(50, 5.0)
    _, stats = sample(velocity, latent, noise, sigmas, tau=tau, guidance=guide)
    run = truncate_sigmas(sigmas, tau)[:-1]
    expected_skips = int(sum(peak * (float(s) / tau) ** gamma <= 1.0 for s in run))
    assert 0 < expected_skips < len(run)
    assert stats.skipped_uncond == expected_skips
    assert stats.uncond_calls == len(run) - expected_skips == calls[False]
    assert stats.cond_calls == len(run) == calls[True]
    assert stats.model_calls == calls[True] + calls[False]


def test_callback_reports_progress_and_can_interrupt():
    seen = []

    class Interrupted(Exception):
        pass

    def callback(step, total, x):
        seen.append((step, total))
        if step == 3:
            raise Interrupted

    noise = seeded_noise((2, 4), seed=0, dtype=torch.float64)
    with pytest.raises(Interrupted):
        sample(gaussian_velocity(MU, STD), torch.zeros_like(noise), noise, flow_sigmas(10, 1.0), tau=1.0,
               callback=callback)
    assert seen == [(1, 10), (2, 10), (3, 10)]


def test_seeded_noise_is_reproducible():
    a = seeded_noise((2, 3, 4), seed=42)
    assert torch.equal(a, seeded_noise((2, 3, 4), seed=42))
    assert not torch.equal(a, seeded_noise((2, 3, 4), seed=43))
    assert torch.equal(seeded_noise((2, 3, 4), seed=42, dtype=torch.bfloat16), a.to(torch.bfloat16))
    if torch.cuda.is_available():
        assert torch.equal(seeded_noise((2, 3, 4), seed=42, device="cuda").cpu(), a)
