"""Faults a long training job meets: a second process on its folder, stop signals, a full disk, changed
data, and every bad option on the command line. Nothing may be lost or corrupted, and every expected
failure is one line on stderr with a non-zero exit."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from core import cli
from core.checkpoint import load_checkpoint
from core.errors import MissingFileError, UserError
from core.lock import FolderInUse, FolderLock
from helpers import tiny_args, torchrun_command, torchrun_env

TRAIN = str(Path(train.__file__))


@pytest.fixture
def folder(tmp_path) -> Path:
    """Four 16x16 RGB images in two classes."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for k in range(4):
        (root / f"class{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"class{k % 2}" / f"{k}.png")
    return root


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, TRAIN, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended early: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "training did not get going in time"
        time.sleep(0.1)


def the_error(stderr: str) -> str:
    """The one error line of a failed command (progress bars share stderr), checked to be alone and
    without a traceback."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.startswith("error:")]  # as a terminal shows it
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def weights(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoint.pt")["models"]["model"]


# ---------------------------------------------------------------------------------------------
# stop signals


@pytest.mark.parametrize("signum, log_every", [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 3)])
def test_a_stop_signal_checkpoints_the_current_step_and_the_run_resumes_exactly(tmp_path, folder, signum, log_every):
    run_dir = tmp_path / "stopped"
    logging = ["--log-every", str(log_every)]
    process = start(tiny_args(run_dir, folder, *logging, steps=100_000), tmp_path)
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    line = the_error(err)
    stopped = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert f"stopped by {signal.Signals(signum).name} at step {stopped}" in line and "--resume" in line
    # The checkpoint is the last step taken; with --log-every 3 the run mostly stops inside a logging window.
    assert logged_steps(run_dir) == list(range(log_every, stopped + 1, log_every))

    total = stopped - stopped % log_every + 2 * log_every  # the next two windows, the first cut by the stop
    train.main(["--run-dir", str(run_dir), "--resume", "--steps", str(total), "--device", "cpu"])
    straight = tmp_path / "straight"
    train.main(tiny_args(straight, folder, *logging, steps=total))
    # The same records: a window cut by the stop averages the steps before it too (the checkpoint carries it).
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (run_dir, straight)]
    assert len(losses[0]) == total // log_every and losses[0] == losses[1]
    resumed, expected = weights(run_dir), weights(straight)
    assert resumed.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in resumed.items())


FINALIZER_STOP = """
import os, signal, sys, time
from core import cli

class Ending:  # as a progress bar's or a DataLoader's end (which stops its worker processes, at length)
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)  # answered at the next bytecode: in here
        time.sleep(0.01)

def entry(argv):
    Ending()
    if argv == ["work on"]:
        time.sleep(10)
        print("worked on", flush=True)

cli.main(entry)
"""


@pytest.mark.parametrize("then", ["end", "work on"])
def test_a_stop_signal_that_comes_while_an_object_ends_is_not_lost(tmp_path, then):
    """Python prints what a __del__ raises as "Exception ignored in" and goes on: a SIGTERM answered there (at the
    end of a run, as its DataLoader stopped its workers) was lost, with a traceback, and the command went on or
    ended with 0 as if never stopped (a results table would have gone on to its next run)."""
    script = tmp_path / "script.py"
    script.write_text(FINALIZER_STOP)
    env = {**os.environ, "PYTHONPATH": str(Path(TRAIN).parent)}
    done = subprocess.run([sys.executable, str(script), *([then] if then != "end" else [])], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM and "worked on" not in done.stdout
    line = the_error(done.stderr)
    assert "Exception ignored" not in done.stderr
    finished = "error: stopped by SIGTERM as the command finished; what it was to write is written."
    assert line == (finished if then == "end" else f"error: {cli.interrupted('stopped by SIGTERM')}")


SIGNALLED_WORKER = """
import multiprocessing, os, signal, sys
import torch
from core import cli
from core.config import TrainConfig
from core.contract import Trainable, TrainingStage
from core.runtime import Runtime
from training.loop import Trainer

class SignalledWhileAWorkerStarts(torch.utils.data.Dataset):
    # Unpickled by each loader worker that starts anew (spawn, forkserver), before its worker_init_fn runs: the
    # moment a scheduler's SIGTERM to the whole process group comes here.
    def __init__(self):
        self.x = torch.ones(8, 1)
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return self.x[i]
    def __setstate__(self, state):
        self.__dict__.update(state)
        os.killpg(0, signal.SIGTERM)

def loss(models, batch, generator, step):
    return models["model"](batch).square().mean(), {}

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1], force=True)
    stage = TrainingStage("toy", {"model": Trainable(torch.nn.Linear(1, 1), lr=0.1)}, loss,
                          SignalledWhileAWorkerStarts(), {"toy": 1}, {"name": "toy"})
    cfg = TrainConfig(steps=200, batch_size=4, warmup_steps=0, log_every=1, sample_every=0)
    cli.main(lambda argv: Trainer(stage, cfg, sys.argv[2], Runtime(torch.device("cpu")), num_workers=1).run())
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_stop_signal_to_the_process_group_while_loader_workers_start_stops_the_run_after_its_step(tmp_path, method):
    """A loader worker that starts anew (Python 3.14's default start method on Linux, forkserver, or spawn) set
    SIGTERM aside only in its worker_init_fn, seconds after it (or the fork server) started: a scheduler's SIGTERM
    to the process group meanwhile killed it, and the run died with "DataLoader worker exited unexpectedly", a
    traceback and no checkpoint."""
    script = tmp_path / "script.py"
    script.write_text(SIGNALLED_WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(TRAIN).parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), method, str(tmp_path / "run")], env=env, capture_output=True,
                          text=True, timeout=120, start_new_session=True)  # a process group of its own
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    step = load_checkpoint(tmp_path / "run" / "checkpoint.pt", "toy")["step"]
    assert 0 < step < 200 and f"stopped by SIGTERM at step {step} of 200" in the_error(done.stderr)


