"""The fast paths change how a result is computed, never what: compile, backend choice, bf16 autocast.

Compiled-versus-eager checks use the "aot_eager" backend: it traces the networks exactly as
Inductor would (Dynamo, then AOTAutograd's forward and backward graphs) but runs the traced graphs
with PyTorch's own kernels, so it takes seconds instead of the minutes Inductor's C++ code
generation takes on a 2-core CPU. The full Inductor path is measured by `python -m bench` and run
by `bench/gpu_check.sh`.
"""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo

import kernels
from core import runtime
from core.speed import GraphedForward, capture_cuda_graphs, check_cuda_graphs, compile_module, speed_up
from ddpm.samplers import ddim_sample, make_timesteps
from ddpm.schedule import Schedule
from ddpm.unet import UNet, UNetConfig
from vae.autoencoder import AutoencoderConfig, AutoencoderKL
from vae.perceptual import PerceptualDistance

ROOT = Path(__file__).resolve().parents[1]


def tiny_unet(scale_shift_norm: bool) -> UNet:
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), dropout=0.0, scale_shift_norm=scale_shift_norm, cond="class",
                          num_classes=3))
    # Zero-initialised output layers would make every comparison trivially equal: perturb them.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                           attention_resolutions=(8,), latent_channels=3, resolution=16))


def unet_inputs(batch: int = 3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    labels = torch.randint(0, 3, (batch,), generator=g)
    null_mask = torch.tensor([False, True, False][:batch])
    return x, t, labels, null_mask


def graph_breaks(fn, *args, **kwargs) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args, **kwargs).graph_break_count


@pytest.mark.parametrize("scale_shift_norm", [False, True])
def test_unet_forward_has_no_graph_breaks(scale_shift_norm):
    net = tiny_unet(scale_shift_norm)
    x, t, labels, null_mask = unet_inputs()
    assert graph_breaks(net, x, t, labels, null_mask=null_mask) == 0
    assert graph_breaks(net, x, t, cond_emb=torch.randn(3, net.config.embedding_dim)) == 0


def test_unet_forward_under_cpu_bf16_autocast_has_no_graph_breaks():
    """Under bf16 autocast on the CPU the attention picks its form by the CPU (`kernels.attention`): a choice that
    compile cannot trace (reading /proc/cpuinfo) would split every compiled U-Net in two there. Heads of 64 and
    256 channels, so that both rules are asked."""
    for width in (64, 256):
        torch.manual_seed(0)
        net = UNet(UNetConfig(image_size=16, base_channels=width, channel_mult=(1,), num_res_blocks=1,
                              attention_resolutions=(16,), dropout=0.0, cond="class", num_classes=3))
        x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert graph_breaks(net, x, t, torch.tensor([0, 2])) == 0, width


def test_autoencoder_and_lpips_forward_have_no_graph_breaks():
    ae = tiny_autoencoder()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert graph_breaks(ae.encode_moments, x) == 0
    assert graph_breaks(ae.decode, torch.randn(2, 3, 8, 8)) == 0
    lpips = PerceptualDistance(taps=2)
    assert graph_breaks(lpips, x, torch.rand(2, 3, 16, 16) * 2 - 1) == 0


@pytest.mark.parametrize("scale_shift_norm", [False, True])
def test_compiled_unet_matches_eager_outputs_and_gradients(scale_shift_norm):
    eager, traced = tiny_unet(scale_shift_norm), tiny_unet(scale_shift_norm)
    traced.compile(backend="aot_eager")
    x, t, labels, null_mask = unet_inputs()
    outs, grads = [], []
    for net in (eager, traced):
        out = net(x, t, labels, null_mask=null_mask)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_traced, g_eager in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_traced, g_eager, rtol=1e-4, atol=1e-6)


