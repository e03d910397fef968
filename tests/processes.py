"""The suite in several processes, so that `python -m pytest` uses every core of a small machine: each test
runs on one thread (conftest's `one_thread`), so a 2-core CPU would otherwise sit half idle. pytest-xdist
does the same, but the tests may need nothing beyond pytest.

The process that `python -m pytest` starts (the main one) starts `--processes` - 1 workers with its own
arguments. Every process collects the suite; the main one writes the ids it selected to a shared folder,
and each worker keeps exactly those, so a worker runs what the main process would have run. Then every
process claims whole test modules (a module's fixtures stay in one process) until none are left, the
slowest first so that no long module starts last; a claim is a file created exclusively in the shared
folder. A worker writes the start, reports and warnings of each of its tests as lines of JSON, and the
main process replays them into its own terminal as they come: its progress, failures, `--durations`,
`-x` and exit status count every test as if it had run them all. A test that a worker started but never
finished (the worker crashed or was killed) is reported failed, with the end of the worker's output; the
tests it had claimed and not started, the main process runs at the end. The commands the tests start
(train.py, torchrun) get one OpenMP thread each too (OMP_NUM_THREADS=1), as threads of several processes
spinning against each other on a small CPU cost far more than they gain.

`--processes 1` runs the suite in one process, as plain pytest does; so do `--pdb`, `--collect-only`, `-s`,
a run of one test module, and the workers themselves.

Stopping: SIGTERM to the main process (a CI job cancelled) ends the run as Ctrl-C does. Either way the main
process stops each worker with its process group (the commands its test started) and removes the shared
folder. A main process killed outright (`kill -9`) takes its workers with it on Linux: each asks to be sent
SIGTERM when it dies; its shared folder (a few KB) is left in the temporary directory until the next run
removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

# Set by the main process for each worker it starts. A worker takes the folder out of its environment, so that a
# test that runs pytest itself does not start a worker of this run; its tests see its number.
FOLDER_ENV = "SYNTHDIFF_TEST_FOLDER"  # the folder a worker shares with the main process
NUMBER_ENV = "SYNTHDIFF_TEST_WORKER"  # the worker's number, from 1; unset in the tests of a main process
FOLDER_PREFIX = "pytest-processes-"  # the shared folders, in the temporary directory

# Claimed first, in this order (30-135 s each, measured with --durations=0 in two processes on a 2-core AVX2
# CPU); the rest (under 20 s each) follow in collection order. A stale list costs time, never correctness.
SLOWEST_FIRST = ("test_sweep.py", "test_training.py", "test_kernels_group_norm.py", "test_reliability.py",
                 "test_classify.py", "test_latent.py", "test_fid.py", "test_speed.py", "test_bench.py",
                 "test_domain_fid.py", "test_startup_checks.py", "test_processes.py")


def add_option(parser) -> None:
    parser.addoption("--processes", default="auto", metavar="N",
                     help="run the tests in N processes, one test module at a time each (default auto: one per "
                          "core, at most 4; 1 runs them all in this process)")


def configure(config) -> None:
    """Registers a worker's plugin in a worker, the main process's where the run is split, nothing otherwise."""
    folder = os.environ.pop(FOLDER_ENV, None)
    if folder is not None:
        config.option.xmlpath = None  # the main process writes --junitxml, from every process's reports
        config.pluginmanager.register(Worker(config, Path(folder)), "suite-worker")
        return
    os.environ.pop(NUMBER_ENV, None)  # inherited from a worker whose test started this pytest
    count = _process_count(config)
    if count > 1:
        config.pluginmanager.register(Main(config, count), "suite-main")


def _process_count(config) -> int:
    value = config.getoption("processes")
    if value == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        count = min(cores, 4)
    else:
        try:
            count = int(value)
        except ValueError:
            raise pytest.UsageError(f"--processes takes a whole number or 'auto', not {value!r}") from None
        if count < 1:
            raise pytest.UsageError(f"--processes must be at least 1, not {count}")
    if config.option.collectonly or config.option.usepdb or config.option.capture == "no":
        return 1  # -s: a worker's prints would go to its log, not to this terminal
    named = {arg.split("::")[0] for arg in config.args}
    if len(named) < 2 and all(Path(name).is_file() for name in named):
        return 1  # one module runs in one process anyway
    return count


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def _order(modules: list[str]) -> list[str]:
    """The claiming order: the known slow modules first, then the rest as collected."""
    rank = {name: k for k, name in enumerate(SLOWEST_FIRST)}
    return sorted(modules, key=lambda m: rank.get(Path(m).name, len(rank)))


class _Claimer:
    """What the main process and the workers share: claiming modules, and running the claimed tests."""

    def __init__(self, config, folder: Path):
        self.config = config
        self.folder = folder
        self.modules: list[str] = []  # the claiming order, the same in every process

    def _claim(self, index: int) -> bool:
        try:
            os.close(os.open(self.folder / "claims" / str(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        return True

    def _claimed_items(self, session):
        by_module: dict[str, list] = {}
        for item in session.items:
            by_module.setdefault(_module(item.nodeid), []).append(item)
        for index, module in enumerate(self.modules):
            if self._stopped() or not self._claim(index):
                continue
            yield from by_module.get(module, [])

    def _stopped(self) -> bool:
        return (self.folder / "stop").exists()

    def run_claimed(self, session, after_each=lambda: None) -> None:
        """The claimed modules' tests; the next module is claimed at a module's last test."""
        self.run(session, self._claimed_items(session), after_each)

    @staticmethod
    def run(session, items, after_each=lambda: None) -> None:
        """pytest's own test loop over the iterator `items`: the next test is known before a test runs, so
        fixtures are torn down as pytest would."""
        item = next(items, None)
        while item is not None:
            nextitem = next(items, None)
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            after_each()
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
            item = nextitem


class Main(_Claimer):
    def __init__(self, config, count: int):
        _remove_abandoned_folders()
        super().__init__(config, Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX)))
        (self.folder / "claims").mkdir()
        self.count = count
        self.workers: list[_WorkerProcess] = []
        self.started: set[str] = set()
        self.finished: set[str] = set()
        self.on_sigterm = None  # the SIGTERM handler before ours, while ours is installed

    def pytest_sessionstart(self, session):
        os.environ["OMP_NUM_THREADS"] = "1"  # for the commands the tests start (see above)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # else pytest's own caller decides
            self.on_sigterm = signal.signal(signal.SIGTERM, _interrupt)
        args = list(self.config.invocation_params.args)
        env = {**os.environ, FOLDER_ENV: str(self.folder)}
        (self.folder / "main").write_text(str(os.getpid()))  # the workers stop once this process has gone
        for k in range(1, self.count):
            self.workers.append(_WorkerProcess(k, args, self.folder, env, self.config.invocation_params.dir))

    def pytest_collection_finish(self, session):
        self.modules = _order(list(dict.fromkeys(_module(item.nodeid) for item in session.items)))
        selected = {"modules": self.modules, "ids": [item.nodeid for item in session.items]}
        temporary = self.folder / "selected.json.tmp"
        temporary.write_text(json.dumps(selected))
        temporary.rename(self.folder / "selected.json")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            return None  # pytest's own loop stops the run with the collection errors
        try:
            self.run_claimed(session, after_each=self._replay)
            while any(worker.running() for worker in self.workers):
                self._replay()
                if session.shouldfail or session.shouldstop:
                    break
                time.sleep(0.2)
            self._replay()
            if not (session.shouldfail or session.shouldstop):
                self._report_unfinished(session)
                self._run_left_over(session)
            if session.shouldfail:
                raise session.Failed(session.shouldfail)
            if session.shouldstop:
                raise session.Interrupted(session.shouldstop)
        finally:
            (self.folder / "stop").touch()
        return True

    def pytest_runtest_logstart(self, nodeid, location):
        self.started.add(nodeid)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.finished.add(nodeid)

    def _replay(self) -> None:
        hook = self.config.hook
        for worker in self.workers:
            for event in worker.new_events():
                kind = event["event"]
                if kind == "start":
                    hook.pytest_runtest_logstart(nodeid=event["nodeid"], location=tuple(event["location"]))
                elif kind == "report":
                    report = hook.pytest_report_from_serializable(config=self.config, data=event["report"])
                    report.location = tuple(report.location)
                    hook.pytest_runtest_logreport(report=report)
                elif kind == "finish":
                    hook.pytest_runtest_logfinish(nodeid=event["nodeid"], location=tuple(event["location"]))
                elif kind == "warning":
                    category = type(event["category"], (Warning,), {})
                    message = warnings.WarningMessage(event["message"], category, event["filename"], event["lineno"])
                    hook.pytest_warning_recorded.call_historic(kwargs=dict(
                        warning_message=message, when=event["when"], nodeid=event["nodeid"], location=None))

    def _report_unfinished(self, session) -> None:
        """Each test that a worker started and never finished, as a failure that shows the workers' ends."""
        unfinished = [item for item in session.items if item.nodeid in self.started - self.finished]
        if not unfinished:
            return
        ends = "\n\n".join(worker.ending() for worker in self.workers)
        hook = self.config.hook
        for item in unfinished:
            hook.pytest_runtest_logreport(report=pytest.TestReport(
                item.nodeid, item.location, {}, "failed",
                f"the worker process running this test stopped before it finished\n\n{ends}", "call"))
            hook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def _run_left_over(self, session) -> None:
        """The tests a worker claimed and never started (it stopped first), run here."""
        self.run(session, iter([item for item in session.items if item.nodeid not in self.started]))

    def pytest_unconfigure(self, config):
        if self.on_sigterm is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        for worker in self.workers:
            worker.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.on_sigterm is not None:
            signal.signal(signal.SIGTERM, self.on_sigterm)


