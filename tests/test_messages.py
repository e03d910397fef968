"""Advice that can be followed, and interruptions that read as interruptions.

Every option an error message suggests is an option of a command that reaches the code raising it
(and code only train.py's runs reach names only train.py's options). Ctrl-C or SIGTERM is reported as
an interruption whatever it interrupts: the decoding of an image, the zip writer of a checkpoint, or
the import of torch in the first second of a command.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import cli
from core.checkpoint import save_checkpoint
from core.runtime import atomic_write

ROOT = Path(__file__).resolve().parents[1]
OPTION = re.compile(r"--[a-z][a-z0-9-]+")
NOT_PROJECT = {"tests", "examples", ".git", ".ci"}
# Every command, as a message names it, with the module that runs it.
COMMANDS = {"train.py": "train", "sample.py": "sample", "python -m evaluate.experiment": "evaluate.experiment",
            "python -m evaluate.gradcam": "evaluate.gradcam", "python -m evaluate.consistency": "evaluate.consistency",
            "python -m evaluate.sweep": "evaluate.sweep", "python -m fid": "fid.__main__",
            "python -m data.export": "data.export", "python -m bench": "bench.__main__"}
# Commands whose code paths are train.py's: the experiment and the sweep train their rows with train.py's options.
TRAINING = {"train.py", "python -m evaluate.experiment", "python -m evaluate.sweep"}


# ---------------------------------------------------------------------------------------------
# the source: modules, what they import, what their errors say


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {_module(p): p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in NOT_PROJECT}


def imported_by(name: str) -> set[str]:
    """The project modules `name` imports anywhere (at the top or in a function), packages included."""
    path, known = modules()[name], modules()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for full in names:
            parts = full.split(".")
            found |= {".".join(parts[:k]) for k in range(1, len(parts) + 1)} & known.keys()
    return found


@cache
def reached_from(command: str) -> frozenset[str]:
    seen, todo = set(), [COMMANDS[command]]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported_by(name)
    return frozenset(seen)


def user_errors() -> set[str]:
    """The names of the error classes printed as one line (core.errors' and core.cli's, and subclasses)."""
    names = {"UserError", "MissingFileError", "ExistsError", "RunError", "RunInterrupted"}
    classes = [node for path in modules().values() for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ClassDef)]
    while True:
        more = {c.name for c in classes
                if {getattr(b, "id", getattr(b, "attr", None)) for b in c.bases} & names} - names
        if not more:
            return names
        names |= more


def messages(path: Path, errors: set[str]) -> list[tuple[int, str]]:
    """(line, the literal text) of each one-line error `path` raises, and of each `require(ok, message)`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        message = None
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            called = node.exc.func
            if getattr(called, "id", getattr(called, "attr", None)) in errors:
                message = node.exc.args[0]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and len(node.args) == 2:
            message = node.args[1]
        if message is not None:
            text = "".join(n.value for n in ast.walk(message) if isinstance(n, ast.Constant) and isinstance(n.value, str))
            found.append((node.lineno, text))
    return sorted(found)


