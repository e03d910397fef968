"""Closed-form checks of the forward process: every table against its formula, computed here independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddpm.samplers import make_timesteps
from ddpm.schedule import PREDICTIONS, SCHEDULES, Schedule, make_betas


def python_cumprod(betas: np.ndarray) -> list[float]:
    out, running = [], 1.0
    for beta in betas.tolist():
        running *= 1.0 - beta
        out.append(running)
    return out


def batch_t(t: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), t, dtype=torch.int64)


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("num_timesteps", [1000, 50])
def test_tables_are_cumulative_products_and_valid(kind, num_timesteps):
    betas = make_betas(kind, num_timesteps)
    schedule = Schedule(betas)
    assert betas.dtype == np.float64 and betas.shape == (num_timesteps,)
    assert ((betas > 0) & (betas < 1)).all()
    abar = python_cumprod(betas)
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod_prev.numpy(), [1.0] + abar[:-1], rtol=1e-12)
    assert (np.diff(abar) < 0).all()
    np.testing.assert_allclose(schedule.sqrt_recip_alphas_cumprod.numpy(), [1 / math.sqrt(a) for a in abar], rtol=1e-12)
    np.testing.assert_allclose(schedule.sqrt_recipm1_alphas_cumprod.numpy(), [math.sqrt(1 / a - 1) for a in abar],
                               rtol=1e-10)


def test_linear_endpoints_and_total_noise_across_lengths():
    betas = make_betas("linear", 1000)
    assert betas[0] == pytest.approx(1e-4, rel=1e-12) and betas[-1] == pytest.approx(0.02, rel=1e-12)
    short = make_betas("linear", 100)
    assert short[0] == pytest.approx(1e-3, rel=1e-12) and short[-1] == pytest.approx(0.2, rel=1e-12)
    # Scaling both ends by 1000/T keeps sum(betas) = 1000 * (1e-4 + 0.02) / 2 for every T.
    for num_timesteps in (1000, 250, 100, 21):
        assert make_betas("linear", num_timesteps).sum() == pytest.approx(10.05, rel=1e-12)


def test_cosine_matches_closed_form_alpha_bar():
    num_timesteps, s = 1000, 0.008
    betas = make_betas("cosine", num_timesteps)

    def f(t):
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    abar = Schedule(betas).alphas_cumprod.numpy()
    unclipped = betas < 0.999
    assert unclipped[:-1].all() and betas[-1] == 0.999  # only the last step (abar -> 0) is clipped
    # alphas_cumprod[t] is abar after t + 1 steps, i.e. f(t + 1) / f(0).
    expected = np.array([f(t + 1) / f(0) for t in range(num_timesteps)])
    np.testing.assert_allclose(abar[unclipped], expected[unclipped], rtol=1e-10)


def test_scaled_linear_endpoints():
    betas = make_betas("scaled_linear", 1000)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)
    assert np.allclose(np.diff(np.sqrt(betas)), np.diff(np.sqrt(betas))[0])  # linear in sqrt(beta)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="linear, cosine, scaled_linear"):
        make_betas("quadratic", 1000)
    with pytest.raises(ValueError, match=r"^schedule linear needs num_timesteps above 20 .*, got 20; use more "
                                         r"timesteps or schedule cosine\.$"):
        make_betas("linear", 20)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        Schedule(np.array([0.1, 1.0]))


def test_buffers_are_float64_and_not_in_state_dict():
    schedule = Schedule.from_name("linear", 1000)
    assert schedule.num_timesteps == 1000
    assert schedule.state_dict() == {}
    names = dict(schedule.named_buffers())
    assert len(names) == 12 and all(b.dtype == torch.float64 for b in names.values())


def test_posterior_matches_closed_form_and_product_of_gaussians():
    schedule = Schedule.from_name("cosine", 200)
    betas = schedule.betas.numpy()
    abar = python_cumprod(betas)
    for t in (0, 1, 50, 199):
        beta, a, a_prev = betas[t], abar[t], (abar[t - 1] if t > 0 else 1.0)
        alpha = 1 - beta
        assert schedule.posterior_mean_coef1[t].item() == pytest.approx(beta * math.sqrt(a_prev) / (1 - a), rel=1e-12)
        coef2 = (1 - a_prev) * math.sqrt(alpha) / (1 - a)
        assert schedule.posterior_mean_coef2[t].item() == pytest.approx(coef2, rel=1e-12)
        assert schedule.posterior_variance[t].item() == pytest.approx(beta * (1 - a_prev) / (1 - a), rel=1e-12, abs=0)
        if t == 0:
            continue
        # q(x_{t-1} | x_t, x0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x0): multiply the two Gaussians.
        precision = alpha / beta + 1 / (1 - a_prev)
        x0, x_t = torch.tensor([[0.7], [-0.2]], dtype=torch.float64), torch.tensor([[0.1], [1.5]], dtype=torch.float64)
        mean_expected = (math.sqrt(alpha) * x_t / beta + math.sqrt(a_prev) * x0 / (1 - a_prev)) / precision
        mean, var, log_var = schedule.q_posterior(x_t, batch_t(t, 2), x0)
        torch.testing.assert_close(mean, mean_expected, rtol=1e-12, atol=1e-14)
        assert var.shape == (2, 1) and var[0, 0].item() == pytest.approx(1 / precision, rel=1e-12)
        assert log_var[0, 0].item() == pytest.approx(math.log(1 / precision), rel=1e-12)
    # At t = 0 the variance is 0 and the clipped log-variance borrows t = 1's (improved-diffusion).
    assert schedule.posterior_variance[0].item() == 0
    beta_tilde_1 = schedule.posterior_variance[1].item()
    assert schedule.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(beta_tilde_1), rel=1e-12)


def test_posterior_matches_monte_carlo_of_the_forward_chain():
    # Draw x_{t-1} ~ q(x_{t-1} | x0), then x_t ~ q(x_t | x_{t-1}); regressing x_{t-1} on x_t must recover
    # mean = coef1 x0 + coef2 x_t and residual variance beta_tilde_t.
    schedule, t, x0, n = Schedule.from_name("linear", 100), 30, 0.6, 200_000
    g = torch.Generator().manual_seed(0)
    a_prev, beta = schedule.alphas_cumprod[t - 1].item(), schedule.betas[t].item()
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, generator=g, dtype=torch.float64)
    xc, yc = x_t - x_t.mean(), x_prev - x_prev.mean()
    slope = (xc * yc).sum() / (xc * xc).sum()
    intercept = x_prev.mean() - slope * x_t.mean()
    resid_var = (yc - slope * xc).var()
    coef1, coef2, var = (schedule.posterior_mean_coef1[t].item(), schedule.posterior_mean_coef2[t].item(),
                         schedule.posterior_variance[t].item())
    # Tolerances: 5 standard errors of the OLS slope / intercept and of a variance estimate from n samples.
    se_slope = math.sqrt(var / (n * x_t.var().item()))
    se_intercept = math.sqrt(var / n + (x_t.mean().item() * se_slope) ** 2)
    assert abs(slope.item() - coef2) < 5 * se_slope
    assert abs(intercept.item() - coef1 * x0) < 5 * se_intercept
    assert abs(resid_var.item() - var) < 5 * var * math.sqrt(2 / n)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_prediction_round_trips(prediction):
    schedule = Schedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 250, 500, 999])
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    a = torch.tensor(python_cumprod(schedule.betas.numpy()), dtype=torch.float64)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(schedule.q_sample(x0, t, eps), x_t, rtol=1e-12, atol=1e-12)
    output = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
    torch.testing.assert_close(schedule.training_target(x0, t, eps, prediction), output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.to_eps(x_t, t, output, prediction), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.x0_from_eps(x_t, t, schedule.to_eps(x_t, t, output, prediction)), x0,
                               rtol=1e-9, atol=1e-9)
    x0_from_eps = schedule.x0_from_eps(x_t, t, eps)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, t, x0_from_eps), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.x0_from_v(x_t, t, schedule.v_from_eps(x0, t, eps)), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(schedule.eps_from_v(x_t, t, schedule.v_from_eps(x0, t, eps)), eps, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="eps, x0, v"):
        schedule.to_eps(x_t, t, output, "score")


def test_q_sample_moments():
    schedule, t, n = Schedule.from_name("linear", 1000), 300, 100_000
    x0 = torch.tensor([0.8, -0.5, 0.0], dtype=torch.float64).view(1, 3, 1, 1).expand(n, 3, 1, 1)
    noise = torch.randn(n, 3, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_t = schedule.q_sample(x0, batch_t(t, n), noise)
    a = python_cumprod(schedule.betas.numpy())[t]
    # Tolerances: 5 standard errors, sqrt((1 - abar) / n) for the mean and (1 - abar) sqrt(2 / n) for the variance.
    mean_err = (x_t.mean(0) - math.sqrt(a) * x0[0]).abs().max().item()
    var_err = (x_t.var(0) - (1 - a)).abs().max().item()
    assert mean_err < 5 * math.sqrt((1 - a) / n)
    assert var_err < 5 * (1 - a) * math.sqrt(2 / n)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_losses_zero_for_exact_target_and_positive_otherwise(prediction):
    schedule = Schedule.from_name("cosine", 100)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 5, 50, 99])
    a = torch.tensor(python_cumprod(schedule.betas.numpy()), dtype=torch.float64)[t].view(-1, 1, 1, 1)
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[prediction]

    def exact(x_t, t_in):
        torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)  # the model sees x_t from eq. 4
        assert torch.equal(t_in, t)
        return target

    loss = schedule.training_losses(exact, x0, t, noise, prediction)
    assert loss.shape == (4,) and torch.all(loss.abs() < 1e-24)
    # An output off by 0.1 everywhere has a mean squared error of exactly 0.01.
    loss = schedule.training_losses(lambda x_t, t_in: target + 0.1, x0, t, noise, prediction)
    torch.testing.assert_close(loss, torch.full((4,), 0.01, dtype=torch.float64))


def test_respaced_chain_keeps_alpha_bar_at_the_visited_timesteps():
    schedule = Schedule.from_name("linear", 1000)
    ts = make_timesteps(1000, 10, "quadratic")
    chain = schedule.respaced(ts)
    torch.testing.assert_close(chain.alphas_cumprod, schedule.alphas_cumprod[ts], rtol=1e-12, atol=0)
    full = schedule.respaced(torch.arange(1000))
    for name, table in schedule.named_buffers():
        torch.testing.assert_close(getattr(full, name), table, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
@pytest.mark.parametrize("num_timesteps,steps", [(1000, 1), (1000, 50), (1000, 999), (1000, 1000), (37, 10), (3, 3)])
def test_make_timesteps_properties(spacing, num_timesteps, steps):
    ts = make_timesteps(num_timesteps, steps, spacing)
    assert ts.dtype == torch.int64 and ts.shape == (steps,)
    assert ts[0] >= 0 and ts[-1] < num_timesteps and bool((ts[1:] > ts[:-1]).all())
    if spacing == "trailing":  # ends at the last timestep, every gap T / S rounded
        assert ts[-1] == num_timesteps - 1
        gaps = torch.diff(torch.cat([torch.tensor([-1]), ts]))
        assert bool((gaps - num_timesteps / steps).abs().max() < 1)
    else:
        assert ts[0] == 0


def test_make_timesteps_values_and_errors():
    assert make_timesteps(1000, 4).tolist() == [0, 250, 500, 750]
    # Quadratic: floor(linspace(0, sqrt(800), 5) ** 2) = floor([0, 50, 200, 450, 800]).
    assert make_timesteps(1000, 5, "quadratic").tolist() == [0, 50, 200, 450, 800]
    # Trailing: round((i + 1) T / S) - 1, the uniform steps shifted to end at T - 1.
    assert make_timesteps(1000, 4, "trailing").tolist() == [249, 499, 749, 999]
    assert make_timesteps(1000, 3, "trailing").tolist() == [332, 666, 999]
    with pytest.raises(ValueError, match="steps must be <= T"):
        make_timesteps(100, 101)
    with pytest.raises(ValueError, match="at least 1"):
        make_timesteps(100, 0)
    with pytest.raises(ValueError, match="uniform"):
        make_timesteps(100, 10, "cosine")


@pytest.mark.parametrize("kind, theirs", [("linear", "linear"), ("cosine", "squaredcos_cap_v2"),
                                          ("scaled_linear", "scaled_linear")])
def test_betas_equal_diffusers_schedules(kind, theirs):
    """A reference implementation, where it is installed (an optional extra, never a dependency): each of our
    schedules at T = 1000 is the one diffusers names so (its betas are float32, hence the tolerance)."""
    schedulers = pytest.importorskip("diffusers.schedulers", reason="diffusers is not installed (bench extra)")
    reference = schedulers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs,
                                         **({"beta_start": 0.00085, "beta_end": 0.012} if kind == "scaled_linear" else {}))
    np.testing.assert_allclose(make_betas(kind, 1000), reference.betas.double().numpy(), rtol=1e-6, atol=1e-9)