def test_torchrun_workers_stop_and_checkpoint_when_their_launcher_is_killed(tmp_path, folder):
    # kill -9 of the launcher passes no signal on; its workers (each in a session of its own) used to train on
    # as orphans holding the lock. Linux now sends each SIGTERM, so they stop together and checkpoint.
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    run_dir = tmp_path / "orphaned"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        launcher = subprocess.Popen([*torchrun_command(2, TRAIN), *tiny_args(run_dir, folder, steps=100_000)],
                                    cwd=tmp_path, env=torchrun_env(), stdout=out, stderr=err)
        wait_for(lambda: len(logged_steps(run_dir)) >= 3, launcher, timeout=180)
        launcher.kill()
        launcher.wait()

    holder = []

    def released() -> bool:
        try:
            with FolderLock(run_dir):
                return True
        except FolderInUse as err:
            holder[:] = re.findall(r"in use by process (\d+)", str(err))
            return False
    deadline = time.monotonic() + 120
    while not released():
        if time.monotonic() > deadline:
            for pid in holder:  # rank 0: the other worker then fails at its next collective
                os.kill(int(pid), signal.SIGKILL)
            pytest.fail("the workers did not stop after their launcher died")
        time.sleep(0.2)
    stopped = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    assert logged_steps(run_dir) == list(range(1, stopped + 1))
    assert f"stopped by SIGTERM at step {stopped}" in (told := (tmp_path / "err.txt").read_text())
    assert f"resume with: torchrun --nproc_per_node 2 train.py --stage ddpm --run-dir {run_dir} --resume" in told
    train.main(["--run-dir", str(run_dir), "--resume", "--steps", str(stopped + 1), "--device", "cpu"])
    assert logged_steps(run_dir) == list(range(1, stopped + 2))