def test_compile_module_runs_inductor_with_its_cpp_wrapper_on_the_cpu_and_gives_the_eager_result(monkeypatch):
    # A real Inductor compilation (a few seconds for this small network): forward and backward.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    eager = net(x)
    (grad_eager,) = torch.autograd.grad(eager.square().sum(), x)
    asked = []
    compile_as_asked = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **options: asked.append(options) or compile_as_asked(self, **options))
    compile_module(net)
    compiled = net(x)
    (grad_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    assert asked == [{"options": {"cpp_wrapper": True}}]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-6)
    # Elsewhere (a module whose weights are not on the CPU: here, on the meta device) compile's own modes
    # apply as asked; compilation itself waits for a first call, which these never get.
    compile_module(torch.nn.Linear(2, 2, device="meta"))
    assert asked[-1] == {"mode": None}
    compile_module(torch.nn.Identity(), "max-autotune")
    assert asked[-1] == {"mode": "max-autotune"}


def test_a_compiled_inference_network_gives_the_eager_result_and_uses_weights_loaded_later():
    # What sample.py and the judging tools do: compile, call without autograd, then (a resumed or swapped
    # checkpoint) load other weights into the same module. The compiled graph must read them.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 4, 1)).eval().requires_grad_(False)
    other = {name: value + 0.1 * torch.randn_like(value) for name, value in net.state_dict().items()}
    reference = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        speed_up(net, torch.device("cpu"), compile=True)
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)
        before = net(x)
        for module in (net, reference):
            module.load_state_dict(other)
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(net(x), before, atol=1e-3)


def spatial_conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weights of `module`'s convolutions wider than 1x1 (a 1x1 weight is channels-last and contiguous alike)."""
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def test_inference_networks_run_channels_last_on_the_cpu_with_the_same_outputs():
    """`speed_up` (sample.py, the sweep, the consistency check) and `load_autoencoder` (latent diffusion's encoding
    and decoding) put their networks in channels-last on the CPU, where oneDNN's convolutions run faster
    (`core.speed.inference_layout`); the outputs stay those of the contiguous network up to float rounding. On
    CUDA the layout is left as it is."""
    from core.speed import inference_layout
    net = tiny_unet(True).eval().requires_grad_(False)
    autoencoder = tiny_autoencoder().eval().requires_grad_(False)
    reference_net, reference_autoencoder = copy.deepcopy(net), copy.deepcopy(autoencoder)
    speed_up(net, torch.device("cpu"))
    inference_layout(autoencoder, torch.device("cpu"))
    for module in (net, autoencoder):
        weights = spatial_conv_weights(module)
        assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    x, t, labels, null_mask = unet_inputs()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, labels, null_mask=null_mask),
                                   reference_net(x, t, labels, null_mask=null_mask), rtol=1e-5, atol=1e-5)
        for ours, theirs in ((autoencoder.encode(images).mean, reference_autoencoder.encode(images).mean),
                             (autoencoder.decode(x), reference_autoencoder.decode(x))):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    inference_layout(reference_net, torch.device("cuda"))  # (no tensor moves: only the layout is decided)
    assert all(w.is_contiguous() for w in spatial_conv_weights(reference_net))


def test_compiled_autoencoder_and_lpips_match_eager():
    ae = tiny_autoencoder()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    encode = torch.compile(ae.encode_moments, backend="aot_eager")
    decode = torch.compile(ae.decode, backend="aot_eager")
    torch.testing.assert_close(encode(x), ae.encode_moments(x), rtol=1e-5, atol=1e-6)
    z = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(decode(z), ae.decode(z), rtol=1e-5, atol=1e-6)

    lpips = PerceptualDistance(taps=2)
    x.requires_grad_(True)
    eager = lpips(x, y)
    (grad_eager,) = torch.autograd.grad(eager.sum(), x)
    compiled = torch.compile(lpips, backend="aot_eager")(x, y)
    (grad_compiled,) = torch.autograd.grad(compiled.sum(), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-7)


