"""Suite-wide settings, and tiny trained models that several test files sample from."""

import os
import random
import sys
import warnings
import zlib
from pathlib import Path

# numpy's and scipy's BLAS start a thread per core, which the suite's one_thread below does not reach: beside
# the suite's other process those threads spin against it (an FID test's eigendecompositions ran 5x slower).
# BLAS reads this once, when numpy loads, and every command a test starts inherits it.
if "numpy" in sys.modules:  # a pytest plugin loaded it first: the suite is slower, not wrong
    warnings.warn("numpy was imported before tests/conftest.py could give its BLAS one thread")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import processes

# Without a GPU our Triton kernels are tested in Triton's CPU interpreter. Triton reads this once,
# when it is first imported (ddpm.unet imports it through kernels/), so it is set before any test
# module loads; on a CUDA machine the kernel tests run compiled, on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    processes.add_option(parser)


def pytest_configure(config):
    processes.configure(config)  # the suite in one process per core (tests/processes.py)


def _interpreter_patches_once_per_launch() -> None:
    """Triton's interpreter swaps triton.language's functions for NumPy ones at each kernel launch, and again at
    every call of a @triton.jit helper inside the kernel, though the launch's swap is still in place then: the
    repeats (about 2 ms each, in loops of every program of the grid) took 20 of the kernel tests' 100 seconds.
    Here a launch swaps each language module (triton.language, triton.language.core) once; what runs is
    unchanged. Left alone where the interpreter's layout differs."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
        launch, swap = interpreter.GridExecutor.__call__, interpreter._patch_lang
        empty_scope = interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    languages = (tl, tl.core)
    languages_of = {}  # function: the ids of the language modules among its globals
    launches = []  # a set per launch in progress: the language modules it has swapped so far

    def swap_once(fn):
        if fn not in languages_of:
            found = fn.__globals__.values()
            languages_of[fn] = {id(value) for value in found if any(value is lang for lang in languages)}
        wanted = languages_of[fn]
        if launches and wanted <= launches[-1]:
            return empty_scope()
        if launches:
            launches[-1] |= wanted
        return swap(fn)

    def launch_swapping_once(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = swap_once
    interpreter.GridExecutor.__call__ = launch_swapping_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_patches_once_per_launch()


@pytest.fixture(autouse=True)
def warnings_of_a_fresh_process():
    """Warnings shown once per process (`core.errors.warn_once`) are shown once per test, as each test is a
    fresh start of a command: no test passes or fails because of which ran before it."""
    import core.errors
    core.errors._WARNED.clear()


@pytest.fixture(autouse=True)
def seeded(request):
    """Every test starts from its own fixed seed, so a test that draws from the global generators draws the
    same numbers on every run and in every process: a failure is reproducible, never an unlucky draw. Set
    TESTS_SEED to another integer to draw other numbers (a sweep for tolerances set too tight)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("TESTS_SEED", "0"))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Every model in the suite is tiny: with several threads, and anything else running on a small
    # CPU, synchronisation costs far more than the arithmetic (up to ~100x measured on 2 cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _torchrun(nproc: int, script: str, args: list[str], cwd, timeout: int = 300) -> str:
    """Run `script` under torchrun with `nproc` CPU processes (gloo), deterministically (`helpers.torchrun_command`
    and `torchrun_env`); returns what the job wrote to stderr, and fails with its end if the job failed."""
    import subprocess
    from helpers import torchrun_command, torchrun_env
    done = subprocess.run(torchrun_command(nproc, script) + args, env=torchrun_env(), cwd=cwd, timeout=timeout,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


@pytest.fixture
def on_the_gpu_when_there_is_one():
    """On a CUDA machine (bench/gpu_check.sh) every tensor and module is made on the GPU, so the
    kernels run compiled there; on the CPU they run in Triton's interpreter."""
    if not torch.cuda.is_available():
        yield
        return
    torch.set_default_device("cuda")
    yield
    torch.set_default_device("cpu")


@pytest.fixture
def torchrun():
    """`torchrun(nproc, script, args, cwd)`: a multi-process CPU launch that cannot collide on a port."""
    return _torchrun


# ---------------------------------------------------------------------------------------------
# tiny conditional diffusion models (a few seconds each), shared by the dataset-writer and
# conditioning-accuracy tests


@pytest.fixture(scope="session")
def class_ckpt(tmp_path_factory) -> Path:
    """A pixel model conditioned on three solid-colour classes (blue, green, red)."""
    import train
    from helpers import RES, tiny_args
    root = tmp_path_factory.mktemp("classes")
    for name, colour in (("blue", (0, 0, 255)), ("green", (0, 255, 0)), ("red", (255, 0, 0))):
        (root / name).mkdir()
        for k in range(2):
            Image.new("RGB", (RES, RES), colour).save(root / name / f"{k}.png")
    run_dir = tmp_path_factory.mktemp("class-run")
    train.main(tiny_args(run_dir, f"folder:{root}", "--cond", "class"))
    return run_dir / "checkpoint.pt"


@pytest.fixture(scope="session")
def params_ckpt(tmp_path_factory) -> Path:
    """A pixel model conditioned on two parameters, wind in [-1, 1] and heat in [2, 5]."""
    import train
    from helpers import RES, tiny_args
    root = tmp_path_factory.mktemp("params")
    rng = np.random.default_rng(0)
    lines = []
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (RES, RES, 3), dtype=np.uint8)).save(root / f"{k}.png")
        lines.append(f"{k}.png,{-1 + 2 * k / 3:.4f},{2 + k}")
    (root / "params.csv").write_text("path,wind,heat\n" + "\n".join(lines) + "\n")
    run_dir = tmp_path_factory.mktemp("params-run")
    train.main(tiny_args(run_dir, f"folder:{root}", "--cond", "params"))
    return run_dir / "checkpoint.pt"