def test_torchrun_workers_die_with_a_launcher_killed_while_they_start(tmp_path, folder):
    """Killed while its workers imported torch, the launcher left them blocked for half an hour joining a group
    that would never form (deaf to SIGTERM there): their parent-death signal was asked for only after that."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death signal is Linux's")
    run_dir = tmp_path / "never-started"
    launcher = subprocess.Popen([*torchrun_command(2, TRAIN), *tiny_args(run_dir, folder, steps=10)], cwd=tmp_path,
                                env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # ended meanwhile
                pass
        return [pid for pid in found if pid != launcher.pid]
    deadline = time.monotonic() + 60
    while len(workers()) < 2 and time.monotonic() < deadline:  # the launcher has started both
        time.sleep(0.05)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while workers() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = workers()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "torchrun workers outlived their launcher"
    assert not (run_dir / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------
# one process per folder


def test_a_second_process_is_refused_and_a_dead_holder_is_taken_over(tmp_path, folder, capsys):
    run_dir = tmp_path / "busy"
    process = start(tiny_args(run_dir, folder, "--ckpt-every", "1", steps=100_000), tmp_path)
    try:
        wait_for(lambda: (run_dir / "checkpoint.pt").exists(), process)
        before = (run_dir / "config.json").read_bytes()
        with pytest.raises(FolderInUse, match=f"in use by process {process.pid}"):
            train.main(tiny_args(run_dir, folder, steps=5))
        with pytest.raises(FolderInUse, match=f"in use by process {process.pid}"):
            train.main(["--run-dir", str(run_dir), "--resume", "--steps", "5", "--device", "cpu"])
        assert (run_dir / "config.json").read_bytes() == before
    finally:
        process.kill()  # dies holding the lock, like a kill -9 or a crash
        process.communicate()
    capsys.readouterr()
    step = load_checkpoint(run_dir / "checkpoint.pt")["step"]
    train.main(["--run-dir", str(run_dir), "--resume", "--steps", str(step + 1), "--device", "cpu"])
    assert f"taking over {run_dir / '.lock'} from process {process.pid}" in capsys.readouterr().err
    assert not (run_dir / ".lock").exists()  # released at the end


def test_a_refused_process_names_a_holder_that_has_locked_but_not_yet_written(tmp_path):
    """The holder locks the file, then writes who it is: a process refused in between waits for the name."""
    import fcntl
    import threading
    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)  # another open file: its flock conflicts
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        write = threading.Timer(0.2, lambda: os.pwrite(fd, json.dumps({"pid": 4242, "host": "h"}).encode(), 0))
        write.start()
        with pytest.raises(FolderInUse, match="in use by process 4242 on h"):
            with FolderLock(folder):
                pass
        write.join()
    finally:
        os.close(fd)


def test_folder_lock_in_process(tmp_path):
    with FolderLock(tmp_path / "run") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        with pytest.raises(FolderInUse, match="in use by process"):
            with FolderLock(tmp_path / "run"):
                pass
    assert not (tmp_path / "run").exists()  # made for nothing: removed again
    with FolderLock(tmp_path / "run"):
        (tmp_path / "run" / "kept").write_text("x")
    assert (tmp_path / "run" / "kept").exists() and not (tmp_path / "run" / ".lock").exists()


def _wait_until_blocked_on(path: Path) -> None:
    """Return once some flock request waits on `path`'s file: Linux lists waiting requests in /proc/locks
    ("-> FLOCK ... MAJ:MIN:INODE"). Elsewhere, give the waiter half a second to get there."""
    locks = Path("/proc/locks")
    if not locks.exists():
        time.sleep(0.5)
        return
    inode = f":{path.stat().st_ino} "
    deadline = time.monotonic() + 60
    while not any("->" in line and inode in line for line in locks.read_text().splitlines()):
        assert time.monotonic() < deadline, "the waiter never came to wait on the lock"
        time.sleep(0.01)


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_taking_turns_never_lets_two_in_when_the_holder_removes_the_lock_file(tmp_path):
    """A holder removes its lock file and then releases it. One that waited is then granted the lock of the
    removed file, while a newcomer may already hold a new file at the same path: the waiter must lock the new
    file instead of going on beside the newcomer (both would make the same set at once)."""
    import fcntl
    import threading

    from core.lock import taking_turns
    path = tmp_path / "set.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    entered, leave = threading.Event(), threading.Event()

    def waiter():
        with taking_turns(path, "a test's set"):
            entered.set()
            leave.wait(60)

    thread = threading.Thread(target=waiter)
    thread.start()
    _wait_until_blocked_on(path)  # the waiter now waits on the holder's file
    assert not entered.is_set()
    path.unlink()  # the holder is done: it removes its file, a newcomer locks a new one there, the holder lets go
    newcomer = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(newcomer, fcntl.LOCK_EX)
    os.close(holder)
    assert not entered.wait(1.0), "the waiter went on while the newcomer held the lock"
    os.close(newcomer)  # (the newcomer keeps its file, as if it had died: the waiter takes it next)
    assert entered.wait(60)
    leave.set()
    thread.join(60)
    assert not path.exists()


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path, capsys):
    """A DataLoader worker (a fork) outlives its killed parent for seconds: the folder must be free at once."""
    code = ("import os, sys, time\nfrom core.lock import FolderLock\nFolderLock(sys.argv[1]).__enter__()\n"
            "child = os.fork()\nif child == 0:\n    time.sleep(60)\n    os._exit(0)\n"
            "print(child, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(timeout=60)
        with FolderLock(tmp_path / "run"):  # while the child still runs
            os.kill(child, 0)  # still running (this raises once it is gone)
        assert "taking over" in capsys.readouterr().err
    finally:
        parent.stdout.close()
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------------------------
# a full disk, stale temporaries, changed data


def test_a_checkpoint_write_that_fails_half_way_keeps_the_previous_one(tmp_path, folder, monkeypatch, capsys):
    run_dir = tmp_path / "full"
    train.main(tiny_args(run_dir, folder, "--ckpt-every", "1", steps=2))
    good = (run_dir / "checkpoint.pt").read_bytes()

    def disk_fills_up(obj, f, *args, **kwargs):
        f.write(b"the first few bytes")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:  # as torch.save's zip writer does: its own error, raised while handling the full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3297472 vs 3297364")

    monkeypatch.setattr(torch, "save", disk_fills_up)
    code = cli.run(train.main, ["--run-dir", str(run_dir), "--resume", "--steps", "4", "--device", "cpu"])
    # The file named, which torch.save's error did not: the run folder and a cache may lie on different disks.
    assert code == 1 and the_error(capsys.readouterr().err).startswith(
        f"error: disk full while writing {run_dir / 'checkpoint.pt'}: free some space")
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_a_preview_is_one_line_and_resuming_writes_the_preview(tmp_path, folder, monkeypatch,
                                                                                        capsys):
    from PIL import Image as PILImage
    run_dir = tmp_path / "full"
    args = tiny_args(run_dir, folder, "--ckpt-every", "1", "--sample-every", "1", steps=2)
    real_save = PILImage.Image.save
    calls = []

    def disk_fills_up(image, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 2:  # the second preview: step 2's, after its checkpoint
            fp.write(b"\x89PNG half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, fp, *a, **k)

    monkeypatch.setattr(PILImage.Image, "save", disk_fills_up)
    assert cli.run(train.main, args) == 1
    grid = run_dir / "samples" / "step-0000002.png"
    assert the_error(capsys.readouterr().err).startswith(f"error: disk full while writing {grid}: free some space")
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2 and not grid.exists()
    assert not [p for p in (run_dir / "samples").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(PILImage.Image, "save", real_save)
    assert cli.run(train.main, args + ["--resume"]) == 0
    assert grid.is_file() and (run_dir / "samples" / "final.png").read_bytes() == grid.read_bytes()


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path, folder):
    import socket
    run_dir = tmp_path / "stale"
    train.main(tiny_args(run_dir, folder, "--ckpt-every", "1", steps=1))
    dead = run_dir / f".checkpoint.pt.{socket.gethostname()}.999999999.tmp"
    alive = run_dir / f".elsewhere.bin.{socket.gethostname()}.{os.getpid()}.tmp"  # a live writer's
    for path in (dead, alive):
        path.write_bytes(b"half a checkpoint")
    train.main(["--run-dir", str(run_dir), "--resume", "--steps", "2", "--device", "cpu"])
    assert not dead.exists() and alive.exists()


def test_a_run_killed_before_its_first_checkpoint_starts_over_when_run_again(tmp_path, folder, capsys):
    # What kill -9 leaves between the first logged step and the first checkpoint: config, log, a lock file.
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 9.0}\n')
    (run_dir / ".lock").write_text('{"pid": 999999999}')
    with pytest.raises(FileNotFoundError, match="holds no checkpoint to resume; drop --resume to start a new run there "
                                                r"\(the run there stopped before its first checkpoint\)\.$"):
        train.main(["--run-dir", str(run_dir), "--resume", "--device", "cpu"])
    train.main(tiny_args(run_dir, folder, steps=2))
    assert "stopped before its first checkpoint; starting it over" in capsys.readouterr().out
    train.main(tiny_args(tmp_path / "fresh", folder, steps=2))
    assert (run_dir / "metrics.jsonl").read_text() != ""
    assert [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(line)["loss"] for line in (tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()]
    assert torch.equal(weights(run_dir)["conv_in.weight"], weights(tmp_path / "fresh")["conv_in.weight"])


def test_a_classifier_killed_after_an_evaluation_before_its_first_checkpoint_starts_over(tmp_path, folder, monkeypatch,
                                                                                         capsys):
    """An evaluation writes figures/confusion-step-N.png and its latest copy, confusion.png, beside the log: a run
    killed after one and before its first checkpoint (kill -9, a crash, divergence) left a folder that the same
    command refused as holding files that are not its own."""
    from training.loop import Trainer
    run_dir = tmp_path / "run"
    args = ["--stage", "classify", "--dataset", f"folder:{folder}", "--target", "class", "--resolution", "16",
            "--batch-size", "4", "--warmup-steps", "0", "--log-every", "1", "--device", "cpu", "--run-dir", str(run_dir),
            "--steps", "2", "--sample-every", "1", "--ckpt-every", "100"]
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_step", killed_in("_step", 1))
        with pytest.raises(KeyboardInterrupt, match="killed"):
            train.main(args)
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "metrics.jsonl", "figures", "confusion.png"}
    train.main(args)
    assert "stopped before its first checkpoint; starting it over" in capsys.readouterr().out
    assert load_checkpoint(run_dir / "checkpoint.pt", "classify")["step"] == 2
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 1, 2, 2]


def test_a_new_run_refuses_a_folder_of_other_files_such_as_its_own_training_images(tmp_path, folder):
    # A --run-dir typo that names the dataset: previews written there would become training data.
    before = sorted(str(p) for p in folder.rglob("*"))
    with pytest.raises(FileExistsError, match=r"^--run-dir \S+ already holds files that are not this command's \(class0, "):
        train.main(tiny_args(folder, folder, steps=1))
    assert sorted(str(p) for p in folder.rglob("*")) == before
    # The same of the results table's and the sweep's --out, before any work.
    from evaluate import experiment, sweep
    real = f"folder:{folder}"
    with pytest.raises(FileExistsError, match=rf"^--out {folder} already holds files that are not this command's "
                                              rf"\(class0, class1\); choose an empty or new folder\.$"):
        experiment.main(["--real", real, "--synthetic", f"gen={real}", "--test", real, "--out", str(folder)])
    with pytest.raises(FileExistsError, match="not this command's"):
        sweep.main(["--ckpt", "x.pt", "--judge", "y.pt", "--real", real, "--test", real, "--out", str(folder)])
    assert sorted(str(p) for p in folder.rglob("*")) == before
    # What a run killed before its first checkpoint leaves is no obstacle to starting it again.
    early = tmp_path / "early"
    (early / "samples").mkdir(parents=True)
    (early / "config.json").write_text("{}")
    train.main(tiny_args(early, folder, steps=1))
    assert (early / "checkpoint.pt").is_file()


def test_resuming_on_changed_data_is_refused(tmp_path, folder):
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, folder, "--ckpt-every", "1", steps=1))
    resume = ["--run-dir", str(run_dir), "--resume", "--steps", "2", "--device", "cpu"]
    extra = folder / "class0" / "extra.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(extra)                    # an image more
    with pytest.raises(ValueError, match="num_samples was 4, now 5"):
        train.main(resume)
    extra.unlink()
    (folder / "class2").mkdir()                                          # a class more
    Image.new("RGB", (16, 16), (9, 9, 9)).save(folder / "class2" / "x.png")
    with pytest.raises(ValueError, match="class_names was"):
        train.main(resume)
    for p in (folder / "class2").iterdir():
        p.unlink()
    (folder / "class2").rmdir()
    first = folder / "class0" / "0.png"                                  # same count, one image edited
    pixels = np.asarray(Image.open(first)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(first)
    with pytest.raises(ValueError, match="content fingerprint"):
        train.main(resume)
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 1


def test_a_final_preview_that_fails_cannot_lose_the_final_checkpoint(tmp_path, folder, monkeypatch):
    import training.loop
    run_dir = tmp_path / "run"

    def broken_preview(self, step):
        raise RuntimeError("preview failed")

    monkeypatch.setattr(training.loop.Trainer, "_preview", broken_preview)
    with pytest.raises(RuntimeError, match="preview failed"):
        train.main(tiny_args(run_dir, folder, steps=2))
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2   # written before the preview


def test_inconsistent_checkpoints_are_refused_in_one_sentence(tmp_path, folder):
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, folder, "--ckpt-every", "1", steps=1))
    payload = load_checkpoint(run_dir / "checkpoint.pt")
    resume = ["--run-dir", str(run_dir), "--resume", "--steps", "2", "--device", "cpu"]
    del payload["optimizers"]
    torch.save(payload, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="lacks optimizers"):
        train.main(resume)
    payload["optimizers"] = {"model": {}}
    payload["models"]["model"] = {k: v[:1] for k, v in payload["models"]["model"].items()}
    torch.save(payload, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="does not fit the run its config describes"):
        train.main(resume)



def _tiny_saved_models(tmp_path: Path) -> dict:
    """For each network a checkpoint loader rebuilds: (its weights, a function loading a payload that
    holds `state` as its sampling weights, or no weights at all for None)."""
    from classify.model import ClassifierConfig, build_resnet18, load_classifier
    from core.checkpoint import save_checkpoint
    from core.config import to_dict
    from data import DatasetInfo
    from ddpm.stage import load_unet
    from ddpm.unet import UNet, UNetConfig
    from vae.autoencoder import AutoencoderConfig, AutoencoderKL
    from vae.config import VAEConfig
    from vae.stage import load_autoencoder

    cpu, path = torch.device("cpu"), tmp_path / "checkpoint.pt"
    unet = UNetConfig(image_size=8, in_channels=1, base_channels=32, channel_mult=(1,),
                      num_res_blocks=1, attention_resolutions=())
    autoencoder = AutoencoderConfig(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                    latent_channels=2, resolution=8)
    vae_config = to_dict(VAEConfig(autoencoder=autoencoder))
    classifier = ClassifierConfig(in_channels=1, num_outputs=2)
    info = DatasetInfo("toy", resolution=8, channels=1, class_names=("a", "b"), param_names=(), param_ranges=(),
                       num_samples=2).to_dict()

    def saved(state):  # None: the entry is missing altogether
        return {} if state is None else {"model": state}

    def classify(state):
        save_checkpoint({"stage": "classify", "config": {"model": to_dict(classifier)}, "data_info": info,
                         "models": saved(state)}, path)
        return load_classifier(path)

    return {
        "U-Net": (UNet(unet).state_dict(),
                  lambda state: load_unet({"models": {}, "ema": saved(state), "data_info": info}, unet, cpu,
                                          "ema", path)),
        "autoencoder": (AutoencoderKL(autoencoder).state_dict(),
                        lambda state: load_autoencoder({"stage": "vae", "config": vae_config, "models": {},
                                                        "ema": saved(state), "scale_factor": 1.0}, cpu, path)),
        "ResNet-18": (build_resnet18(classifier, 8).state_dict(), classify),
    }


@pytest.mark.parametrize("network", ["U-Net", "autoencoder", "ResNet-18"])
def test_weights_that_do_not_fit_their_network_are_refused_in_one_sentence(tmp_path, network):
    """Every loader of a trained network (ddpm, ldm and invert read U-Nets; ldm and invert an autoencoder;
    the judging tools a classifier) refuses a broken state dict with a ValueError naming the file, never
    a KeyError or a half-loaded model."""
    state, load = _tiny_saved_models(tmp_path)[network]
    load(state)  # intact: loads
    first = next(k for k, v in state.items() if v.is_floating_point())
    cases = [({k: v for k, v in state.items() if k != first}, rf"{network}.*1 missing \(e\.g\. {re.escape(first)}\)"),
             ({**state, "extra.weight": torch.zeros(1)}, r"1 unexpected \(e\.g\. extra\.weight\)"),
             ({**state, first: state[first][:1]}, "with the wrong shape"),
             ({**state, first: torch.full_like(state[first], math.nan)}, "NaN or infinite"),
             (None, f"holds no {re.escape(network)}")]
    for broken, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            load(broken)
        assert str(tmp_path / "checkpoint.pt") in str(caught.value)


def test_expected_os_errors_read_as_one_sentence():
    full = cli.explain(OSError(errno.ENOSPC, "No space left on device", "runs/x/metrics.jsonl"))
    assert full[0].startswith("disk full while writing runs/x/metrics.jsonl") and full[1] == 1
    limit = OSError(errno.EFBIG, "File too large")
    assert cli.explain(limit)[0].startswith("file size limit reached: raise the limit (ulimit -f)")
    assert cli.explain(RuntimeError("a bug")) is None
    read_only = cli.explain(OSError(errno.EROFS, "Read-only file system", "runs/x"))
    assert read_only[0].startswith("cannot write runs/x (Read-only file system)")
    wrapped = UserError("Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                        "  File ...\ncore.errors.UserError: Cannot read image a.png (truncated); remove or replace the "
                        "file.")
    assert cli.explain(wrapped)[0] == "Cannot read image a.png (truncated); remove or replace the file."
    assert cli.explain(MissingFileError("--ckpt x.pt does not exist; pass a checkpoint."))[0].startswith("--ckpt x.pt")
    assert cli.explain(RuntimeError("a bug")) is None  # unexpected errors keep their traceback
    assert cli.explain(ValueError("math domain error")) is None  # so does a library's ValueError
    assert cli.explain(FileNotFoundError(2, "No such file or directory", "x")) is None


# ---------------------------------------------------------------------------------------------
# every bad option: one line, a non-zero exit, nothing written


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    images = root / "images"
    images.mkdir()
    for k in range(4):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(images / f"{k}.png")
    run_dir = root / "run"
    train.main(tiny_args(run_dir, images, "--ckpt-every", "1", steps=2))
    return run_dir, images


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


TRAIN_CASES = [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--steps", "-5"], "--steps must be 0 or positive"),
    (["--ema-decay", "1.5"], "--ema-decay must be in"),
    (["--log-every", "0"], "--log-every must be at least 1"),
    (["--ckpt-every", "0"], "--ckpt-every must be at least 1"),
    (["--sample-every", "-1"], "--sample-every must be 0"),
    (["--preview-images", "0"], "--preview-images must be at least 1"),
    (["--preview-steps", "500"], "--preview-steps 500 exceeds the model's T = 100"),
    (["--cond-drop-prob", "1.5"], "--cond-drop-prob must be in"),
    (["--num-timesteps", "0"], "--num-timesteps must be from 1 to 100,000"),
    (["--beta-range", "0.1"], "--beta-range takes two numbers"),
    (["--schedule", "linear", "--beta-range", "0.5", "0.1"], "--beta-range must satisfy"),
    (["--schedule", "cosine", "--beta-range", "0.001", "0.02"], "cosine schedule has no beta range"),
    (["--resolution", "4"], "--resolution must be at least 8"),
    (["--num-samples", "-1"], "--num-samples must be 0"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "tpu"], "--device"),
    (["--dataset", "imagenet"], "Unknown --dataset 'imagenet'"),
    (["--dataset", "folder:/no/such/folder"], "does not exist"),
    (["--cond", "class", "--dataset", "plumes"], "needs a labelled dataset"),
    (["--lr", "x"], "invalid float value"),
    (["--sampler", "ddim"], "unrecognized arguments"),
    (["--stage", "vae", "--perceptual-taps", "9"], "--perceptual-taps must be in 1..5"),
    (["--stage", "vae", "--kl-weight", "-1"], "--kl-weight must be 0 or positive"),
    (["--stage", "vae", "--disc-start", "-5"], "--disc-start must be -1"),
    (["--stage", "vae", "--pretrained", "/no/such.ckpt"], "--pretrained /no/such.ckpt does not exist"),
    (["--stage", "ddpm", "--pretrained", "/no/such-unet"], "--pretrained /no/such-unet does not exist"),
    (["--stage", "vae", "--test-dataset", "folder:/no/such"], "does not exist"),
    (["--stage", "vae", "--test-samples", "-1"], "--test-samples must be 0 (all) or positive"),
    (["--stage", "ldm", "--vae-ckpt", "/no/such.pt"], "--vae-ckpt /no/such.pt does not exist"),
    (["--stage", "ldm", "--encode-batch", "0"], "--encode-batch must be at least 1"),
    (["--stage", "classify", "--extra-fraction", "0.5"], "need --extra-dataset"),
    (["--stage", "classify", "--extra-dataset", "folder:/no/such"], "does not exist"),
    (["--stage", "classify", "--target", "labels"], "invalid choice"),
    (["--stage", "gan"], "argument --stage: invalid choice: 'gan'"),  # the stage itself: one line too
    (["--run-dir", "x" * 300], "is too long for the file system"),  # ENAMETOOLONG
    # networks that cannot take the image size: refused at start-up, not at the first step (or the first step of
    # the discriminator) after the data is loaded
    (["--channel-mult"], "--channel-mult needs at least one level"),
    (["--resolution", "24"], "24x24 images (--resolution 24) do not fit the U-Net"),
    (["--stage", "vae", "--resolution", "16", "--disc-start", "0"], "--disc-layers 3 needs images of at least 24 px"),
    (["--stage", "classify", "--resolution", "8", "--batch-size", "1"], "ResNet-18 shrinks 8 px images to 1x1"),
]


@pytest.mark.parametrize("extra, message", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_every_bad_train_option_is_one_line_and_writes_nothing(tmp_path, trained, capsys, extra, message):
    run_dir, images = trained
    before = snapshot(run_dir)
    new_dir = tmp_path / "new"
    args = tiny_args(new_dir, images, steps=2)
    if extra[0] == "--stage":  # stage-specific options go with that stage's own defaults
        args = ["--run-dir", str(new_dir), "--device", "cpu", *extra]
    else:
        args = args + extra
    with pytest.raises(SystemExit) if "invalid" in message or "unrecognized" in message else _no_exit():
        code = cli.run(train.main, args)
        assert code != 0
    assert message in the_error(capsys.readouterr().err)
    assert not new_dir.exists() and snapshot(run_dir) == before


@pytest.mark.parametrize("option", ["--pretrained", "--vgg-weights", "--lpips-weights"])
def test_a_weights_file_that_is_not_one_is_refused_before_any_data_is_read(tmp_path, trained, capsys, monkeypatch,
                                                                           option):
    run_dir, images = trained
    import vae.stage

    def unread(*args, **kwargs):
        raise AssertionError("the data was read before the weights file was checked")

    monkeypatch.setattr(vae.stage, "load_dataset", unread)
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    for wrong, message in ((text, "as weights"), (run_dir / "checkpoint.pt", "does not hold a dictionary of tensors")):
        new_dir = tmp_path / "new"
        args = ["--stage", "vae", "--dataset", f"folder:{images}", "--resolution", "16", "--run-dir", str(new_dir),
                "--device", "cpu", "--perceptual", "lpips", option, str(wrong)]
        assert cli.run(train.main, args) == 1
        assert message in the_error(capsys.readouterr().err) and not new_dir.exists()


LABEL_CASES = [
    (["--cond", "class", "--dataset", "plumes"], "--cond class needs a labelled dataset, and plumes has no classes"),
    (["--stage", "ldm", "--cond", "params", "--dataset", "cifar10"], "--cond params needs per-image parameters"),
    (["--stage", "classify", "--target", "params", "--dataset", "cifar10"], "--target params needs"),
    (["--stage", "classify", "--target", "class", "--dataset", "plumes"], "and plumes has no classes; use class subfolders"),
    (["--cond", "params", "--dataset", "folder:{folder}"], "--cond params needs per-image parameters"),
    (["--cond", "class", "--dataset", "folder:{folder}/class0"], "has no classes"),
]


@pytest.mark.parametrize("extra, message", LABEL_CASES, ids=[" ".join(c[0][-4:]) for c in LABEL_CASES])
def test_labels_an_option_needs_are_checked_before_any_data_is_loaded(tmp_path, folder, monkeypatch, capsys, extra,
                                                                      message):
    # Simulating 10000 plumes, downloading CIFAR-10 or decoding a folder before refusing would be minutes lost.
    import classify.stage
    import ddpm.stage
    import ldm.stage

    def loading(*args, **kwargs):
        raise AssertionError("data was loaded before the options were checked")
    for module in (ddpm.stage, ldm.stage, classify.stage):
        monkeypatch.setattr(module, "load_dataset", loading)
    new_dir = tmp_path / "new"
    args = ["--run-dir", str(new_dir), "--device", "cpu", *(a.format(folder=folder) for a in extra)]
    assert cli.run(train.main, args) != 0
    assert message in the_error(capsys.readouterr().err)
    assert not new_dir.exists()


def test_resume_mistakes_are_one_line_and_change_nothing(tmp_path, trained, capsys):
    run_dir, images = trained
    before = snapshot(run_dir)
    cases = [(["--run-dir", str(run_dir), "--resume", "--steps", "5", "--lr", "1.0"], "cannot change when resuming"),
             (["--run-dir", str(run_dir), "--resume", "--steps", "1"], "already at step 2"),
             (tiny_args(run_dir, images, steps=5), "already holds a run"),
             (["--run-dir", str(tmp_path / "empty"), "--resume"], "holds no checkpoint to resume"),
             (["--stage", "vae", "--run-dir", str(run_dir), "--resume"], "stage 'ddpm'")]
    for args, message in cases:
        assert cli.run(train.main, [*args, "--device", "cpu"]) != 0
        assert message in the_error(capsys.readouterr().err), args
    assert snapshot(run_dir) == before and not (tmp_path / "empty").exists()


def test_a_resume_that_would_change_a_cosine_schedules_rates_is_refused(tmp_path, trained, capsys):
    """Under a cosine (or one-cycle) rate, extending a run would change the rates of steps already trained:
    it would train neither the run started nor one of the new length (the docs promise the latter)."""
    _, images = trained
    run_dir = tmp_path / "cosine"
    train.main(tiny_args(run_dir, images, "--lr-schedule", "cosine", "--warmup-steps", "0", steps=2))
    before = snapshot(run_dir)
    assert cli.run(train.main, ["--run-dir", str(run_dir), "--resume", "--steps", "4", "--device", "cpu"]) != 0
    assert "--steps 4 would change the learning rates this run has trained with" in the_error(capsys.readouterr().err)
    assert snapshot(run_dir) == before


def test_a_preset_given_on_resume_is_said_to_be_unread(tmp_path, trained, capsys):
    """The checkpoint's config is the run's: a --preset typed on resume changes nothing, and says so."""
    run_dir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    train.main(["--run-dir", str(copy), "--resume", "--steps", "3", "--preset", "ddpm-cifar10", "--device", "cpu"])
    assert f"Note: --preset ddpm-cifar10 is not read when resuming: the run in {copy}" in capsys.readouterr().out
    assert load_checkpoint(copy / "checkpoint.pt", "ddpm")["config"]["data"]["resolution"] == 16


def test_a_resubmitted_finished_run_exits_at_once_without_loading_data(tmp_path, trained, capsys, monkeypatch):
    # Run again as it was: exit 0 and nothing written, decided before the data is read (a job scheduler
    # that resubmits finished jobs must not wait for a dataset, or fail because it moved).
    import ddpm.stage
    run_dir, _ = trained
    before = snapshot(run_dir)

    def loading(*args, **kwargs):
        raise AssertionError("data was loaded for a run with nothing to train")
    monkeypatch.setattr(ddpm.stage, "load_dataset", loading)
    assert cli.run(train.main, ["--run-dir", str(run_dir), "--resume", "--steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "already at step 2 of 2: nothing to train" in out and "Done (ddpm): step 2" in out
    assert snapshot(run_dir) == before


def test_a_resubmitted_run_of_zero_steps_exits_at_once_without_loading_data(tmp_path, trained, capsys, monkeypatch):
    """--steps 0 writes the starting weights as a run: run again, it is as finished as any other."""
    import ddpm.stage
    _, images = trained
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, images, steps=0))
    before = snapshot(run_dir)
    monkeypatch.setattr(ddpm.stage, "load_dataset", lambda *a, **k: pytest.fail("data was loaded for nothing"))
    assert cli.run(train.main, ["--run-dir", str(run_dir), "--resume", "--steps", "0", "--device", "cpu"]) == 0
    assert "already at step 0 of 0: nothing to train" in capsys.readouterr().out
    assert snapshot(run_dir) == before


SAMPLE_CASES = [
    (["--num", "0"], "--num must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--first-index", "-1"], "--first-index must be at least 0"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--steps", "500"], "--steps must be at most the model's T = 100"),
    (["--eta", "2"], "--eta must be in [0, 1]"),
    (["--sampler", "pndm", "--eta", "0.5"], "--eta applies to --sampler ddim only"),
    (["--variance", "large"], "--variance applies to --sampler ddpm only"),
    (["--sampler", "pndm", "--steps", "3"], "needs at least 4 steps"),
    (["--guidance-scale", "3"], "--guidance-scale has nothing to guide"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["--class", "cat"], "trained without conditioning"),
    (["--sweep", "wind=0:1:3"], "--sweep needs a conditional model"),
    (["--interpolate-to", "wind=1"], "--interpolate-to has no effect without --interpolate"),
    (["--gif-images", "4"], "--gif-images has no effect without --gif"),
    (["--frames", "4"], "--frames has no effect without --interpolate"),
    (["--interpolate", "--frames", "1"], "--frames must be at least 2"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--sampler", "euler"], "invalid choice: 'euler'"),
]


@pytest.mark.parametrize("extra, message", SAMPLE_CASES, ids=[" ".join(c[0]) for c in SAMPLE_CASES])
def test_every_bad_sample_option_is_one_line_and_writes_nothing(tmp_path, trained, capsys, extra, message):
    run_dir, _ = trained
    before = snapshot(run_dir)
    out = tmp_path / "out"
    args = ["--ckpt", str(run_dir / "checkpoint.pt"), "--out", str(out), "--device", "cpu", "--num", "1", *extra]
    with pytest.raises(SystemExit) if "invalid choice" in message else _no_exit():
        assert cli.run(sample.main, args) != 0
    assert message in the_error(capsys.readouterr().err)
    assert not out.exists() and snapshot(run_dir) == before


def test_bad_checkpoints_and_outputs_for_sample_are_one_line(tmp_path, trained, capsys):
    run_dir, _ = trained
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((run_dir / "checkpoint.pt").read_bytes()[:1000])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.png").write_bytes(b"keep")
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(["--ckpt", str(tmp_path / "missing.pt")], "does not exist"),
             (["--ckpt", str(corrupt)], "corrupt"),
             (["--ckpt", str(run_dir / "checkpoint.pt"), "--out", str(busy)], "already holds files"),
             (["--ckpt", str(run_dir / "checkpoint.pt"), "--out", str(afile)], "lies at or under the file"),
             (["--ckpt", str(run_dir / "checkpoint.pt"), "--out", str(afile / "grid")], "lies at or under the file")]
    for args, message in cases:
        assert cli.run(sample.main, [*args, "--device", "cpu", "--num", "1"]) != 0
        assert message in the_error(capsys.readouterr().err), args
    assert (busy / "mine.png").read_bytes() == b"keep" and sorted(p.name for p in busy.iterdir()) == ["mine.png"]


def test_the_real_entry_points_exit_non_zero_with_one_line(tmp_path, trained):
    run_dir, images = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for script, args in ((TRAIN, tiny_args(tmp_path / "x", images, "--lr", "-1", steps=2)),
                         (str(Path(sample.__file__)), ["--ckpt", str(tmp_path / "missing.pt")])):
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 1 and the_error(done.stderr)
    done = subprocess.run([sys.executable, TRAIN, *tiny_args(tmp_path / "x", images, "--lr", "-1", steps=2), "--debug"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr  # --debug shows where it came from


class _no_exit:
    """A context that expects nothing special (the case returns an exit code instead of raising)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_run_folder_or_another_folder_given_as_a_checkpoint_is_named_as_such(tmp_path, class_ckpt):
    run_dir = class_ckpt.parent
    with pytest.raises(FileNotFoundError, match=rf"^--ckpt {run_dir} is a run folder; pass its checkpoint, "
                                                rf"{class_ckpt}\.$"):
        sample.main(["--ckpt", str(run_dir), "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match=rf"^--ckpt {tmp_path} is a folder, not a file; pass the checkpoint.pt"):
        sample.main(["--ckpt", str(tmp_path), "--device", "cpu"])


def test_an_output_folder_that_is_a_file_or_lies_under_one_is_refused_in_one_line(tmp_path, folder, class_ckpt, capsys):
    from evaluate import experiment, sweep
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    real = f"folder:{folder}"
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (train.main, tiny_args(blocker, folder)),
        (train.main, tiny_args(blocker / "run", folder)),
        (sample.main, ["--ckpt", str(class_ckpt), "--dataset-out", str(blocker), "--per-class", "1", "--device", "cpu"]),
        (experiment.main, ["--real", real, "--synthetic", f"gen={real}", "--test", real, "--out", str(blocker / "table"),
                           "--device", "cpu"]),
        # Checked before any set is drawn, though --write-best is written last.
        (sweep.main, ["--ckpt", str(class_ckpt), "--judge", str(class_ckpt), "--real", real, "--test", real,
                      "--out", str(tmp_path / "sweep"), "--write-best", str(blocker), "--write-per-class", "1"]),
        (sweep.main, ["--ckpt", str(class_ckpt), "--judge", str(class_ckpt), "--real", real, "--test", real,
                      "--out", str(blocker)]),
    ]
    for main, argv in cases:
        assert cli.run(main, argv) == 1, argv
        error = the_error(capsys.readouterr().err)
        assert re.fullmatch(rf"error: .*{re.escape(str(blocker))}.* (a )?file.*; choose .*\.", error), error
    assert sorted(p.name for p in tmp_path.iterdir()) == before and blocker.read_text() == "mine"


def test_values_no_option_can_take_are_refused_in_one_line_before_any_file_is_written(tmp_path, folder, class_ckpt,
                                                                                       capsys):
    from data import export
    from evaluate import consistency, gradcam, sweep
    from fid import __main__ as fid_cli
    real = f"folder:{folder}"
    run_dir = tmp_path / "new" / "run"
    sweep_argv = ["--ckpt", str(class_ckpt), "--judge", str(class_ckpt), "--real", real, "--test", real,
                  "--out", str(tmp_path / "new" / "sweep")]
    cases = [
        (train.main, tiny_args(run_dir, folder, "--weight-decay", "inf"), r"--weight-decay must be 0 or a positive"),
        (train.main, tiny_args(run_dir, folder, "--seed", str(2 ** 64)), r"argument --seed: \d+ is out of range"),
        (train.main, tiny_args(run_dir, folder, "--steps", str(2 ** 63)), r"argument --steps: \d+ is out of range"),
        (train.main, tiny_args(run_dir, folder, "--channel-mult", "1", str(2 ** 40)), r"--channel-mult: \d+ is out"),
        (train.main, tiny_args(run_dir, folder, "--num-timesteps", str(10 ** 6)), r"--num-timesteps must be from 1 to"),
        (train.main, tiny_args(run_dir, folder, "--cache-dir", ""), r"--cache-dir is empty"),
        (train.main, tiny_args(run_dir, folder, "--base-channels", "8"), r"must be a multiple of 32"),  # refused under the lock
        (train.main, tiny_args("", folder), r"argument --run-dir: an empty path names no file or folder"),
        (sample.main, ["--ckpt", str(class_ckpt), "--dataset-out", " "], r"--dataset-out: an empty path"),
        (sample.main, ["--ckpt", str(class_ckpt), "--num", str(2 ** 63)], r"argument --num: \d+ is out of range"),
        (consistency.main, ["--judge", str(class_ckpt), "--ckpt", str(class_ckpt), "--seed", "-1"],
         r"argument --seed: a seed is 0 or positive, got -1"),
        (sweep.main, [*sweep_argv, "--steps", "10,,25"], r"--steps '10,,25' has an empty item"),
        (sweep.main, [*sweep_argv, "--seed", "-2"], r"argument --seed: a seed is 0 or positive"),
        (sweep.main, [*sweep_argv[:-1], ""], r"argument --out: an empty path"),
        # An empty name or spec would read as the option not given (plain sampling for --sweep '').
        (sample.main, ["--ckpt", str(class_ckpt), "--sweep", ""], r"argument --sweep: an empty value names nothing"),
        (sample.main, ["--ckpt", str(class_ckpt), "--class", " "], r"argument --class: an empty value"),
        (sweep.main, [*sweep_argv, "--classes", ""], r"argument --classes: an empty value"),
        (gradcam.main, ["--ckpt", str(class_ckpt), "--name", "", "--images", real], r"argument --name: an empty value"),
        (export.main, ["plumes", str(tmp_path / "new" / "set"), "--classes", ""], r"argument --classes: an empty"),
        (fid_cli.main, [real, real, "--features", ""], r"argument --features: an empty path"),
    ]
    for main, argv, message in cases:
        try:
            code = cli.run(main, argv)
        except SystemExit as exit_:  # a mistyped command line: argparse's exit, after its one line
            code = exit_.code
        assert code in (1, 2), argv
        error = capsys.readouterr().err
        assert re.search(message, the_error(error)), error
    assert not (tmp_path / "new").exists()  # not even the parent folders a refused run would have made


# ---------------------------------------------------------------------------------------------
# a kill between a checkpoint and the outputs due after it; a stop signal in the last step


TIMINGS = ("seconds", "images_per_s", "steps_per_s", "elapsed_s")


def comparable(run_dir: Path) -> list[dict]:
    """The run's metrics records without wall-clock fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMINGS)} for line in lines]


def killed_in(method: str, at_step: int):
    """A Trainer method that dies (as by kill -9: nothing after it runs) when called for step `at_step`."""
    from training.loop import Trainer
    original = getattr(Trainer, method)

    def dies(self, step, *args, **kwargs):
        if step == at_step:
            raise KeyboardInterrupt("killed")
        return original(self, step, *args, **kwargs)
    return dies


@pytest.mark.parametrize("stage, method", [("classify", "_evaluate"), ("ddpm", "_preview")])
def test_outputs_a_kill_left_out_after_their_checkpoint_are_written_on_resume_as_they_would_have_been(
        tmp_path, monkeypatch, stage, method):
    """Checkpoint first, then the step's evaluation and preview: a kill in between (at a middle step, and at the
    last, where a resubmitted run would otherwise say "nothing to train" for ever) is made good by --resume."""
    from helpers import colour_folder
    from training.loop import Trainer
    images = colour_folder(tmp_path / "images", per_class=4, seed=0)
    every = ["--steps", "4", "--sample-every", "2", "--ckpt-every", "2"]

    def args(run_dir: Path, *extra: str) -> list[str]:
        if stage == "ddpm":
            return tiny_args(run_dir, images, *every, *extra)
        return ["--stage", "classify", "--dataset", f"folder:{images}", "--target", "class", "--resolution", "16",
                "--batch-size", "4", "--warmup-steps", "0", "--log-every", "1", "--device", "cpu", "--run-dir",
                str(run_dir), *every, *extra]

    whole = tmp_path / "whole"
    train.main(args(whole))
    for at in (2, 4):
        run_dir = tmp_path / f"killed-at-{at}"
        with monkeypatch.context() as patch:
            patch.setattr(Trainer, method, killed_in(method, at))
            with pytest.raises(KeyboardInterrupt, match="killed"):
                train.main(args(run_dir))
        assert load_checkpoint(run_dir / "checkpoint.pt", stage)["step"] == at  # its checkpoint, not its outputs
        train.main(args(run_dir, "--resume"))
        assert comparable(run_dir) == comparable(whole)
        written = sorted(p.relative_to(whole) for p in whole.rglob("*.png"))
        assert written and sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.png")) == written
        assert all((run_dir / p).read_bytes() == (whole / p).read_bytes() for p in written)
        with monkeypatch.context() as patch:  # and now it is finished: nothing to do, not even a trainer to build
            patch.setattr("training.run.Trainer", None)
            assert train.main(args(run_dir, "--resume"))["step"] == 4


def test_a_stop_signal_in_the_last_step_ends_the_command_with_the_run_complete(tmp_path, trained, monkeypatch):
    """A signal in the last step (or its outputs) used to be dropped: the run finished and the command went on
    (the results table's next run, for instance). The run completes and saves; then the command stops."""
    from training.loop import Trainer
    _, images = trained
    original = Trainer._step

    def signalled(self, step, *args, **kwargs):
        if step == self.cfg.steps - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, *args, **kwargs)
    monkeypatch.setattr(Trainer, "_step", signalled)
    previous = signal.signal(signal.SIGTERM, cli.terminate_as_interrupt)  # as cli.main installs it
    try:
        with pytest.raises(cli.RunInterrupted, match="stopped by SIGTERM at the end of the run, which finished "
                                                     "step 2") as stopped:
            train.main(tiny_args(tmp_path / "run", images, "--sample-every", "2", steps=2))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt", "ddpm")["step"] == 2
    assert (tmp_path / "run" / "samples" / "final.png").is_file()