def _remove_abandoned_folders() -> None:
    """The shared folders of runs whose main process was killed outright (a few KB each): those whose main
    process has ended, and those that never named one (killed while starting) after an hour."""
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        try:
            owner = int((folder / "main").read_text())
        except FileNotFoundError:
            owner = None
        except (ValueError, OSError):  # being written now, or not ours to read
            continue
        try:
            if owner is not None:
                os.kill(owner, 0)
                continue  # running (or its process id was reused: then left for a later run)
            if time.time() - folder.stat().st_mtime < 3600:
                continue  # a run starting now
        except ProcessLookupError:
            pass
        except OSError:  # not ours to signal, or removed by another run meanwhile
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _interrupt(signum, frame):
    """SIGTERM as Ctrl-C: pytest then ends the session, reports what ran, and unconfigures (stopping workers)."""
    raise KeyboardInterrupt


class _WorkerProcess:
    """A worker as the main process sees it: its process, and the events it has written so far."""

    def __init__(self, number: int, args: list[str], folder: Path, env: dict, cwd):
        self.number = number
        self.events = folder / f"events-{number}.jsonl"
        self.output = folder / f"output-{number}.txt"
        self.events.touch()
        self.offset = 0
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pytest", *args, "-o", f"cache_dir={folder / f'cache-{number}'}"],
                env={**env, NUMBER_ENV: str(number)}, cwd=cwd, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)  # a group of its own: `stop` reaches the commands its tests started

    def running(self) -> bool:
        return self.process.poll() is None

    def new_events(self) -> list[dict]:
        with open(self.events, "rb") as stream:
            stream.seek(self.offset)
            data = stream.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines()]

    def ending(self) -> str:
        self.stop()
        text = self.output.read_text(errors="replace")[-3000:]
        return f"worker {self.number} (exit code {self.process.returncode}), the end of its output:\n{text}"

    def stop(self) -> None:
        """SIGTERM to the worker's process group, SIGKILL to what is left of it after 30 s."""
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._signal_group(signal.SIGKILL)  # commands a test started, if they outlive the worker

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class Worker(_Claimer):
    def __init__(self, config, folder: Path):
        super().__init__(config, folder)
        self.parent = int((folder / "main").read_text())
        _die_with_parent()  # then a parent that died before is seen by `_stopped`
        self.events = open(folder / f"events-{os.environ[NUMBER_ENV]}.jsonl", "a")

    def _stopped(self) -> bool:
        return super()._stopped() or os.getppid() != self.parent

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        """Keeps exactly the tests the main process selected (options like --lf read its cache, not ours)."""
        selected = self.folder / "selected.json"
        while not selected.exists():
            if self._stopped():
                pytest.exit("the main test process has stopped", returncode=0)
            time.sleep(0.1)
        chosen = json.loads(selected.read_text())
        self.modules = chosen["modules"]
        ids = set(chosen["ids"])
        items[:] = [item for item in items if item.nodeid in ids]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        self.run_claimed(session)
        return True

    def _write(self, **event) -> None:
        self.events.write(json.dumps(event) + "\n")
        self.events.flush()

    def pytest_runtest_logstart(self, nodeid, location):
        self._write(event="start", nodeid=nodeid, location=location)

    def pytest_runtest_logreport(self, report):
        self._write(event="report", report=self.config.hook.pytest_report_to_serializable(config=self.config,
                                                                                          report=report))

    def pytest_runtest_logfinish(self, nodeid, location):
        self._write(event="finish", nodeid=nodeid, location=location)

    def pytest_warning_recorded(self, warning_message, when, nodeid, location):
        if when != "runtest":
            return  # the main process shows its own collection's warnings
        self._write(event="warning", message=str(warning_message.message),
                    category=warning_message.category.__name__, filename=str(warning_message.filename),
                    lineno=warning_message.lineno, when=when, nodeid=nodeid)


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the main process dies, even by SIGKILL (PR_SET_PDEATHSIG); elsewhere a worker
    notices only between modules. (`core.cli.die_with_the_launcher` asks the same for torchrun's workers; this
    module imports nothing of the project, as the suites test_processes.py plants run without it.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
