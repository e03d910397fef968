"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Every model in the suite is tiny: with several threads, and anything else running on a small
    # CPU, synchronisation costs far more than the arithmetic (up to ~100x measured on 2 cores).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _torchrun(nproc: int, script: str, args: list[str], cwd, timeout: int = 300) -> None:
    """Run `script` under torchrun with `nproc` CPU processes (gloo), deterministically: `--standalone`
    lets torchrun pick a free port (a fixed one can still be held by another job, or by the previous
    launch), and gloo is pinned to the loopback interface instead of whatever the host name resolves to."""
    import os
    import subprocess
    import sys
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    subprocess.run(command + args, check=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def torchrun():
    """`torchrun(nproc, script, args, cwd)`: a multi-process CPU launch that cannot collide on a port."""
    return _torchrun
