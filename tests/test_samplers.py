"""Samplers driven by exact analytic denoisers.

For data x0 ~ N(mu, Sigma), x_t = sqrt(a) x0 + sqrt(1 - a) eps is Gaussian too, and the optimal eps-predictor is
    E[eps | x_t] = sqrt(1 - a) (a Sigma + (1 - a) I)^{-1} (x_t - sqrt(a) mu),
so a sampler run with it must reproduce the data distribution up to its discretisation error. For a mixture,
E[eps | x_t] is the same per component, weighted by the component's posterior responsibility at x_t. The
deterministic samplers also have an exact target: in DDIM's variables xbar = x / sqrt(a), sigma^2 = (1 - a) / a
the probability-flow ODE (DDIM eq. 14) is dxbar/dsigma = sigma (Sigma + sigma^2 I)^{-1} (xbar - mu), solved along
each eigenvector u_k of Sigma (eigenvalue lam_k) by xbar_k - mu_k proportional to sqrt(lam_k + sigma^2).
These run in float64, on one thread (the analytic model's tiny matrix products only slow down
when several threads fight over shared cores). At the end, what sample.py makes of a sampler's steps (the
reverse-process GIF) and its sweeps, drawn from the suite's tiny trained models.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

import sample
from ddpm.guidance import classifier_free_guidance
from ddpm.samplers import (SAMPLERS, ddim_sample, ddpm_sample, make_timesteps, per_sample_noise,
                           pndm_sample, spndm_sample)
from ddpm.schedule import Schedule, make_betas
from helpers import RES

T = 1000
F64 = torch.float64


def alpha_bar(kind: str = "linear", num_timesteps: int = T) -> torch.Tensor:
    """abar computed here, independently of Schedule."""
    return torch.tensor(np.cumprod(1 - make_betas(kind, num_timesteps)), dtype=F64)


class GaussianMixture:
    """Exact eps-predictor for data sum_k w_k N(m_k, S_k), shaped (B, D, 1, 1); one component = a Gaussian."""

    def __init__(self, weights, means, covs, abar: torch.Tensor):
        self.w = torch.tensor(weights, dtype=F64)
        self.m = torch.tensor(means, dtype=F64)                     # (K, D)
        self.S = torch.tensor(covs, dtype=F64)                      # (K, D, D)
        a = abar.view(-1, 1, 1, 1)
        eye = torch.eye(self.m.shape[1], dtype=F64)
        cov_t = a * self.S + (1 - a) * eye                          # (T, K, D, D): Cov(x_t | component k)
        self.precision = torch.linalg.inv(cov_t)
        self.logdet = torch.linalg.slogdet(cov_t)[1]                # (T, K)
        self.abar = abar

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Samplers evaluate a whole batch at one timestep, which keeps this model a few matrix products.
        assert bool((t == t[0]).all()), "the analytic model expects one timestep per batch"
        a, t = self.abar[t[0]].item(), int(t[0])
        r = x.flatten(1).unsqueeze(1) - math.sqrt(a) * self.m      # (B, K, D): x_t - sqrt(a) m_k
        p_r = torch.einsum("kij,bkj->bki", self.precision[t], r)
        log_resp = self.w.log() - 0.5 * self.logdet[t] - 0.5 * torch.einsum("bki,bki->bk", r, p_r)
        resp = torch.softmax(log_resp, dim=1)                       # posterior responsibility of each component
        return (math.sqrt(1 - a) * torch.einsum("bk,bki->bi", resp, p_r)).view_as(x)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (self.w[:, None] * self.m).sum(0)
        second = (self.w[:, None, None] * (self.S + self.m[:, :, None] * self.m[:, None, :])).sum(0)
        return mean, second - mean[:, None] * mean[None, :]


GAUSSIAN = dict(weights=[1.0], means=[[0.4, -0.3]], covs=[[[0.30, 0.10], [0.10, 0.15]]])
MIXTURE = dict(weights=[0.3, 0.7], means=[[-0.6, 0.2], [0.5, -0.1]],
               covs=[[[0.05, 0.02], [0.02, 0.08]], [[0.10, -0.03], [-0.03, 0.06]]])


def exact_flow(data: GaussianMixture, x_T: torch.Tensor, t_start: int) -> torch.Tensor:
    """The exact probability-flow ODE map from x at timestep t_start to the clean image (Gaussian data only)."""
    mu, sigma = data.m[0], data.S[0]
    lam, u = torch.linalg.eigh(sigma)
    a = data.abar[t_start].item()
    s2 = (1 - a) / a
    xbar = x_T.flatten(1) / math.sqrt(a)
    coord = (xbar - mu) @ u * torch.sqrt(lam / (lam + s2))         # shrink each eigen-coordinate to sigma = 0
    return (mu + coord @ u.T).view_as(x_T)


# Sampler distributions. Each run draws N samples; the tolerance on every mean and covariance entry is
# 5 standard errors (estimated from the samples: sd / sqrt(N) for means, sd of the centred products /
# sqrt(N) for covariances) plus a discretisation allowance of 0.01 (3-20 % of the data variances). Step
# counts are chosen so that each sampler's bias, measured once with N = 100k on both data sets, stays below
# that allowance (at most 0.008 here; DDPM with beta_tilde at 250 steps or PNDM at 10 would miss it).
N = 10_000
ALLOWANCE = 0.01
RUNS = {
    "ddpm-small": (ddpm_sample, dict(variance="small"), 500),
    "ddpm-large": (ddpm_sample, dict(variance="large"), 100),
    "ddim-eta0": (ddim_sample, dict(eta=0.0), 200),
    "ddim-eta1": (ddim_sample, dict(eta=1.0), 500),
    "pndm": (pndm_sample, {}, 20),
    "spndm": (spndm_sample, {}, 50),
}


@pytest.mark.parametrize("data_kind", ["gaussian", "mixture"])
@pytest.mark.parametrize("run", list(RUNS))
def test_sampler_reproduces_data_moments(run, data_kind):
    sampler, kwargs, steps = RUNS[run]
    data = GaussianMixture(**(GAUSSIAN if data_kind == "gaussian" else MIXTURE), abar=alpha_bar())
    schedule = Schedule.from_name("linear", T)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, 1, 1, generator=g, dtype=F64)

    def noise():
        return torch.randn(N, 2, 1, 1, generator=g, dtype=F64)

    y = sampler(data, x, schedule, make_timesteps(T, steps), noise=noise, **kwargs).flatten(1)
    mean, cov = data.moments()
    centred = y - y.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    se_mean = y.std(0) / math.sqrt(N)
    se_cov = products.flatten(1).std(0).view(2, 2) / math.sqrt(N)
    assert torch.all((y.mean(0) - mean).abs() < 5 * se_mean + ALLOWANCE), (y.mean(0), mean)
    assert torch.all((products.mean(0) - cov).abs() < 5 * se_cov + ALLOWANCE), (products.mean(0), cov)


def test_ddim_with_eta_one_is_ddpm_with_posterior_variance():
    # DDIM eq. 16 with eta = 1 is the ancestral step of the respaced chain, so with the same noise the two
    # samplers must agree to rounding on any subsequence.
    data = GaussianMixture(**MIXTURE, abar=alpha_bar())
    schedule = Schedule.from_name("linear", T)
    ts = make_timesteps(T, 30, "quadratic")
    outputs = []
    for sampler, kwargs in ((ddpm_sample, dict(variance="small")), (ddim_sample, dict(eta=1.0))):
        x, noise = per_sample_noise(range(8), (8, 2, 1, 1), "cpu", F64)
        outputs.append(sampler(data, x, schedule, ts, noise=noise, **kwargs))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)


def test_deterministic_samplers_converge_to_the_exact_flow_and_pndm_beats_ddim():
    # Error = RMS distance of each sampler's output from the exact ODE solution started at the same x_T at
    # timesteps[-1]. The comparison is at EQUAL STEP COUNT (PNDM's warm start spends 9 extra model calls,
    # S-PNDM's 1); PNDM must also win at equal model evaluations (DDIM given S + 9 steps).
    data = GaussianMixture(**GAUSSIAN, abar=alpha_bar())
    schedule = Schedule.from_name("linear", T)
    x = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=F64)

    def error(sampler, steps):
        ts = make_timesteps(T, steps)
        return (sampler(data, x, schedule, ts) - exact_flow(data, x, int(ts[-1]))).square().mean().sqrt().item()

    scale = data.S[0].diagonal().sum().sqrt().item()
    for steps in (10, 20, 50):
        ddim, pndm, spndm = error(ddim_sample, steps), error(pndm_sample, steps), error(spndm_sample, steps)
        assert pndm < ddim / 5 and spndm < ddim, (steps, ddim, pndm, spndm)
        assert pndm < error(ddim_sample, steps + 9)
    # DDIM is the Euler method in (sigma, xbar) and so first order: doubling the steps about halves its error.
    ratio = error(ddim_sample, 100) / error(ddim_sample, 200)
    assert 1.6 < ratio < 2.4, ratio
    # S-PNDM's multistep is second order: doubling the steps cuts its error by about 4.
    ratio = error(spndm_sample, 50) / error(spndm_sample, 100)
    assert 3 < ratio < 5, ratio
    assert error(ddim_sample, 1000) < 0.01 * scale
    assert error(pndm_sample, 50) < 2e-3 * scale


def test_model_evaluations_follow_the_paper_algorithms():
    # Uniform gaps of 100. F-PNDM: three pseudo Runge-Kutta steps evaluate at t, t - 50 (twice) and t - 100,
    # then one evaluation per step. S-PNDM: improved Euler at t and t - 100, then one per step.
    data = GaussianMixture(**GAUSSIAN, abar=alpha_bar())
    schedule = Schedule.from_name("linear", T)
    ts = make_timesteps(T, 10)
    seen = []

    def recording(x, t):
        seen.append(int(t[0]))
        return data(x, t)

    x = torch.randn(2, 2, 1, 1, generator=torch.Generator().manual_seed(6), dtype=F64)
    pndm_sample(recording, x, schedule, ts)
    warm_up = [900, 850, 850, 800, 800, 750, 750, 700, 700, 650, 650, 600]
    assert seen == warm_up + [600, 500, 400, 300, 200, 100, 0]
    seen.clear()
    spndm_sample(recording, x, schedule, ts)
    assert seen == [900, 800] + [800, 700, 600, 500, 400, 300, 200, 100, 0]


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("spacing,steps", [("uniform", 10), ("quadratic", 7), ("uniform", 4), ("trailing", 6)])
def test_every_sampler_visits_each_timestep_once_and_returns_x0(name, spacing, steps):
    # Data centred outside [-1, 1], so that clip_x0 has something to clip.
    data = GaussianMixture(weights=[1.0], means=[[1.5, -1.2]], covs=[[[0.2, 0.0], [0.0, 0.1]]], abar=alpha_bar())
    schedule = Schedule.from_name("linear", T)
    ts = make_timesteps(T, steps, spacing)
    x, noise = per_sample_noise([1, 2, 3], (3, 2, 1, 1), "cpu", F64)
    seen = []

    def callback(i, t, x_t, x0_pred):
        assert x_t.shape == x0_pred.shape == x.shape
        seen.append((i, t, x0_pred))

    out = SAMPLERS[name](data, x, schedule, ts, callback=callback, noise=noise, clip_x0=True)
    assert [(i, t) for i, t, _ in seen] == list(enumerate(reversed(ts.tolist())))
    # The last jump lands on abar = 1, where every update reduces to x = x0_pred: the output is the final
    # step's x0 prediction (a loop that stopped at x_1 would differ), and with clip_x0 it lies in [-1, 1].
    torch.testing.assert_close(out, seen[-1][2], rtol=0, atol=1e-12)
    assert out.abs().max() <= 1 + 1e-12 and (out.abs() > 1 - 1e-12).any()
    assert all(x0_pred.abs().max() <= 1 for _, _, x0_pred in seen)


def test_sample_k_of_a_batch_equals_sample_k_alone():
    data = GaussianMixture(**MIXTURE, abar=alpha_bar())
    schedule = Schedule.from_name("linear", T)
    ts = make_timesteps(T, 25)
    x, noise = per_sample_noise([11, 22, 33, 44], (4, 2, 1, 1), "cpu", F64)
    batch = ddpm_sample(data, x, schedule, ts, noise=noise)
    for k, seed in enumerate([11, 22, 33, 44]):
        x_k, noise_k = per_sample_noise([seed], (1, 2, 1, 1), "cpu", F64)
        torch.testing.assert_close(x_k[0], x[k], rtol=0, atol=0)
        torch.testing.assert_close(ddpm_sample(data, x_k, schedule, ts, noise=noise_k)[0], batch[k], rtol=0, atol=1e-12)
    # Different seeds give different noise.
    assert not torch.equal(batch[0], batch[1])


def test_classifier_free_guidance():
    calls = []

    def model_fn(x, t, null_mask):
        calls.append((x.shape[0], null_mask.tolist()))
        cond = 2 * x + t.view(-1, 1, 1, 1)
        uncond = -x + 1
        return torch.where(null_mask.view(-1, 1, 1, 1), uncond, cond)

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    t = torch.tensor([1, 5, 9])
    cond, uncond = 2 * x + t.view(-1, 1, 1, 1), -x + 1
    torch.testing.assert_close(classifier_free_guidance(model_fn, 1.0)(x, t), cond)
    torch.testing.assert_close(classifier_free_guidance(model_fn, 0.0)(x, t), uncond)
    assert calls == [(3, [False] * 3), (3, [True] * 3)]
    calls.clear()
    for scale in (3.0, -0.5, 7.5):
        torch.testing.assert_close(classifier_free_guidance(model_fn, scale)(x, t), uncond + scale * (cond - uncond))
    assert calls == [(6, [False] * 3 + [True] * 3)] * 3


def test_user_errors():
    schedule = Schedule.from_name("linear", 100)
    data = GaussianMixture(**GAUSSIAN, abar=alpha_bar("linear", 100))
    x = torch.zeros(2, 2, 1, 1, dtype=F64)
    with pytest.raises(ValueError, match="steps must be <= T"):
        make_timesteps(100, 200)
    with pytest.raises(ValueError, match="strictly increasing"):
        ddim_sample(data, x, schedule, torch.tensor([20, 10]))
    with pytest.raises(ValueError, match=r"lie in \[0, 100\)"):
        ddim_sample(data, x, schedule, torch.tensor([-1, 10]))
    with pytest.raises(ValueError, match=r"lie in \[0, 100\)"):
        ddim_sample(data, x, schedule, torch.tensor([0, 100]))
    with pytest.raises(ValueError, match="at least 4 timesteps"):
        pndm_sample(data, x, schedule, make_timesteps(100, 3))
    with pytest.raises(ValueError, match="at least 2 timesteps"):
        spndm_sample(data, x, schedule, make_timesteps(100, 1))
    with pytest.raises(ValueError, match="variance"):
        ddpm_sample(data, x, schedule, make_timesteps(100, 3), variance="learned")
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(data, x, schedule, make_timesteps(100, 3), eta=2.0)
    with pytest.raises(ValueError, match="len\\(seeds\\)"):
        per_sample_noise([1, 2], (3, 2, 1, 1), "cpu")


@pytest.mark.parametrize("name, tolerance", [("pndm", 0.02), ("spndm", 0.1)])
def test_pndm_with_trailing_spacing_follows_the_exact_flow_its_first_step_from_pure_noise_a_ddim_step(
        name, tolerance, monkeypatch):
    """Trailing spacing starts at T - 1. PNDM mixes eps from several points and turns the mix into x0 with a factor
    1 / sqrt(abar) of the step's start: 160 under the linear schedule, 20,000 under the cosine one, where the
    mixed first step explodes; there the first step is a DDIM step (eps from x alone), and both schedules follow
    the exact probability-flow map from T - 1 (20 steps; S-PNDM's second order leaves more error)."""
    import ddpm.samplers as samplers
    x = torch.randn(500, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    trailing = make_timesteps(T, 20, "trailing")
    for kind in ("linear", "cosine"):
        data, schedule = GaussianMixture(**GAUSSIAN, abar=alpha_bar(kind)), Schedule.from_name(kind, T)
        first_x0 = {}
        for sampler in (name, "ddim"):
            def callback(step, t, x_t, x0, sampler=sampler):
                first_x0.setdefault(sampler, x0)
            out = SAMPLERS[sampler](data, x, schedule, trailing, callback=callback)
            if sampler == name:
                assert (out - exact_flow(data, x, T - 1)).abs().max() < tolerance, kind
        # The first step's x0 is DDIM's where T - 1 is pure noise (cosine), the mixed warm-up's elsewhere.
        assert torch.equal(first_x0[name], first_x0["ddim"]) == (kind == "cosine")
    monkeypatch.setattr(samplers, "MIXED_STEP_MIN_ABAR", 0.0)  # the mixed first step, where it starts at abar 2e-9
    assert (SAMPLERS[name](data, x, schedule, trailing) - exact_flow(data, x, T - 1)).abs().max() > 1.0


@pytest.mark.parametrize("name, steps, spacing", [("ddim", 10, "uniform"), ("pndm", 10, "uniform"), ("pndm", 50, "uniform"),
                                                  ("ddpm", 50, "uniform"), ("ddpm", 1000, "uniform"),
                                                  ("ddim", 10, "trailing"), ("ddpm", 10, "trailing")])
def test_samplers_follow_diffusers_schedulers_step_for_step(name, steps, spacing):
    """A reference implementation, where it is installed (an optional extra, never a dependency): diffusers'
    DDIMScheduler, PNDMScheduler (PRK warm-up, then PLMS) and DDPMScheduler (variance "fixed_small", fed the
    same noise draws) at DDPM's linear schedule, with x0 left unclipped and the last step reaching alpha-bar 1,
    give the same images as ours from the same start and the same (non-linear) eps-predictor. Theirs keep
    alpha-bar in float32, hence a tolerance of float32's precision. Our uniform spacing is their "leading" at
    the step counts here, which divide T (elsewhere theirs steps by T // S), our trailing their "trailing"."""
    schedulers = pytest.importorskip("diffusers.schedulers", reason="diffusers is not installed (bench extra)")

    def eps(x, t):
        level = t.to(x.dtype).view(-1, 1, 1, 1) / T
        return 0.9 * torch.tanh(0.7 * x + level) + 0.1 * torch.sin(3 * x)

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    draws = torch.Generator().manual_seed(1)
    ours = {"ddim": ddim_sample, "pndm": pndm_sample, "ddpm": ddpm_sample}[name](
        eps, x, Schedule(make_betas("linear", T)), make_timesteps(T, steps, spacing),
        noise=lambda: torch.randn(x.shape, generator=draws, dtype=F64))
    common = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  timestep_spacing={"uniform": "leading", "trailing": "trailing"}[spacing])
    theirs = {"ddim": lambda: schedulers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **common),
              "pndm": lambda: schedulers.PNDMScheduler(skip_prk_steps=False, set_alpha_to_one=True, **common),
              "ddpm": lambda: schedulers.DDPMScheduler(clip_sample=False, variance_type="fixed_small", **common)}[name]()
    theirs.set_timesteps(steps)
    draws.manual_seed(1)
    y = x
    for t in theirs.timesteps:
        extra = {"generator": draws} if name == "ddpm" else {}
        y = theirs.step(eps(y, t.repeat(len(y))), t, y, **extra).prev_sample
    assert (ours - y).abs().max() <= 2e-5 * y.abs().max()


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("name", ["ddim", "pndm", "spndm", "ddpm"])
def test_v_and_x0_models_sample_in_float32_as_in_float64_even_from_pure_noise(name, prediction):
    # Trailing spacing under the cosine schedule starts at abar = 2.4e-9, where eps = sqrt(1 - abar) x_t +
    # sqrt(abar) v holds v in its last 5e-5: in float32 that step alone put x0 off by up to 7e-3 and the
    # final sample off by 5e-4. A GuidedModel gives eps in float64 there, and the step runs in float64.
    schedule = Schedule(make_betas("cosine", T))

    def net(x, t):  # a smooth stand-in for a network's v or x0 output
        return 0.9 * torch.tanh(0.7 * x + t.to(x.dtype).view(-1, 1, 1, 1) / T) + 0.1 * torch.sin(3 * x)

    def model_fn(x, t, mask, float64=False):
        out = net(x, t)
        return schedule.to_eps(x.double(), t, out.double(), prediction) if float64 else schedule.to_eps(x, t, out, prediction)

    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    z = torch.randn(12, *x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)

    def run(dtype, model):
        draws = iter(z.to(dtype))
        return SAMPLERS[name](model, x.to(dtype), schedule, make_timesteps(T, 10, "trailing"),
                              noise=lambda: next(draws)).double()

    exact = run(F64, classifier_free_guidance(model_fn, 1.0))
    error = (run(torch.float32, classifier_free_guidance(model_fn, 1.0)) - exact).abs().max()
    # A plain callable gives float32 eps: the error the float64 step removes (so this test can fail).
    rounded = (run(torch.float32, lambda x, t: model_fn(x, t, None)) - exact).abs().max()
    assert error < 3e-6 and rounded > 30 * error


