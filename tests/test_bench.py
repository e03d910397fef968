"""`python -m bench`'s machinery: the peer mappings build the same networks, the table prints what it
should, and the timer alternates. Nothing here is timed."""

import dataclasses
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from bench.common import alternating_seconds, peak_memory_bytes
from bench.device import FP32, Settings, candidate_settings, file_stem
from bench.peers import autoencoder_kl_kwargs, check_same_size, parameter_count
from bench.table import COLUMNS, Row, format_table
from ddpm.config import PRESETS
from ddpm.published import unet2d_config
from ddpm.unet import UNet
from vae.autoencoder import AutoencoderConfig, AutoencoderKL

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers (a benchmark peer, bench/requirements.txt) is not installed")


@needs_diffusers
@pytest.mark.parametrize("preset", ["ddpm-demo", "ddpm-cifar10"])
@pytest.mark.parametrize("cond", ["none", "class"])
def test_unet2d_mapping_has_our_parameter_count(preset, cond):
    from diffusers import UNet2DModel
    config = PRESETS[preset]().unet
    if cond == "class":  # the sampling row's model: diffusers gets the null class as an extra embedding
        config = dataclasses.replace(config, cond="class", num_classes=10)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ours, peer = UNet(config), UNet2DModel(**unet2d_config(config))
    assert parameter_count(peer) == parameter_count(ours)
    if preset == "ddpm-cifar10" and cond == "none":
        assert parameter_count(ours) == 35_746_307  # Ho et al.'s CIFAR-10 model


@needs_diffusers
@pytest.mark.parametrize("cond", ["none", "class"])
@pytest.mark.parametrize("scale_shift_norm", [True, False])
def test_unet2d_given_our_weights_computes_our_unet(cond, scale_shift_norm):
    """A reference implementation of the DDPM U-Net: with our weights (renamed, q|k|v split, the null
    embedding as the last class), diffusers' UNet2DModel gives our outputs, through the down path (with a
    stride-2 convolution), attention, the middle block and the up path, for both ways of injecting the time
    embedding and with the null class. At 128 channels both use GroupNorm(32) everywhere."""
    from bench.peers import diffusers_unet
    config = dataclasses.replace(PRESETS["ddpm-demo"]().unet, image_size=8, base_channels=128, channel_mult=(1, 1),
                                 attention_resolutions=(4,), scale_shift_norm=scale_shift_norm, cond=cond,
                                 num_classes=3 if cond == "class" else 0)
    torch.manual_seed(0)
    ours = UNet(config).eval()
    with torch.no_grad():
        for p in ours.parameters():  # every layer non-zero: DDPM starts the residual branches' last ones at 0
            p.normal_(0, 0.05)
    peer = diffusers_unet(config, ours).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        if cond == "class":
            expected = ours(x, t, torch.tensor([0, 2, 1]), null_mask=torch.tensor([False, False, True]))
            got = peer(x, t, class_labels=torch.tensor([0, 2, 3])).sample  # 3: the null class
        else:
            expected, got = ours(x, t), peer(x, t).sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@needs_diffusers
def test_autoencoder_kl_mapping_has_our_parameter_count():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    config = AutoencoderConfig.kl_f8()
    with torch.device("meta"):
        ours, peer = AutoencoderKL(config), DiffusersAutoencoderKL(**autoencoder_kl_kwargs(config))
    assert parameter_count(ours) == parameter_count(peer) == 83_653_863  # Stable Diffusion's autoencoder


@needs_diffusers
def test_autoencoder_kl_given_our_weights_computes_our_autoencoder():
    """A reference implementation of latent diffusion's autoencoder: with our weights (the decoder's levels
    reversed into diffusers' order, the middle attention's q|k|v split), diffusers' AutoencoderKL encodes to
    our posterior's moments and decodes to our images, at kl-f8's layout on 32 px images."""
    from bench.peers import diffusers_autoencoder
    config = dataclasses.replace(AutoencoderConfig.kl_f8(), base_channels=128, channel_mult=(1, 2), resolution=32)
    torch.manual_seed(0)
    ours = AutoencoderKL(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.03)
    peer = diffusers_autoencoder(config, ours).eval()
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, config.latent_channels, 16, 16)
    with torch.no_grad():
        moments, images = ours.encode_moments(x), ours.decode(z)
        torch.testing.assert_close(peer.encode(x).latent_dist.parameters, moments, rtol=0, atol=1e-5)
        torch.testing.assert_close(peer.decode(z).sample, images, rtol=0, atol=1e-5)
    assert moments.abs().max() > 0.05 and images.abs().max() > 0.05


