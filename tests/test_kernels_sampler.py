"""Tests for the fused sampler update (kernels.sampler_step) and the samplers that call it.

The PyTorch reference is checked against DDIM's eq. 12 and the guided, clipped PNDM step written out by
hand; the Triton op (run by Triton's CPU interpreter) against the reference on odd sizes, both memory
formats and two dtypes; then every sampler, with and without guidance and clipping, on an exact
denoiser: against its paper algorithm written out (float64), and under both backends (float32); and
torch.compile. Tolerances, relative to the largest magnitude of the expected tensor: 1e-5 in float32;
in bfloat16, 1e-2 against the float32 reference on the same values (the module docstring states the same).
"""

import math

import pytest
import torch

import ddpm.samplers
import kernels
from helpers import opcheck, skip_unless_kernels_run
from ddpm.guidance import classifier_free_guidance
from ddpm.samplers import SAMPLERS, make_timesteps, per_sample_noise
from ddpm.schedule import Schedule
from kernels import sampler_step as module
from kernels.sampler_step import Update, sampler_step, sampler_step_reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("on_the_gpu_when_there_is_one")


@pytest.fixture
def triton_kernels():
    skip_unless_kernels_run(module._sampler_step_kernel)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Every element within tolerance * max |expected| (a relative error that near-zero entries cannot inflate)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=tolerance * scale)


def randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator(torch.get_default_device()).manual_seed(seed), dtype=F64).to(dtype)


# ---- the reference against the papers' formulas ----------------------------------------------------


def test_reference_is_ddim_eq_12_written_out():
    x, eps, z = randn((2, 3, 4, 5), 0, F64), randn((2, 3, 4, 5), 1, F64), randn((2, 3, 4, 5), 2, F64)
    a_t, a_prev, eta = 0.3, 0.7, 0.6
    # DDIM eq. 12 with sigma from eq. 16, written from the paper.
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    predicted_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * predicted_x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
    update = Update(1 / math.sqrt(a_t), math.sqrt(1 / a_t - 1), c_x0=math.sqrt(a_prev),
                    c_eps=math.sqrt(1 - a_prev - sigma**2), sigma=sigma)
    x_prev, x0, eps_out = sampler_step_reference(x, eps, update, noise=z)
    torch.testing.assert_close(x_prev, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x0, predicted_x0, rtol=1e-12, atol=1e-12)
    assert eps_out is eps


def test_reference_is_the_guided_clipped_multistep_step_written_out():
    shape = (2, 3, 4, 5)
    x, cond, ref = 3 * randn(shape, 0, F64), randn(shape, 1, F64), randn(shape, 2, F64)
    h1, h2, h3 = randn(shape, 3, F64), randn(shape, 4, F64), randn(shape, 5, F64)
    a_t, a_next, s = 0.4, 0.6, 2.5
    guided = ref + s * (cond - ref)  # Ho & Salimans 2022, eq. 6
    combined = (55 * guided - 59 * h1 + 37 * h2 - 9 * h3) / 24  # PNDM's multistep
    x0 = ((x - math.sqrt(1 - a_t) * combined) / math.sqrt(a_t)).clamp(-1, 1)
    recomputed = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # the eps that lands on the clipped x0
    c_x, c_eps = math.sqrt(a_next / a_t), -0.3
    update = Update(1 / math.sqrt(a_t), math.sqrt(1 / a_t - 1), c_x=c_x, c_eps=c_eps,
                    weights=(55 / 24, -59 / 24, 37 / 24, -9 / 24))
    step = sampler_step_reference(x, cond, update, eps_ref=ref, guidance_scale=s, history=(h1, h2, h3), clip_x0=True)
    assert 0 < (x0.abs() == 1).double().mean() < 1  # some of x0 was clipped
    torch.testing.assert_close(step.x0, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.eps, guided, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.x_prev, c_x * x + c_eps * recomputed, rtol=1e-12, atol=1e-12)