def test_eps_model_converts_v_in_float64_when_asked():
    from ddpm.generate import eps_model
    from ddpm.unet import UNet, UNetConfig
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mult=(1,), num_res_blocks=1,
                          attention_resolutions=())).eval()
    for p in net.parameters():  # away from the zero-initialised output
        p.data += 0.05 * torch.randn_like(p)
    schedule = Schedule.from_name("cosine", T)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([999, 999])
    with torch.no_grad():
        v = net(x, t).double()
        model = eps_model(net, schedule, "v")
        precise, rounded = model.guided_eps(x, t, float64=True), model.guided_eps(x, t)
        assert precise.dtype == F64 and rounded.dtype == torch.float32
        torch.testing.assert_close(precise, schedule.to_eps(x.double(), t, v, "v"), rtol=0, atol=1e-12)
        # x0 from it is v's own x0; from the float32 eps, off by far more.
        rebuilt = schedule.x0_from_eps(x.double(), t, precise)
        assert (rebuilt - schedule.x0_from_v(x.double(), t, v)).abs().max() < 1e-9
        assert (schedule.x0_from_eps(x.double(), t, rounded.double()) - rebuilt).abs().max() > 1e-4


def test_a_guidance_function_without_the_float64_keyword_is_called_as_documented():
    # model_fn(x, t, reference_mask), as ClassifierFreeGuidance documents it, also where a step is near pure
    # noise (the linear schedule's t = 999: abar 4e-5); one that takes float64 (or **kwargs) is asked for it there.
    schedule, x = Schedule(make_betas("linear", T)), torch.randn(2, 3, 4, 4, dtype=torch.float32)
    asked = []

    def with_keyword(x, t, mask, **kwargs):
        asked.append(kwargs.get("float64", False))
        return x * 0.1 + mask.view(-1, 1, 1, 1)

    plain = classifier_free_guidance(lambda x, t, mask: x * 0.1 + mask.view(-1, 1, 1, 1), 2.0)
    exact = classifier_free_guidance(with_keyword, 2.0)
    for name in ("ddim", "pndm", "ddpm"):
        ts = make_timesteps(T, 10, "trailing")
        torch.manual_seed(0)
        a = SAMPLERS[name](plain, x, schedule, ts)
        torch.manual_seed(0)
        b = SAMPLERS[name](exact, x, schedule, ts)
        assert a.dtype == b.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert True in asked and False in asked  # float64 at t = 999 only