def test_sampling_with_a_compiled_network_gives_the_eager_images():
    eager, traced = tiny_unet(True).eval(), tiny_unet(True).eval()
    traced.compile(backend="aot_eager")
    schedule = Schedule.from_name("linear", 1000)
    labels = torch.tensor([0, 2])
    ts = make_timesteps(schedule.num_timesteps, 4)
    images = []
    for net in (eager, traced):
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            images.append(ddim_sample(lambda x_t, t, net=net: net(x_t, t, labels), x, schedule, ts))
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# choosing the fast path


def test_amp_auto_is_bf16_exactly_on_cpus_that_compute_in_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_computes_bf16", lambda: True)
    assert runtime.autocast_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_computes_bf16", lambda: False)
    assert runtime.autocast_dtype("auto", cpu) is None
    assert runtime.autocast_dtype("none", cpu) is None
    assert runtime.autocast_dtype("bf16", cpu) is torch.bfloat16


def test_amp_auto_is_fp16_on_gpus_before_ampere_though_they_hold_bf16_tensors(monkeypatch):
    """PyTorch's is_bf16_supported() says yes on a T4 or a V100, which only emulate bf16: the GPU's own compute
    capability decides, so fp16 with loss scaling runs where it was meant to."""
    gpu, asked = torch.device("cuda", 1), []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for capability, expected in (((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16),
                                 ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: asked.append(device) or c)
        assert runtime.autocast_dtype("auto", gpu) is expected, capability
    assert asked == [gpu] * 4  # the run's own GPU, not the current one


def test_kernel_backend_choice(monkeypatch):
    assert kernels.resolve("torch", "cpu") == "torch"
    assert kernels.resolve("auto", "cpu") == "torch"  # the CPU always runs PyTorch's ops unless asked otherwise
    with pytest.raises(ValueError, match="Unknown --kernels 'cuda'"):
        kernels.resolve("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if kernels.triton_importable():
        with pytest.raises(ValueError, match="--kernels triton runs our kernels on CUDA GPUs"):
            kernels.resolve("triton", "cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert kernels.resolve("triton", "cpu") == "triton"
    with kernels.using("torch"):
        assert kernels.active() == "torch"
    # Without a device, `using` asks where new tensors are made: on a GPU (the GPU check sets CUDA as the
    # default device) the kernel tests' `using("triton")` must choose Triton, not refuse it as on a CPU.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "triton_importable", lambda: True)
    monkeypatch.setattr(torch, "get_default_device", lambda: torch.device("cuda"))
    with kernels.using("triton"):
        assert kernels.active() == "triton"


def test_everything_imports_and_runs_without_triton():
    """On a PyTorch build without Triton (a None entry in sys.modules makes `import triton` fail) the
    networks, the perceptual distance and the samplers run on the PyTorch references."""
    script = """
import sys
sys.modules["triton"] = None
import torch, kernels
from ddpm.guidance import classifier_free_guidance
from ddpm.samplers import ddim_sample, make_timesteps
from ddpm.schedule import Schedule
from ddpm.unet import UNet, UNetConfig
from vae.perceptual import PerceptualDistance
assert not kernels.triton_importable() and kernels.use("auto", "cpu") == "torch"
model = UNet(UNetConfig(image_size=4, base_channels=32, channel_mult=(1,), attention_resolutions=()))
assert model(torch.randn(1, 3, 4, 4), torch.tensor([1])).shape == (1, 3, 4, 4)
x = torch.zeros(1, 3, 8, 8, requires_grad=True)
distance = PerceptualDistance(taps=1)(x, torch.ones(1, 3, 8, 8))
distance.sum().backward()
assert distance.shape == (1,) and distance.item() > 0 and x.grad.abs().sum() > 0
guided = classifier_free_guidance(lambda x, t, mask: x * 0.1 + mask.view(-1, 1, 1, 1), 2.0)
out = ddim_sample(guided, torch.randn(1, 3, 4, 4), Schedule.from_name("cosine", 50), make_timesteps(50, 3), clip_x0=True)
assert out.shape == (1, 3, 4, 4) and out.abs().max() <= 1
"""
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cuda_graphs_are_refused_on_the_cpu_and_cpu_calls_run_eagerly():
    with pytest.raises(ValueError, match="--cuda-graphs captures CUDA kernel launches"):
        check_cuda_graphs(True, torch.device("cpu"))
    net = tiny_unet(True).eval()
    x, t, labels, _ = unet_inputs()
    expected = net(x, t, labels)
    capture_cuda_graphs(net)
    assert isinstance(net.forward, GraphedForward)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, labels), expected)
    assert not net.forward.graphs  # nothing was recorded for CPU tensors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run by bench/gpu_check.sh)")
def test_cuda_graph_replay_equals_eager_on_cuda():
    net = tiny_unet(True).cuda().eval()
    x, t, labels, null_mask = (a.cuda() for a in unet_inputs())
    with torch.no_grad():
        expected = [net(x + k, t, labels, null_mask=null_mask) for k in range(3)]
        capture_cuda_graphs(net)
        replayed = [net(x + k, t, labels, null_mask=null_mask) for k in range(3)]
    assert len(net.forward.graphs) == 1
    for a, b in zip(replayed, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class ImitationGraph:
    """torch.cuda.CUDAGraph imitated on the CPU. A capture records each op with the very tensors it read and
    wrote; a replay runs the ops again and writes each result into the tensor the capture wrote, as a replayed
    graph rewrites the memory it was captured with: the static inputs are read as they are at replay, the
    static output is overwritten by every replay, and the captured function itself is not called."""

    def __init__(self):
        self.ops = []

    def replay(self):
        for func, args, kwargs, out in self.ops:
            result = func(*args, **kwargs)
            for kept, new in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(result)):
                if isinstance(kept, torch.Tensor) and kept is not new:
                    kept.copy_(new)


class Capture(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, graph: ImitationGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.graph.ops.append((func, args, kwargs or {}, out))
        return out


class ImitationStream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def imitated_cuda_graphs(monkeypatch):
    """torch.cuda's graphs and streams replaced by the imitations above (a `GraphedForward` set to device_type
    "cpu" then records and replays CPU calls)."""
    import contextlib
    monkeypatch.setattr(torch.cuda, "CUDAGraph", ImitationGraph)
    monkeypatch.setattr(torch.cuda, "graph", Capture)
    monkeypatch.setattr(torch.cuda, "Stream", ImitationStream)
    monkeypatch.setattr(torch.cuda, "current_stream", ImitationStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())


@pytest.mark.usefixtures("imitated_cuda_graphs")
def test_cuda_graph_capture_and_replay_on_an_imitation_graph():
    """`GraphedForward`'s own logic, which only a GPU runs for real (`test_cuda_graph_replay_equals_eager_on_cuda`):
    one recording per signature, later calls copied into its static inputs and answered by replay alone, and
    each answer a copy the next replay cannot overwrite (PNDM keeps past eps)."""
    net = tiny_unet(True).eval()
    x, t, labels, null_mask = unet_inputs()
    calls = []
    eager = net.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return eager(*args, **kwargs)
    net.forward = GraphedForward(counted, warmup=2)
    net.forward.device_type = "cpu"
    with torch.no_grad():
        expected = [eager(x + k, t, labels, null_mask=null_mask) for k in range(3)]
        # (at its own batch size: a convolution's algorithm, hence its rounding, can depend on the batch)
        expected_alone = eager(x[:1], t[:1], labels[:1], null_mask=null_mask[:1])
        replayed = [net(x + k, t, labels, null_mask=null_mask) for k in range(3)]
        assert calls == [3] * 3  # two warm-up calls and the capture; the replays call nothing
        alone = net(x[:1], t[:1], labels[:1], null_mask=null_mask[:1])  # another signature: another graph
        assert calls == [3] * 3 + [1] * 3 and len(net.forward.graphs) == 2
        again = net(x + 2, t, labels, null_mask=null_mask)
    for a, b in zip(replayed + [again], expected + [expected[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, expected_alone, rtol=1e-5, atol=1e-6)
    assert not any(torch.equal(replayed[0], e) for e in expected[1:])  # not the static output of a later replay


@pytest.mark.usefixtures("imitated_cuda_graphs")
def test_a_cuda_graph_is_recorded_without_autocast_s_weight_cache():
    """Under autocast, the warm-up calls and the capture share one autocast region, whose cache keeps the bf16
    copy of each weight that requires grad until the region ends: a capture served from that cache would replay
    reading the freed copies. So recording runs with the cache off, and leaves it as it was."""
    net = tiny_unet(True).eval()  # weights that require grad, as an unfrozen network's do
    x, t, labels, null_mask = unet_inputs()
    caching = []
    eager = net.forward

    def watched(*args, **kwargs):
        caching.append(torch.is_autocast_cache_enabled())
        return eager(*args, **kwargs)
    net.forward = GraphedForward(watched, warmup=2)
    net.forward.device_type = "cpu"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        net(x, t, labels, null_mask=null_mask)
        assert caching == [False] * 3 and torch.is_autocast_cache_enabled()


# ---------------------------------------------------------------------------------------------
# bf16 on the CPU

BF16_LOSS_TOLERANCE = 0.05  # relative distance of the bf16 run's mean loss from the fp32 run's


@pytest.mark.parametrize("matmul_attention", [False, True])
def test_bf16_autocast_training_stays_close_to_fp32(matmul_attention, monkeypatch):
    """A short denoising run in bf16 autocast tracks the fp32 run: same data, noise and timesteps; with attention
    over 16x16 positions of 64 channels, bf16 attention takes the matmul form (`kernels.attention`). (Small: a CPU
    without native bf16 emulates it, 8x slower than fp32.)"""
    import kernels.attention
    forms = []
    chosen = kernels.attention.uses_matmul_form
    monkeypatch.setattr(kernels.attention, "uses_matmul_form", lambda q: forms.append(chosen(q)) or forms[-1])
    monkeypatch.setattr(kernels.attention, "AMX", False)  # the rule that takes 64-wide heads
    schedule = Schedule.from_name("linear", 1000)
    side = 16 if matmul_attention else 8
    data = torch.rand(4, 3, side, side) * 2 - 1
    curves = {}
    for dtype in (None, torch.bfloat16):
        if matmul_attention:
            torch.manual_seed(0)
            net = UNet(UNetConfig(image_size=16, base_channels=64, channel_mult=(1,), num_res_blocks=1,
                                  attention_resolutions=(16,), dropout=0.0, scale_shift_norm=True))
        else:
            net = tiny_unet(True)
        optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(8):
            t = torch.randint(0, schedule.num_timesteps, (len(data),), generator=g)
            noise = torch.randn(data.shape, generator=g)
            x_t = schedule.q_sample(data, t, noise)
            with runtime.autocast(torch.device("cpu"), dtype):
                out = net(x_t, t)
            loss = (out.float() - noise).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves[dtype] = losses
    fp32, bf16 = curves[None], curves[torch.bfloat16]
    assert any(forms) == matmul_attention
    assert fp32[-1] < fp32[0]  # the run learns, so the comparison is not between two flat lines
    mean_fp32, mean_bf16 = sum(fp32[4:]) / 4, sum(bf16[4:]) / 4
    assert math.isclose(mean_bf16, mean_fp32, rel_tol=BF16_LOSS_TOLERANCE)


@pytest.mark.slow
def test_every_stage_trains_with_compile_and_its_first_loss_is_the_eager_one(tmp_path, class_ckpt):
    """`train.py --stage S --compile` with a real Inductor compilation for every stage (about 5 minutes on
    2 CPU cores): it runs to the end, and the first step's loss (taken before any update, with the data,
    noise and timesteps drawn outside the compiled network) is the eager run's up to rounding."""
    import json
    import train
    from helpers import colour_folder
    images = colour_folder(tmp_path / "images", per_class=4, seed=0)
    common = ["--device", "cpu", "--log-every", "1", "--sample-every", "0", "--ckpt-every", "100", "--steps", "2",
              "--resolution", "16", "--warmup-steps", "1"]
    plumes = ["--dataset", "plumes", "--num-samples", "12", "--cache-dir", str(tmp_path / "cache")]
    stages = {
        "vae": [*plumes, "--test-samples", "4", "--base-channels", "16", "--channel-mult", "1", "2",
                "--num-res-blocks", "1", "--latent-channels", "2", "--perceptual-taps", "1", "--perceptual", "random",
                "--scale-samples", "12", "--batch-size", "4", "--preview-images", "4"],
        "ldm": [*plumes, "--vae-ckpt", "{vae}", "--base-channels", "32", "--channel-mult", "1", "2",
                "--num-res-blocks", "1", "--attention-resolutions", "4", "--num-timesteps", "100", "--dropout", "0",
                "--batch-size", "4", "--preview-images", "2", "--preview-steps", "2"],
        "ddpm": ["--dataset", f"folder:{images}", "--base-channels", "32", "--channel-mult", "1", "2",
                 "--num-res-blocks", "1", "--attention-resolutions", "8", "--num-timesteps", "100", "--dropout", "0",
                 "--batch-size", "4", "--preview-images", "2", "--preview-steps", "2", "--cond", "class"],
        "classify": ["--dataset", f"folder:{images}", "--test-dataset", f"folder:{images}", "--num-samples", "0",
                     "--test-samples", "0", "--batch-size", "8", "--target", "class"],
        "invert": ["--model", str(class_ckpt), "--dataset", f"folder:{images}", "--batch-size", "4",
                   "--preview-images", "2", "--preview-steps", "2", "--eval-images", "3", "--eval-timesteps", "2"],
    }
    for stage, options in stages.items():
        options = [o.format(vae=tmp_path / "vae-eager" / "checkpoint.pt") for o in options]
        first = []
        for mode in ("eager", "compiled"):
            run_dir = tmp_path / f"{stage}-{mode}"
            train.main(["--stage", stage, "--run-dir", str(run_dir), *common, *options,
                        *(["--compile"] if mode == "compiled" else [])])
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            train_records = [r for r in records if r.get("split") == "train"]
            assert [r["step"] for r in train_records] == [1, 2], stage
            first.append(train_records[0]["loss"])
        assert first[1] == pytest.approx(first[0], rel=1e-2), stage  # bf16 autocast on CPUs with bf16 (--amp auto)


def test_compile_with_cuda_graphs_gives_outputs_a_later_call_cannot_overwrite(monkeypatch):
    # Compile's reduce-overhead mode returns tensors in its CUDA graph's memory, rewritten by the next
    # replay; PNDM keeps past outputs. Imitated on the CPU by a "compiled" forward that always returns
    # one buffer: what speed_up gives back must still hold the first call's values after the second.
    import core.speed
    buffer = torch.zeros(2, 2)

    def reduce_overhead(forward, mode=None, **options):
        assert mode == "reduce-overhead"
        return lambda *args: buffer.copy_(forward(*args))
    monkeypatch.setattr(torch, "compile", reduce_overhead)
    monkeypatch.setattr(core.speed, "check_cuda_graphs", lambda cuda_graphs, device: None)
    net = torch.nn.Linear(2, 2)
    speed_up(net, torch.device("cpu"), compile=True, cuda_graphs=True)
    with torch.no_grad():
        first = net(torch.ones(2, 2))
        kept = first.clone()
        net(torch.zeros(2, 2))
    assert torch.equal(first, kept)


@pytest.mark.parametrize("sampler, options", [("ddim", {}), ("ddim", {"eta": 1.0}), ("ddpm", {}), ("pndm", {}),
                                              ("spndm", {})])
def test_no_sampling_step_reads_a_value_back_from_the_device(class_ckpt, monkeypatch, sampler, options):
    """A guided, clipped step of every sampler is its network call and its update, plus the noise of stochastic
    ones, with no read of a tensor's value on the host (`helpers.HostReads`; the tables are read once, before the
    steps), which on a GPU would make each step wait for the device."""
    import ddpm.generate
    import ddpm.samplers
    from ddpm.config import SamplingConfig
    from helpers import HostReads
    from stages import open_source
    model = open_source(class_ckpt, torch.device("cpu")).model
    host = HostReads(monkeypatch)
    for name in ("_predict", "_step"):
        monkeypatch.setattr(ddpm.samplers, name, host.watch(getattr(ddpm.samplers, name)))
    per_sample_noise = ddpm.generate.per_sample_noise

    def noise_spied(*args, **kwargs):
        x_T, noise = per_sample_noise(*args, **kwargs)
        return x_T, host.watch(noise)
    monkeypatch.setattr(ddpm.generate, "per_sample_noise", noise_spied)
    sampling = SamplingConfig(sampler=sampler, steps=5, guidance_scale=2.0, clip_x0=True, **options)
    images = ddpm.generate.sample(model, sampling, [0, 1], cond=torch.tensor([0, 2]))
    assert images.shape == (2, *model.shape) and host.calls.count("_predict") >= 5
    assert ("noise" in host.calls) == (sampler == "ddpm" or options.get("eta", 0) > 0)
    assert host.reads == []


def test_a_guided_step_and_parameter_conditions_copy_nothing_from_the_host_to_the_device():
    """On a GPU a copy from pageable host memory waits for the device: the reference mask of every guided step
    was made on the CPU and copied, and the parameter ranges were copied at every step of a parameter-
    conditioned run (the meta device stands in for the GPU; `helpers.HostToDevice`)."""
    from data import DatasetInfo
    from ddpm.guidance import ClassifierFreeGuidance
    from helpers import HostToDevice
    meta = torch.device("meta")
    x, t = torch.zeros(3, 1, 4, 4, device=meta), torch.zeros(3, dtype=torch.long, device=meta)
    masks = []
    guided = ClassifierFreeGuidance(lambda x, t, mask: masks.append(mask) or torch.zeros_like(x), scale=3.0)
    info = DatasetInfo("plumes", 16, 1, (), ("wind", "temperature"), ((-1.0, 1.0), (280.0, 320.0)), 10)
    params = torch.zeros(3, 2, device=meta)
    info.denormalize_params(info.normalize_params(params))  # the ranges reach the device once
    with HostToDevice() as spy:
        guided.guided_eps(x, t)
        info.denormalize_params(info.normalize_params(params))
    assert spy.copies == [] and masks[0].shape == (6,)
    with HostToDevice() as spy:  # (the spy sees such a copy)
        torch.zeros(3).to(meta)
    assert spy.copies == ["a CPU tensor (3,) moved by .to"]
    # The mask itself, on the CPU: the condition for the first half, the reference for the second.
    mask = []
    ClassifierFreeGuidance(lambda x, t, m: mask.append(m) or torch.zeros_like(x), 3.0).guided_eps(
        torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    assert mask[0].tolist() == [False, False, True, True]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_network_keeps_its_tensors_on_the_gpu(backend, monkeypatch):
    """On a GPU, a tensor a forward pass makes on the CPU (a table built without `device=`, a constant that is
    not a buffer) meets the GPU's tensors and fails, or copies every step; a CPU run never shows it. So each
    network runs here on fake CUDA tensors (PyTorch's FakeTensor: shapes, dtypes and devices without data or
    a GPU; an op that mixes devices raises), in float32 and under bf16 and fp16 autocast, in training mode
    (dropout) and with both kernel backends (the Triton ops run as their registered fakes), and every output
    must be on the GPU in the autocast dtype (LPIPS's distance is float32 by design). So must the diffusion
    and autoencoder objectives and a guided, clipped sampler update."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from classify.model import ClassifierConfig, build_resnet18
    from fid.inception import FIDInceptionV3
    from types import SimpleNamespace

    from core.contract import MAIN, TrainingModels
    from ddpm.objective import diffusion_loss
    from kernels.sampler_step import Update, sampler_step
    from vae.config import PRESETS as VAE_PRESETS
    from vae.discriminator import PatchDiscriminator
    from vae.stage import OutputLogVariance, VAETraining
    from vae.perceptual import build_perceptual
    if backend == "triton" and not kernels.triton_importable():
        pytest.skip("the triton package is not installed")
    gpu = torch.device("cuda")
    torch.manual_seed(0)
    unet = {cond: UNet(UNetConfig(image_size=8, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                  attention_resolutions=(4,), dropout=0.1, cond=cond, num_classes=3, num_params=2))
            for cond in ("class", "params")}
    autoencoder = AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                                  latent_channels=4))
    networks = {"unet, class": unet["class"], "unet, params": unet["params"], "autoencoder": autoencoder,
                "lpips": build_perceptual("random"), "discriminator": PatchDiscriminator(),
                "resnet-18": build_resnet18(ClassifierConfig(num_outputs=3), 32), "inception": FIDInceptionV3()}
    schedule = Schedule.from_name("cosine", 1000)  # made on the CPU, then moved, as the stages do
    logvar, perceptual = OutputLogVariance(), build_perceptual("random", taps=2)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:  # (before is_available says yes, which would make .to() start a real GPU)
        for module in (*networks.values(), schedule):
            module.to(gpu)
        vae_loss = VAETraining(VAE_PRESETS["vae-demo"](), logvar, perceptual, None, None, "", gpu)  # (moves both)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # for autocast's device check
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with kernels.using(backend, gpu), fake:
        x, t = torch.randn(2, 3, 8, 8, device=gpu), torch.randint(0, 1000, (2,), device=gpu)
        images = torch.rand(2, 3, 32, 32, device=gpu) * 2 - 1
        calls = {"unet, class": lambda net: net(x, t, torch.tensor([0, 2]).to(gpu),
                                                null_mask=torch.tensor([True, False]).to(gpu)),
                 "unet, params": lambda net: net(x, t, torch.randn(2, 2, device=gpu)),
                 "autoencoder": lambda net: net.decode(net.encode(images).mean),
                 "lpips": lambda net: net(images, images.flip(0)),
                 "inception": lambda net: net(torch.rand(2, 3, 299, 299, device=gpu))}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for name, network in networks.items():
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    out = calls.get(name, lambda net: net(images))(network)
                outputs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
                expected = torch.float32 if name == "lpips" else dtype
                assert outputs and all(o.device.type == "cuda" and o.dtype == expected for o in outputs), (
                    name, dtype, [(o.device, o.dtype) for o in outputs])
        # The glue around them: the objectives (the diffusion one with its condition dropout, on the schedule's
        # tables; the autoencoder's reconstruction, perceptual and KL terms), and a guided sampler update.
        for prediction in ("eps", "x0", "v"):
            loss = diffusion_loss(networks["unet, class"], schedule, x, torch.Generator(), prediction=prediction,
                                  cond=torch.tensor([0, 2]).to(gpu), cond_drop_prob=0.2)
            assert loss.device.type == "cuda" and loss.shape == (2,)
        models = TrainingModels({MAIN: autoencoder}, {MAIN: autoencoder})
        losses, metrics = vae_loss.loss(models, SimpleNamespace(image=images), torch.Generator(), step=0)
        assert all(value.device.type == "cuda" for value in (*losses.values(), *metrics.values()))
        update = Update(recip=1.2, recipm1=0.6, c_x0=0.9, c_eps=0.4, sigma=0.1)
        stepped = sampler_step(x, torch.randn_like(x), update, eps_ref=torch.randn_like(x), guidance_scale=2.0,
                               clip_x0=True, noise=torch.randn_like(x))
        assert all(out.device.type == "cuda" for out in stepped if out is not None)