@cache
def options(command: str) -> frozenset[str]:
    """Every option `command` lists in its --help (train.py: every stage's)."""
    module = importlib.import_module(COMMANDS[command])
    if command == "train.py":
        return frozenset(OPTION.findall(module.full_help()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return frozenset(OPTION.findall(out.getvalue()))


def test_every_option_an_error_suggests_belongs_to_a_command_that_can_raise_it():
    errors, wrong = user_errors(), []
    for name, path in sorted(modules().items()):
        commands = [c for c in COMMANDS if name in reached_from(c)]
        if set(commands) <= TRAINING and "train.py" in commands and name not in {COMMANDS[c] for c in TRAINING}:
            commands = ["train.py"]  # run only by training: the options of train.py alone
        allowed = set().union(*(options(c) for c in commands or COMMANDS))
        for line, text in messages(path, errors):
            told = allowed.union(*(options(c) for c in COMMANDS if c in text))  # "... (python -m fid --x)"
            for option in sorted(set(OPTION.findall(text)) - told):
                wrong.append(f"{path.relative_to(ROOT)}:{line} names {option}, which {' / '.join(commands)} lacks")
    assert not wrong, "\n".join(wrong)


def test_the_scan_sees_the_messages_it_checks(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('def f(x):\n    raise UserError(f"{x} is wrong; pass --bogus-option {x} instead.")\n'
                       'require(x > 0, "--other must be positive.")\n')
    assert messages(planted, user_errors()) == [(2, " is wrong; pass --bogus-option  instead."),
                                                (3, "--other must be positive.")]
    assert {c for c in COMMANDS if "training.run" in reached_from(c)} == TRAINING
    assert "core.checkpoint" in reached_from("sample.py") and "core.checkpoint" in reached_from("train.py")
    assert "fid.stats" in reached_from("python -m fid")  # through the package's relative imports
    found = dict(messages(modules()["core.runtime"], user_errors()))
    assert any(text.startswith("Unknown --device") for text in found.values())
    assert {"--resume", "--vae-ckpt", "--stage"} <= options("train.py") and "--ckpt" not in options("train.py")
    assert "--judge" in options("python -m evaluate.consistency") and "--judge" not in options("sample.py")


# ---------------------------------------------------------------------------------------------
# interruptions are interruptions


def test_an_interruption_while_an_image_is_decoded_is_not_blamed_on_the_image(tmp_path, monkeypatch):
    from data.folder import load_folder
    for k in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{k}.png")
    opened = Image.open

    def a_sigterm_arrives(path, *args, **kwargs):
        if str(path).endswith("1.png"):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next line of Python
        return opened(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", a_sigterm_arrives)
    previous = signal.signal(signal.SIGTERM, cli.terminate_as_interrupt)  # as cli.main installs it
    try:
        with pytest.raises(cli.RunInterrupted) as caught:
            load_folder(tmp_path, 8)
    finally:
        signal.signal(signal.SIGTERM, previous)
    message, code = cli.explain(caught.value)
    assert code == 128 + signal.SIGTERM and message.startswith("stopped by SIGTERM; every file written before is intact")
    assert "1.png" not in message and "checkpoint written" not in message  # no image, no checkpoint blamed


def test_every_except_exception_lets_an_interruption_pass():
    """Ctrl-C and stop signals are KeyboardInterrupts: the `except Exception` blocks that turn a library's
    many errors into "this file is damaged" (images, CIFAR batches, weight files) cannot catch them."""
    assert issubclass(cli.RunInterrupted, KeyboardInterrupt) and not issubclass(cli.RunInterrupted, Exception)
    from data.imageio import load_image

    def stopped(*args, **kwargs):
        raise cli.RunInterrupted("stopped", signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(cli.RunInterrupted):
        patch.setattr(Image, "open", stopped)
        load_image("any.png")


def _interrupted_writer(after: int):
    """A torch.save whose file raises KeyboardInterrupt (a second Ctrl-C) in its `after`-th write."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls = {"n": 0}
        write = f.write

        class Interrupted:
            def __getattr__(self, name):
                return getattr(f, name)

            def write(self, data):
                calls["n"] += 1
                if calls["n"] == after:
                    raise KeyboardInterrupt
                return write(data)

        return real_save(obj, Interrupted(), *args, **kwargs)
    return save


def test_a_second_ctrl_c_inside_a_checkpoint_save_is_an_interruption_and_keeps_the_previous_one(tmp_path,
                                                                                                monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"stage": "toy", "step": 1, "models": {"model": {"w": torch.ones(500)}}}, path)
    good = path.read_bytes()
    monkeypatch.setattr(torch, "save", _interrupted_writer(after=3))
    with pytest.raises(KeyboardInterrupt) as caught:  # not the zip writer's RuntimeError("unexpected pos ...")
        save_checkpoint({"stage": "toy", "step": 2, "models": {"model": {"w": torch.zeros(500)}}}, path)
    assert type(caught.value) is KeyboardInterrupt
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    message, code = cli.explain(caught.value)
    assert message.startswith("interrupted (Ctrl-C); every file written before is intact") and code == 130


def test_an_error_while_an_interruption_is_being_handled_stays_that_error(tmp_path):
    def disk_full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:  # e.g. a caller saving what it can on Ctrl-C
            atomic_write(tmp_path / "f", disk_full)


@pytest.mark.parametrize("debug", [False, True])
def test_a_warning_is_one_line_without_its_source_location_unless_debugging(capsys, monkeypatch, recwarn, debug):
    import warnings
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored afterwards
    monkeypatch.setattr(sys, "argv", ["train.py"] + (["--debug"] if debug else []))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # cli.main sets both

    python_default, installed = warnings.showwarning, []

    def entry(argv):
        installed.append(warnings.showwarning)
        warnings.warn("metrics.jsonl line 3 is torn; dropping it.")

    try:
        with warnings.catch_warnings(), pytest.raises(SystemExit) as ended:
            warnings.simplefilter("always")
            cli.main(entry)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert ended.value.code == 0
    if debug:  # Python's own (here pytest's, which records the warning instead of printing it)
        assert installed == [python_default] and "warning: " not in err
        assert [str(w.message) for w in recwarn] == ["metrics.jsonl line 3 is torn; dropping it."]
    else:
        assert err == "warning: metrics.jsonl line 3 is torn; dropping it.\n"



def test_a_warning_during_a_progress_bar_gets_a_line_of_its_own(capsys):
    """The bar is cleared before the line and drawn again after it; a plain print would have continued
    the bar's line ("  0%|          | 0/10 [00:00<?, ?it/s]warning: ...")."""
    from tqdm import tqdm
    with tqdm(total=10, file=sys.stderr, desc="sampling", mininterval=0) as bar:
        bar.update(3)
        cli.print_warning("guidance 1e3 is far above the usual 1-10.", UserWarning, "x.py", 1)
        bar.update(1)
    err = re.sub(r"\x1b\[\d*[A-Z]", "", capsys.readouterr().err)  # (cursor moves: bars other tests left open)
    before, found, after = err.partition("warning: guidance 1e3 is far above the usual 1-10.\n")
    assert found and "sampling:  40%" in after
    assert before.rsplit("\r", 1)[-1] == ""  # the line starts at column 0, where the cleared bar was
    assert "sampling:  30%" in after.partition("sampling:  40%")[0]  # and the bar is drawn again below it

def test_running_out_of_cpu_memory_is_one_sentence_that_names_the_batch_size():
    """Real allocation failures (an exabyte: refused at once), from PyTorch's allocator and from numpy."""
    with pytest.raises(RuntimeError) as from_torch:
        torch.empty(2 ** 60, dtype=torch.uint8)
    with pytest.raises(MemoryError) as from_numpy:
        np.empty(2 ** 60, dtype=np.uint8)
    message, code = cli.explain(from_torch.value)
    assert code == 1 and "ran out of memory (an allocation of 1073741824.0 GiB failed)" in message
    assert "a smaller --batch-size" in message and "\n" not in message
    message, code = cli.explain(from_numpy.value)
    assert code == 1 and message.startswith("this machine ran out of memory; ask for less (a smaller --batch-size")
    small = RuntimeError(f"{cli.CPU_OUT_OF_MEMORY}: you tried to allocate 25165824 bytes. Error code 12")
    assert "(an allocation of 24 MiB failed)" in cli.explain(small)[0]
    assert cli.explain(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug keeps its traceback


def test_a_stop_signal_while_a_sample_is_saved_does_not_speak_of_checkpoints():
    with pytest.raises(cli.RunInterrupted) as caught:
        cli.terminate_as_interrupt(signal.SIGTERM, None)
    message, code = cli.explain(caught.value)
    assert "every file written before is intact" in message and "every checkpoint" not in message and code == 143


# ---------------------------------------------------------------------------------------------
# a SIGTERM in the first second


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_module_every_command_starts_with_imports_neither_torch_nor_tqdm():
    done = _python("import sys, core.cli; print(sorted({'torch', 'tqdm', 'numpy'} & set(sys.modules)))")
    assert done.communicate(timeout=60)[0].strip() == "[]"


@pytest.mark.parametrize("rank", ["0", "1"])
@pytest.mark.parametrize("signum, how", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_a_sigterm_or_ctrl_c_while_a_command_is_still_importing_is_one_line(signum, how, rank):
    # As a torchrun worker of rank RANK (not one that must die with its launcher: that is tested elsewhere):
    # torchrun passes a stop to every worker, and rank 0 alone says it for the job.
    process = _python(f"import os\nos.environ['RANK'] = '{rank}'\nfrom core import cli\ncli.catch_early_sigterm()\n"
                      "print('importing', flush=True)\nimport time\ntime.sleep(60)  # an import of torch, slowed down")
    assert process.stdout.readline().strip() == "importing"
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    told = [f"error: stopped by {how} while starting, before anything was written; run the same command again."]
    assert process.returncode == 128 + signum and err.strip().splitlines() == (told if rank == "0" else [])


def test_help_read_by_a_command_that_stops_early_ends_quietly():
    """`python train.py --help | head -1`: the pipe closes before the help is written; no traceback."""
    process = subprocess.Popen([sys.executable, "-c", "from core import cli\n"
                                "def main(argv):\n    for _ in range(10000): print('line of help')\n"
                                "cli.main(main)"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "line of help\n"
    process.stdout.close()  # as `head -1` does
    assert process.wait(timeout=60) == 128 + signal.SIGPIPE
    with process.stderr:
        assert process.stderr.read() == ""


def test_a_broken_pipe_other_than_stdout_is_reported_not_ended_quietly():
    """A pipe to a worker process breaking is a failure: its traceback is shown, not exit code 141 in silence."""
    process = subprocess.run([sys.executable, "-c", "import os\nfrom core import cli\n"
                              "def main(argv):\n    r, w = os.pipe()\n    os.close(r)\n    os.write(w, b'x')\n"
                              "cli.main(main)"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert process.returncode == 1 and "BrokenPipeError" in process.stderr


@pytest.mark.parametrize("argv, started", [
    (["python", "-m", "fid", "a", "b"], True), (["python", "-X", "importtime", "-W", "error", "-m", "fid"], True),
    (["python", "script.py", "-m", "fid"], False), (["python", "-c", "import fid", "-m", "fid"], False),
    (["python", "-m", "fid.folder"], False), (["python", "-m"], False), (["python"], False)])
def test_started_as_reads_the_interpreters_own_m_option_only(monkeypatch, argv, started):
    monkeypatch.setattr(sys, "orig_argv", argv)
    assert cli.started_as("fid") == started


@pytest.mark.parametrize("module, package", [("data.export", "data"), ("fid", "fid")])
def test_python_m_of_a_package_that_imports_torch_catches_a_stop_before_torch(module, package):
    # `python -m fid` imports fid/__init__.py (and torch) before fid/__main__.py can say how to stop.
    process = _python(f"""import builtins, signal, sys
sys.orig_argv = [sys.executable, "-m", "{module}"]
real_import, seen = builtins.__import__, []
def spy(name, *args, **kwargs):
    if name == "torch" and not seen:
        seen.append(getattr(signal.getsignal(signal.SIGTERM), "__name__", "default"))
    return real_import(name, *args, **kwargs)
builtins.__import__ = spy
import {package}
print(seen)""")
    out, err = process.communicate(timeout=120)
    assert out.strip() == "['_terminated_while_starting']", err


def test_a_torchrun_job_says_a_shared_ending_once(monkeypatch, capsys):
    """A stop or divergence every process of a torchrun job reaches together is told by rank 0 alone; an
    error of one process alone is told by it; a process stopping for another's failure says nothing."""
    from training.loop import TrainingDiverged

    def raising(err):
        def entry(argv):
            raise err
        return entry
    shared = [(cli.RunInterrupted("stopped by SIGTERM at step 7 of 9 and saved ckpt", signal.SIGTERM), 143),
              (TrainingDiverged("the loss became nan by step 7"), 1)]
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        for err, code in shared:
            assert cli.run(raising(err), []) == code
            assert capsys.readouterr().err.count("error: ") == (1 if rank == "0" else 0)
        assert cli.run(raising(cli.UserError("image 3 is corrupt; replace it.")), []) == 1
        assert capsys.readouterr().err.count("error: ") == 1
        assert cli.run(raising(cli.ReportedByAnotherProcess("rank 0 failed")), []) == 1
        assert capsys.readouterr().err == ""


def test_a_peer_that_died_mid_job_is_one_line_in_a_torchrun_worker(monkeypatch):
    lost = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:40123")
    assert cli.explain(lost) is None  # alone, a bug worth its traceback
    monkeypatch.setenv("WORLD_SIZE", "2")
    message, code = cli.explain(lost)
    assert code == 1 and message.startswith("another process of this torchrun job ended") and "--resume" in message


@pytest.mark.parametrize("world_size, stops_at_once", [("1", True), ("2", False)])
def test_a_second_ctrl_c_stops_at_once_except_in_a_torchrun_worker(world_size, stops_at_once, monkeypatch):
    from training.loop import stop_requests
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with stop_requests() as received:
        os.kill(os.getpid(), signal.SIGINT)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # a scheduler's copy, and the launcher's
            stopped = False
        except KeyboardInterrupt:
            stopped = True
    assert stopped == stops_at_once and received[0] == signal.SIGINT


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_while_a_finished_command_exits_keeps_its_success(signum):
    process = _python("import atexit, os, signal, time\nfrom core import cli\n"
                      f"atexit.register(lambda: (os.kill(os.getpid(), {int(signum)}), time.sleep(0.5), print('exited')))\n"
                      "cli.main(lambda argv: None)")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and out.strip() == "exited" and err == ""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_stop_signal_while_a_stopped_command_exits_adds_nothing(signum):
    """After the one line of a stopped command, Python still shuts down (DataLoader workers, atexit); a
    second Ctrl-C or SIGTERM landing then (sent here from an atexit hook) changes neither the line nor the code."""
    process = _python("import atexit, os, signal, time\nfrom core import cli\n"
                      f"atexit.register(lambda: (os.kill(os.getpid(), {int(signum)}), time.sleep(0.5), print('exited')))\n"
                      "def stopped(argv):\n    raise KeyboardInterrupt\n"
                      "cli.main(stopped)")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and out.strip() == "exited"
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate/consistency.py", "evaluate/gradcam.py"])
def test_the_entry_points_answer_sigterm_before_their_heavy_imports(script):
    tree = ast.parse((ROOT / script).read_text())
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    first_imports = [ast.unparse(node) for node in body[:2]]
    assert first_imports == ["from __future__ import annotations", "from core import cli"]
    guard = body[2]
    assert isinstance(guard, ast.If) and "__main__" in ast.unparse(guard.test)
    assert ast.unparse(guard.body[0]) == "cli.catch_early_sigterm()"


def test_a_sigterm_in_the_first_moments_of_train_py_is_one_line_and_exit_143(tmp_path):
    """Whenever it lands (importing torch, parsing, loading data, training), one line and exit 143."""
    for k in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * k, np.uint8)).save(tmp_path / f"{k}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--run-dir", str(tmp_path / "run"),
                                "--dataset", f"folder:{tmp_path}", "--resolution", "16", "--device", "cpu",
                                "--steps", "100000"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # the imports alone take seconds
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("error:")]
    assert process.returncode == 143 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "SIGTERM" in lines[0]