def test_a_spacing_that_starts_below_half_of_t_is_warned_about():
    """One uniform step visits t = 0 only: x_T would be taken for a clean image, and the sample stays noise."""
    import warnings
    from ddpm.config import SamplingConfig
    schedule = Schedule(make_betas("linear", 100))
    with pytest.warns(UserWarning, match=r"--steps 1 with --spacing uniform starts at t = 0 of T = 100, .* use "
                                         r"--spacing trailing \(which starts at t = 99\)"):
        SamplingConfig(steps=1).check_against(schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SamplingConfig(steps=1, spacing="trailing").check_against(schedule)
        SamplingConfig(steps=2).check_against(schedule)  # starts at t = 50: half-way, as a 2-step run asks


# ---------------------------------------------------------------------------------------------
# sample.py's reverse-process GIF and sweeps, drawn from the suite's tiny trained models (conftest)


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")).astype(int) for frame in ImageSequence.Iterator(gif)]


def test_every_frame_of_the_reverse_gif_shows_the_same_images(class_ckpt, tmp_path):
    """The frames come from the first batch (4 of the 5 images asked for); the last, the finished images,
    shows those 4 too, laid out as the others (not 5 in rows of 3, of which a 2 x 2 frame shows 0, 1, 3, 4)."""
    out = sample.main(["--ckpt", str(class_ckpt), "--out", str(tmp_path / "out"), "--device", "cpu", "--sampler",
                       "ddim", "--steps", "2", "--num", "5", "--batch-size", "4", "--gif", "--gif-images", "5"])
    frames = gif_frames(out / "reverse.gif")
    assert len(frames) == 3 and all(f.shape == frames[0].shape for f in frames)
    for k in range(4):                                              # 2 x 2: images 0, 1 / 2, 3
        top, left = (2 + (RES + 2) * place for place in divmod(k, 2))  # tiles of RES px, 2 px apart
        tile = frames[-1][top:top + RES, left:left + RES]
        image = np.asarray(Image.open(out / "images" / f"{k:06d}.png").convert("RGB")).astype(int)
        assert np.abs(tile - image).mean() < 4, k                  # (up to the GIF's palette)


def test_the_reverse_gif_holds_at_most_60_frames_of_the_process_then_the_images(class_ckpt, tmp_path):
    out = sample.main(["--ckpt", str(class_ckpt), "--out", str(tmp_path / "out"), "--device", "cpu", "--sampler",
                       "ddim", "--steps", "100", "--num", "1", "--gif"])
    assert len(gif_frames(out / "reverse.gif")) <= 60 + 1         # (every 2nd of the 100 steps, then the image)


@pytest.mark.parametrize("ckpt, extra, message", [
    ("class_ckpt", ["--sweep", "class", "--class", "red"], r"^--sweep class sets the class of each column, so "
                                                          r"--class red would be ignored; drop --class\.$"),
    ("params_ckpt", ["--sweep", "wind=-1:1:3", "--param", "wind=0.5"],
     r"^--sweep wind=-1:1:3 sets wind in each column, so --param wind=0.5 would be ignored; drop that --param\.$"),
])
def test_a_sweep_refuses_what_it_would_ignore(ckpt, extra, message, tmp_path, request):
    with pytest.raises(ValueError, match=message):
        sample.main(["--ckpt", str(request.getfixturevalue(ckpt)), "--out", str(tmp_path / "out"), "--device", "cpu",
                     "--sampler", "ddim", "--steps", "2", "--num", "1", *extra])
    assert not (tmp_path / "out").exists()


def test_a_sweep_beyond_the_training_range_is_warned_of_as_a_param_is(params_ckpt, tmp_path):
    common = ["--ckpt", str(params_ckpt), "--device", "cpu", "--sampler", "ddim", "--steps", "2", "--num", "1"]
    with pytest.warns(UserWarning, match=r"^--sweep 'wind=-3:1:2' reaches outside the range the model was trained on "
                                         r"\(-1 to 1\): its images there are an extrapolation\.$"):
        out = sample.main([*common, "--out", str(tmp_path / "far"), "--sweep", "wind=-3:1:2", "--param", "heat=3"])
    assert (out / "sweep.png").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # within the range: nothing to warn of
        sample.main([*common, "--out", str(tmp_path / "near"), "--sweep", "wind=-1:1:2"])


def test_more_steps_than_the_model_has_timesteps_are_refused_in_field_names_to_code():
    """SamplingConfig.check_against names the field it refuses (a FieldError); sample.py words it as --steps
    (tests/test_reliability.py), the sweep too (tests/test_sweep.py)."""
    from core.errors import FieldError
    from ddpm.config import SamplingConfig
    with pytest.raises(FieldError) as refused:
        SamplingConfig(steps=101).check_against(Schedule(make_betas("linear", 100)))
    assert str(refused.value) == "steps must be at most the model's T = 100, got 101."