def test_outputs_not_asked_for_are_none():
    x, eps = randn((1, 2, 3, 3), 0), randn((1, 2, 3, 3), 1)
    step = sampler_step_reference(x, eps, Update(1.5, 0.5, c_x0=1.0), return_x0=False, return_eps=False)
    assert step.x0 is None and step.eps is None


# ---- the Triton op against the reference -----------------------------------------------------------

CASES = {
    "plain": dict(),
    "guided": dict(guided=True),
    "noise, no x0": dict(noise=True, return_x0=False),
    "clip, one earlier eps": dict(history=1, clip_x0=True),
    "guided, clip, three earlier eps, noise": dict(guided=True, history=3, clip_x0=True, noise=True),
}


def case_inputs(shape, case: dict, dtype, channels_last: bool) -> tuple[tuple, dict]:
    """(x, eps, update) and the keyword arguments of `sampler_step` for a case; eps in the other layout from x."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = (2 * randn(shape, 0, dtype)).contiguous(memory_format=layout)
    eps = randn(shape, 1, dtype)  # contiguous: the op must match layouts itself
    history = [randn(shape, 10 + k, dtype) for k in range(case.get("history", 0))]
    weights = (1.5, -0.5) if len(history) == 1 else (55 / 24, -59 / 24, 37 / 24, -9 / 24)[:1 + len(history)]
    noisy = case.get("noise", False)
    update = Update(1.6, 1.2, c_x=0.3, c_x0=0.8, c_eps=-0.4, sigma=0.2 if noisy else 0.0, weights=weights)
    kwargs = dict(history=history, clip_x0=case.get("clip_x0", False), return_x0=case.get("return_x0", True),
                  noise=randn(shape, 3, dtype) if noisy else None)
    if case.get("guided"):
        kwargs.update(eps_ref=randn(shape, 2, dtype).contiguous(memory_format=layout), guidance_scale=3.5)
    return (x, eps, update), kwargs


def no_reference(*args, **kwargs):
    raise AssertionError("the Triton path ran the PyTorch reference")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 3, 37, 29)])  # one partial block; several, the last partial
@pytest.mark.parametrize("case", list(CASES))
def test_triton_op_equals_the_reference_in_float32(triton_kernels, monkeypatch, case, shape, channels_last):
    args, kwargs = case_inputs(shape, CASES[case], torch.float32, channels_last)
    expected = sampler_step_reference(*args, **kwargs)
    monkeypatch.setattr(module, "sampler_step_reference", no_reference)
    with kernels.using("triton"):
        actual = sampler_step(*args, **kwargs)
    assert (actual.x0 is None) == (expected.x0 is None) and actual.x_prev.stride() == args[0].stride()
    for a, e in zip(actual, expected):
        if e is not None:
            assert a.dtype == e.dtype and a.shape == e.shape
            assert_close(a, e, TOLERANCE[torch.float32])


@pytest.mark.parametrize("case", ["guided", "guided, clip, three earlier eps, noise"])
def test_triton_op_in_bfloat16_equals_the_float32_reference(triton_kernels, case):
    args, kwargs = case_inputs((1, 3, 5, 7), CASES[case], torch.bfloat16, channels_last=False)

    def upcast(v):
        if isinstance(v, list):
            return [t.float() for t in v]
        return v.float() if isinstance(v, torch.Tensor) else v

    # The reference in float32 on the same (bfloat16) values: the kernel computes in float32 and rounds once.
    expected = sampler_step_reference(*map(upcast, args), **{k: upcast(v) for k, v in kwargs.items()})
    with kernels.using("triton"):
        actual = sampler_step(*args, **kwargs)
    for a, e in zip(actual, expected):
        assert a.dtype == torch.bfloat16
        assert_close(a, e, TOLERANCE[torch.bfloat16])


def test_float64_runs_the_reference_under_triton(triton_kernels):
    args, kwargs = case_inputs((1, 3, 5, 7), CASES["guided"], F64, channels_last=False)
    with kernels.using("triton"):
        actual = sampler_step(*args, **kwargs)
    for a, e in zip(actual, sampler_step_reference(*args, **kwargs)):
        assert torch.equal(a, e)


# ---- the samplers under both backends --------------------------------------------------------------

T = 100
SHAPE = (2, 3, 5, 7)


class GaussianPixels:
    """The exact eps-predictor for data whose pixels are independent N(mean, 0.3^2):
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a 0.3^2 + 1 - a), a = abar_t. float32."""

    def __init__(self, schedule: Schedule, dtype: torch.dtype = torch.float32):
        self.abar = schedule.alphas_cumprod.to(dtype)
        self.means = 1.2 * randn((2, *SHAPE[1:]), 7, dtype)  # conditional, reference; partly outside [-1, 1]

    def __call__(self, x, t, reference_mask=None):
        a = self.abar[t].view(-1, 1, 1, 1)
        which = torch.zeros_like(t) if reference_mask is None else reference_mask.long()
        return (1 - a).sqrt() * (x - a.sqrt() * self.means[which]) / (0.09 * a + 1 - a)


RUNS = {  # sampler, its options, steps
    "ddpm": ("ddpm", {}, 5),
    "ddpm-large": ("ddpm", dict(variance="large"), 5),
    "ddim": ("ddim", {}, 5),
    "ddim-eta": ("ddim", dict(eta=0.5), 5),
    "pndm": ("pndm", {}, 6),  # 3 warm-up steps, then 3 multistep ones
    "spndm": ("spndm", {}, 4),
}


def sample_with(backend: str, run: str, guidance: float | None, clip_x0: bool) -> tuple[torch.Tensor, list]:
    name, options, steps = RUNS[run]
    schedule = Schedule.from_name("cosine", T)
    data = GaussianPixels(schedule)
    model = data if guidance is None else classifier_free_guidance(data, guidance)
    x, noise = per_sample_noise([3, 4], SHAPE, "cpu")
    seen = []
    with kernels.using(backend):
        out = SAMPLERS[name](model, x, schedule, make_timesteps(T, steps), clip_x0=clip_x0, noise=noise,
                             callback=lambda i, t, x_t, x0: seen.append(x0), **options)
    return out, seen


@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("run", list(RUNS))
def test_every_sampler_draws_the_same_images_under_both_backends(triton_kernels, monkeypatch, run, guidance, clip_x0):
    expected, expected_x0 = sample_with("torch", run, guidance, clip_x0)
    monkeypatch.setattr(module, "sampler_step_reference", no_reference)
    actual, actual_x0 = sample_with("triton", run, guidance, clip_x0)
    assert len(actual_x0) == len(expected_x0) == RUNS[run][2]
    assert_close(actual, expected, 1e-5)
    for a, e in zip(actual_x0, expected_x0):
        assert_close(a, e, 1e-5)
    if clip_x0:
        assert actual.abs().max() <= 1 and (actual.abs() == 1).any()


def written_out(run: str, model, x, schedule: Schedule, ts: list[int], clip_x0: bool, noise) -> torch.Tensor:
    """The samplers' updates as the papers write them, in plain arithmetic on abar (what the samplers computed
    before the fused step): DDPM's posterior (eq. 6-7), DDIM's eq. 12 and 16, PNDM's Runge-Kutta warm-up and
    multistep (Liu et al. 2022, with the transfer written as the deterministic DDIM step it equals)."""
    name, options, _ = RUNS[run]
    abar = [1.0] + schedule.alphas_cumprod.tolist()  # abar[t + 1]; abar[0] = 1 is the clean image
    eps_at = lambda x, t: model(x, torch.full((len(x),), t))

    def predict(x, eps, a):
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return eps, x0

    def transfer(x, eps, a, a_next):
        return math.sqrt(a_next) * (x - math.sqrt(1 - a) * eps) / math.sqrt(a) + math.sqrt(1 - a_next) * eps

    history = []
    for i in reversed(range(len(ts))):
        t, t_next = ts[i], (ts[i - 1] if i > 0 else -1)
        a, a_next = abar[t + 1], abar[t_next + 1]
        e_1 = eps_at(x, t)
        if name in ("ddpm", "ddim"):
            eps, x0 = predict(x, e_1, a)
            beta = 1 - a / a_next
            small = beta * (1 - a_next) / (1 - a)
            if name == "ddpm":
                mean = math.sqrt(a_next) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_next) / (1 - a) * x
                variance = beta if options.get("variance") == "large" else small
            else:
                variance = options.get("eta", 0.0) ** 2 * small
                mean = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next - variance) * eps
            x = mean + math.sqrt(variance) * noise() if i > 0 and variance > 0 else mean
            continue
        if name == "pndm" and len(history) < 3:
            a_mid, t_mid = abar[(t + t_next) // 2 + 1], (t + t_next) // 2
            e_2 = eps_at(transfer(x, e_1, a, a_mid), t_mid)
            e_3 = eps_at(transfer(x, e_2, a, a_mid), t_mid)
            e_4 = eps_at(transfer(x, e_3, a, a_next), t_next)
            e_prime = (e_1 + 2 * e_2 + 2 * e_3 + e_4) / 6
        elif name == "pndm":
            e_prime = (55 * e_1 - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        elif not history:
            e_prime = (e_1 + eps_at(transfer(x, e_1, a, a_next), t_next)) / 2
        else:
            e_prime = (3 * e_1 - history[-1]) / 2
        history.append(e_1)
        x = transfer(x, predict(x, e_prime, a)[0], a, a_next)
    return x


@pytest.mark.parametrize("clip_x0", [False, True])
@pytest.mark.parametrize("guidance", [None, 3.0])
@pytest.mark.parametrize("run", list(RUNS))
def test_every_sampler_is_its_paper_algorithm_written_out(run, guidance, clip_x0):
    # float64, so rounding stays far below what a wrong coefficient would change.
    schedule = Schedule.from_name("cosine", T)
    data = GaussianPixels(schedule, F64)
    guided = lambda x, t: data(x, t, torch.zeros_like(t, dtype=torch.bool)) * guidance \
        + data(x, t, torch.ones_like(t, dtype=torch.bool)) * (1 - guidance)
    name, options, steps = RUNS[run]
    ts = make_timesteps(T, steps)
    outputs = []
    for sampler in (SAMPLERS[name], None):
        x, noise = per_sample_noise([3, 4], SHAPE, "cpu", F64)
        if sampler is None:
            outputs.append(written_out(run, data if guidance is None else guided, x, schedule, ts.tolist(), clip_x0,
                                       noise))
        else:
            model = data if guidance is None else classifier_free_guidance(data, guidance)
            outputs.append(sampler(model, x, schedule, ts, clip_x0=clip_x0, noise=noise, **options))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("run, steps_per_call", [("ddim", [1] * 5), ("ddpm", [1] * 5),
                                                 ("pndm", [4, 4, 4, 1, 1, 1]), ("spndm", [2, 1, 1, 1])])
def test_a_guided_step_is_one_model_call_and_one_fused_update_per_evaluation(monkeypatch, run, steps_per_call):
    # The guided model hands both halves to the step, which combines them: no separate guidance pass.
    updates, model_calls = [], []
    original = ddpm.samplers.sampler_step

    def recording(x, eps, update, **kwargs):
        updates.append(kwargs["eps_ref"] is not None and kwargs["guidance_scale"] == 3.0)
        return original(x, eps, update, **kwargs)

    monkeypatch.setattr(ddpm.samplers, "sampler_step", recording)
    schedule = Schedule.from_name("cosine", T)
    data = GaussianPixels(schedule)

    def model_fn(x, t, reference_mask):
        model_calls.append(len(x))
        return data(x, t, reference_mask)

    x, noise = per_sample_noise([3, 4], SHAPE, "cpu")
    name, options, steps = RUNS[run]
    SAMPLERS[name](classifier_free_guidance(model_fn, 3.0), x, schedule, make_timesteps(T, steps), noise=noise,
                   **options)
    assert model_calls == [2 * SHAPE[0]] * sum(steps_per_call)
    assert updates == [True] * sum(steps_per_call)


@pytest.mark.parametrize("case", ["guided, clip, three earlier eps, noise", "noise, no x0"])
def test_op_passes_opcheck(triton_kernels, case):
    """Schema, autograd registration, fakes and AOT dispatch of the op (`helpers.opcheck`), x channels-last
    and eps contiguous."""
    (x, eps, update), kwargs = case_inputs((2, 3, 5, 7), CASES[case], torch.float32, channels_last=True)
    coefficients = [update.recip, update.recipm1, update.c_x, update.c_x0, update.c_eps, update.sigma,
                    kwargs.get("guidance_scale", 1.0), *update.weights]
    guided = kwargs.get("eps_ref") is not None
    with kernels.using("triton"):
        opcheck(torch.ops.synthdiff.sampler_step.default,
                (x, eps, kwargs.get("eps_ref"), kwargs["history"], kwargs["noise"], coefficients, kwargs["clip_x0"],
                 kwargs["return_x0"], guided))


# ---- torch.compile and life without Triton ---------------------------------------------------------


def test_op_compiles_without_graph_breaks(triton_kernels):
    args, kwargs = case_inputs((1, 3, 5, 7), CASES["guided, clip, three earlier eps, noise"], torch.float32, False)
    (x, eps, update), history, noise, ref = args, kwargs.pop("history"), kwargs.pop("noise"), kwargs.pop("eps_ref")

    def f(x, eps, ref, h1, h2, h3, noise):
        return tuple(sampler_step(x, eps, update, eps_ref=ref, history=(h1, h2, h3), noise=noise, **kwargs))

    inputs = (x, eps, ref, *history, noise)
    with kernels.using("triton"):
        eager = f(*inputs)
        # The interpreter cannot run kernels on the fake tensors AOTAutograd traces with, so keep the op
        # opaque there; on a GPU the default decomposition hands the kernel itself to the backend.
        with torch._functorch.config.patch(decompose_custom_triton_ops=not kernels.interpreting()):
            torch._dynamo.reset()
            assert torch._dynamo.explain(f)(*inputs).graph_break_count == 0
            traced = torch.compile(f, backend="aot_eager", fullgraph=True)(*inputs)
    for a, e in zip(traced, eager):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype, eps_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_mixed_dtypes_give_x_prev_and_x0_in_xs_dtype_under_both_backends(triton_kernels, x_dtype, eps_dtype):
    # x in half precision, eps in float32: both backends write x_prev and x0 in x's dtype (the module docstring),
    # the reference as the kernel does, and agree within half precision's tolerance.
    args, kwargs = case_inputs((1, 3, 5, 7), CASES["guided, clip, three earlier eps, noise"], eps_dtype, False)
    x, eps, update = args
    args = (x.to(x_dtype), eps, update)
    expected = sampler_step_reference(*args, **kwargs)
    with kernels.using("triton"):
        actual = sampler_step(*args, **kwargs)
    for a, e, dtype in zip(actual, expected, (x_dtype, x_dtype, eps_dtype)):
        assert a.dtype == e.dtype == dtype
        assert_close(a, e, TOLERANCE[torch.bfloat16])


def test_a_nan_eps_stays_nan_through_the_clipped_x0(triton_kernels):
    # A model that overflowed (a NaN eps) must show in the sample under both backends, as torch.clamp passes NaN
    # on. Clamping by max(min(.)) would turn it into the bound, and x0 = +-1 with the eps recomputed from it
    # would hide the fault in a finite sample.
    args, kwargs = case_inputs((1, 3, 5, 7), CASES["clip, one earlier eps"], torch.float32, False)
    x, eps, update = args
    eps = eps.clone()
    eps[0, 1, 2, 3] = float("nan")
    expected = sampler_step_reference(x, eps, update, **kwargs)
    with kernels.using("triton"):
        actual = sampler_step(x, eps, update, **kwargs)
    for a, e in zip(actual[:2], expected[:2]):
        assert torch.equal(a.isnan(), e.isnan()) and e[0, 1, 2, 3].isnan()
        assert_close(a.nan_to_num(), e.nan_to_num(), TOLERANCE[torch.float32])
