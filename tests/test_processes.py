"""The suite's own runner in several processes (tests/processes.py), on planted test modules: every test is
reported once, by whichever process ran it, failures and a crashed worker fail the run, and -x stops it."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent

CONFTEST = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
import processes

def pytest_addoption(parser):
    processes.add_option(parser)

def pytest_configure(config):
    processes.configure(config)
"""

# Each test records which process ran it; a module's tests sleep so that the worker, which starts a second
# later than the main process, still finds modules to claim.
MODULE = """
import os, time, json
def record(name):
    assert "SYNTHDIFF_TEST_FOLDER" not in os.environ  # a pytest a test starts must not join this run
    with open({log!r}, "a") as log:
        log.write(json.dumps([name, os.environ.get("SYNTHDIFF_TEST_WORKER", "main")]) + "\\n")
def test_one():
    time.sleep(1)
    record("{k}.one")
def test_two():
    record("{k}.two")
    assert {k} != {failing}, "planted failure"
def test_three():
    record("{k}.three")
    if {crash} and os.environ.get("SYNTHDIFF_TEST_WORKER"):
        os._exit(3)
"""


def run_suite(tmp_path, *options, failing=-1, crash=False, modules=6):
    tmp_path.mkdir(exist_ok=True)
    log = tmp_path / "ran.jsonl"
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for k in range(modules):
        (tmp_path / f"test_m{k}.py").write_text(MODULE.format(log=str(log), k=k, failing=failing, crash=crash))
    # As if this test ran in a worker of the suite: its number is inherited, which the planted run must ignore.
    env = {**os.environ, "SYNTHDIFF_TEST_WORKER": "9"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *options],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    ran = [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []
    return done, ran


def test_every_test_runs_once_across_the_processes_and_is_reported_by_the_main_one(tmp_path):
    done, ran = run_suite(tmp_path, "--processes", "2", failing=4)
    names = sorted(name for name, _ in ran)
    assert names == sorted(f"{k}.{t}" for k in range(6) for t in ("one", "two", "three"))
    assert {process for _, process in ran} == {"main", "1"}  # both took modules
    by_module = {}
    for name, process in ran:
        by_module.setdefault(name.split(".")[0], set()).add(process)
    assert all(len(processes) == 1 for processes in by_module.values())  # a module stays in one process
    assert done.returncode == 1
    assert "1 failed, 17 passed" in done.stdout
    assert "FAILED test_m4.py::test_two - AssertionError: planted failure" in done.stdout
    assert done.stdout.count("PASSED test_m") == 17  # the worker's passes are the main process's report too


def test_a_worker_that_dies_fails_the_test_it_was_running_and_the_main_process_runs_the_rest(tmp_path):
    done, ran = run_suite(tmp_path, "--processes", "2", crash=True)  # the worker dies at its first test_three
    assert done.returncode == 1
    assert "1 failed, 17 passed" in done.stdout
    assert "::test_three - the worker process running this test stopped" in done.stdout
    assert "worker 1 (exit code 3)" in done.stdout
    assert len({name for name, _ in ran}) == 18  # the main process ran what the worker had claimed and left


def test_a_failure_with_x_stops_every_process(tmp_path):
    done, ran = run_suite(tmp_path, "--processes", "2", "-x", failing=0)
    assert done.returncode == 1
    assert "stopping after 1 failures" in done.stdout
    assert len(ran) < 18


def test_one_process_runs_the_suite_alone_and_a_bad_count_is_refused(tmp_path):
    done, ran = run_suite(tmp_path, "--processes", "1", modules=2)
    assert done.returncode == 0 and {process for _, process in ran} == {"main"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--processes", "two"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 4 and "--processes takes a whole number or 'auto', not 'two'" in done.stderr


def test_how_many_processes_a_run_gets():
    import processes

    def count(*args, processes_option="2", collectonly=False, usepdb=False, capture="fd"):
        config = SimpleNamespace(option=SimpleNamespace(collectonly=collectonly, usepdb=usepdb, capture=capture),
                                 args=list(args), getoption=lambda name: processes_option)
        return processes._process_count(config)
    module, other = str(HERE / "test_schedule.py"), str(HERE / "test_samplers.py")
    assert count(str(HERE)) == 2 and count(module, other) == 2 and count(f"{module}::test_x", other) == 2
    assert count(module) == 1 and count(f"{module}::test_x", f"{module}::test_y") == 1  # one module: one process
    assert count(str(HERE), collectonly=True) == 1 and count(str(HERE), usepdb=True) == 1
    assert count(str(HERE), capture="no") == 1
    assert 1 <= count(str(HERE), processes_option="auto") <= min(os.cpu_count() or 1, 4)
    with pytest.raises(pytest.UsageError, match="--processes must be at least 1, not 0"):
        count(module, processes_option="0")  # refused even where one process would run anyway


# Each test starts a command (a `sleep`, as a test starts train.py) and records its process and the command's,
# then waits: the run is stopped from outside while every process is inside such a test.
SLOW_MODULE = """
import json, os, subprocess, sys, time
def test_slow():
    command = subprocess.Popen(["sleep", "300"])
    with open({log!r}, "a") as log:
        log.write(json.dumps([os.environ.get("SYNTHDIFF_TEST_WORKER", "main"), os.getpid(), command.pid]) + "\\n")
    time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"  # a zombie is gone
    except (FileNotFoundError, IndexError):
        return False


@contextlib.contextmanager
def slow_suite(tmp_path):
    """A planted 2-process run, yielded once both processes are inside a test: (its main process, what each
    process logged, its temporary directory). Whatever is left of the run is killed afterwards."""
    log, temporary = tmp_path / "ran.jsonl", tmp_path / "tmp"
    temporary.mkdir()
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for k in range(3):
        (tmp_path / f"test_s{k}.py").write_text(SLOW_MODULE.format(log=str(log)))
    main = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--processes", "2"],
                            cwd=tmp_path, env={**os.environ, "TMPDIR": str(temporary)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = []
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) == 2):
            assert time.monotonic() < deadline and main.poll() is None, "the planted run did not start both processes"
            time.sleep(0.2)
        running = [json.loads(line) for line in log.read_text().splitlines()]
        yield main, running, temporary
    finally:
        for pid in [pid for _, process, command in running for pid in (process, command)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        if main.poll() is None:
            main.kill()
            main.communicate()


def gone_soon(pids, seconds=60) -> list[int]:
    """Which of `pids` are still running after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_the_main_process_stops_the_workers_and_their_commands_and_leaves_no_folder(tmp_path):
    with slow_suite(tmp_path) as (main, running, temporary):
        main.send_signal(signal.SIGTERM)
        out, _ = main.communicate(timeout=90)
        assert main.returncode == 2 and "KeyboardInterrupt" in out, out[-2000:]  # ended as Ctrl-C ends a run
        worker = [(pid, command) for process, pid, command in running if process == "1"]
        assert worker and not gone_soon(worker[0])  # the worker, and the command its test had started
        assert list(temporary.iterdir()) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_worker_dies_with_a_main_process_killed_outright(tmp_path):
    with slow_suite(tmp_path) as (main, running, _):
        main.kill()
        main.communicate(timeout=60)
        worker = [pid for process, pid, _ in running if process == "1"]
        assert worker and not gone_soon(worker)


def test_a_run_removes_the_folders_of_runs_killed_outright_and_only_those(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    from processes import FOLDER_PREFIX
    names = ("ended", "running", "starting", "stale")
    folders = {name: temporary / f"{FOLDER_PREFIX}{name}" for name in names}
    for folder in folders.values():
        (folder / "claims").mkdir(parents=True)
    (folders["ended"] / "main").write_text(str(ended.pid))        # its main process is gone
    (folders["running"] / "main").write_text(str(os.getpid()))    # alive: this test's process
    old = time.time() - 7200
    os.utime(folders["stale"], (old, old))                        # killed before it named its main process
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for k in range(2):
        (tmp_path / f"test_m{k}.py").write_text("def test_nothing():\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--processes", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TMPDIR": str(temporary)})
    assert done.returncode == 0, done.stdout[-2000:]
    assert sorted(p.name for p in temporary.iterdir()) == [folders["running"].name, folders["starting"].name]