@needs_diffusers
@pytest.mark.parametrize("preset", ["ddpm-demo", "ddpm-cifar10"])
def test_the_peer_ddim_loop_computes_our_ddim(preset):
    # The sampling row compares equal work only if diffusers' scheduler takes our steps: same timesteps,
    # same abar, final jump to abar = 1, eps re-derived from the clipped x0.
    from bench.peers import diffusers_ddim
    from ddpm.samplers import ddim_sample, make_timesteps
    diffusion = PRESETS[preset]().diffusion
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def model(x, t):  # any smooth function of (x, t), large enough that clipping acts
        return torch.tanh(x) * 0.7 + 1e-5 * t.float().view(-1, 1, 1, 1)

    schedule = diffusion.make_schedule()
    ours = ddim_sample(model, x_T, schedule, make_timesteps(diffusion.num_timesteps, 50), clip_x0=True)
    scheduler = diffusers_ddim(schedule, "eps")
    scheduler.set_timesteps(50)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(2)), t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x, ours, rtol=0, atol=1e-5)


def test_a_wrong_mapping_is_refused():
    with torch.device("meta"):
        small, large = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)
    with pytest.raises(AssertionError, match="mapping is wrong"):
        check_same_size(small, large, "Linear")


def test_table_has_the_columns_and_marks_a_missing_peer():
    rows = [Row("U-Net train step", "ddpm-demo, batch 8", 100.0, 250.0, "bf16 autocast", "diffusers UNet2DModel",
                peer_default=125.0, memory=(2**20, 3 * 2**20, None), best_fp32=150.0,
                best_fp32_settings="fp32 + channels_last + compile"),
            Row("LPIPS fwd+bwd", "64 px", 10.0, 12.5, "fp32", "no peer (lpips not installed)"),
            Row("fused GroupNorm+SiLU", "4x128x32x32", None, None, "needs CUDA", "torch ops (unfused)",
                peer_default=5000.0)]
    lines = format_table(rows).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(COLUMNS)
    assert lines[1] == "|" + "---|" * len(COLUMNS)
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert all(len(row) == len(COLUMNS) for row in cells)
    measured, no_peer, no_triton = (dict(zip(COLUMNS, row)) for row in cells)
    assert measured["ours fastest img/s"] == "250"
    assert measured["fastest / peer"] == "2.00x" and measured["fp32 / peer"] == "0.80x"
    assert measured["best fp32 / peer"] == "1.20x (fp32 + channels_last + compile)"
    assert measured["peak MiB: fp32 / fastest / peer"] == "1 / 3 / -"
    assert no_peer["ours fp32 img/s"] == "10.0" and no_peer["peer img/s"] == "-"
    assert no_peer["fastest / peer"] == no_peer["best fp32 / peer"] == "-" and no_peer["peer"] == "no peer (lpips not installed)"
    assert no_triton["ours fp32 img/s"] == "-" and no_triton["fastest settings"] == "needs CUDA"
    assert no_triton["peer img/s"] == "5000"


def test_alternating_timer_alternates():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    seconds = alternating_seconds(fns, torch.device("cpu"), repeats=3, warmup=1, inner=2)
    assert set(seconds) == set("ABC") and all(s >= 0 for s in seconds.values())
    assert calls == list("ABC") + list("AABBCC") * 3  # warm-up round, then rounds of `inner` calls each in turn


def test_candidates_start_with_plain_fp32_and_skip_compile_in_a_quick_cpu_run():
    quick = candidate_settings(torch.device("cpu"), quick=True)
    assert quick[0] == FP32 and not any(s.compile for s in quick)
    assert any(s.compile for s in candidate_settings(torch.device("cpu"), quick=False))
    assert Settings(torch.bfloat16, channels_last=True, compile=True).label == "bf16 autocast + channels_last + compile"


def test_device_file_name_is_sanitised():
    assert file_stem("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert file_stem("Intel(R) Xeon(R) CPU @ 2.20GHz (AVX512, AMX)") == "Intel-Xeon-CPU-2.20GHz-AVX512-AMX"
    assert file_stem("Intel(r) Core(TM) i7") == "Intel-Core-i7"
    assert file_stem("../") == "device"


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU memory measurement reads /proc/self/statm (Linux)")
def test_cpu_peak_memory_counts_what_the_call_allocates():
    grown = peak_memory_bytes(lambda: torch.ones(16 * 2**20), torch.device("cpu"))  # 64 MiB, every page touched
    assert grown >= 48 * 2**20


@pytest.mark.slow
def test_the_gpu_checks_training_commands_run_on_the_cpu():
    # The GPU check runs only where a GPU is lent, rarely; its commands must not drift from the stages'
    # options and presets meanwhile (three had, unnoticed, before this test). Every stage, a few eager steps.
    # Five commands of their own, 50 s: marked slow to keep the default suite under 10 minutes on 2 cores; run
    # it (`python -m pytest -m slow tests/test_bench.py`) after changing a stage's options or gpu_check.py.
    import subprocess
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--stages-only"], cwd=root,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:]
    assert "5 passed, 0 failed" in done.stdout


def test_the_table_file_is_checked_before_measuring_and_written_whole(tmp_path, monkeypatch, capsys):
    """A folder or another suffix as --out failed only after minutes of measuring; a full disk cut the old table."""
    import errno

    import bench.__main__ as command
    measured = []
    monkeypatch.setattr(command, "run", lambda *args, **kwargs: measured.append(1) or [])
    monkeypatch.setattr(command, "report", lambda *args: "| the table |\n")
    for wrong in (tmp_path, tmp_path / "table.txt", tmp_path / "file.md" / "table.md"):
        (tmp_path / "file.md").write_text("a file")
        with pytest.raises(SystemExit):
            command.main(["--out", str(wrong), "--rows", "kernels", "--quick", "--device", "cpu"])
        assert "must name a markdown file" in capsys.readouterr().err and not measured
    table = tmp_path / "table.md"
    table.write_text("the old table\n")

    def disk_fills(fd):  # the new table's bytes cannot reach the disk
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr("core.runtime.os.fsync", disk_fills)
        with pytest.raises(OSError):
            command.main(["--out", str(table), "--rows", "kernels", "--quick", "--device", "cpu"])
    assert table.read_text() == "the old table\n" and sorted(p.name for p in tmp_path.iterdir()) == ["file.md",
                                                                                                     "table.md"]
    command.main(["--out", str(table), "--rows", "kernels", "--quick", "--device", "cpu"])
    assert table.read_text() == "| the table |\n"
    measured.clear()

    def unwritable(*args, **kwargs):  # a read-only folder (root writes through chmod: refused here instead)
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr("tempfile.TemporaryFile", unwritable)
    with pytest.raises(SystemExit):
        command.main(["--out", str(table), "--rows", "kernels", "--quick", "--device", "cpu"])
    assert "cannot write the table into" in capsys.readouterr().err and not measured


def test_the_stop_agreement_bench_prints_a_row_per_kind_of_step(capsys):
    """Each row's costs are its own columns' differences, from times of the dummy steps' length or more."""
    from bench import stop_agreement
    with pytest.raises(SystemExit):
        stop_agreement.main(["--steps", "0"])
    stop_agreement.main(["--steps", "20", "--step-ms", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(stop_agreement.STEPS)
    for line, kind in zip(lines[2:], stop_agreement.STEPS):
        cells = [c.strip() for c in line.strip("|").split("|")]
        none, blocking, agreement, blocking_cost, agreement_cost = map(float, cells[1:])
        assert cells[0] == kind and min(none, blocking, agreement) >= 1.0
        assert blocking_cost == pytest.approx(blocking - none, abs=2e-3)
        assert agreement_cost == pytest.approx(agreement - none, abs=2e-3)
