"""How every entry point ends: an expected failure is one sentence on stderr and a non-zero exit; the
traceback is shown only with --debug (or SYNTHDIFF_DEBUG=1), or for any other error, which is a
bug worth a traceback.

Expected failures are a `core.errors.UserError` (a check refused an option, a file or the data), a
`RunError` (a run ended early: divergence), an interruption (Ctrl-C, SIGTERM: `RunInterrupted`; also one
that reached torch.compile's compiler first), a torch.compile cache damaged by an interrupted build, and
the machine's limits: out of GPU or CPU memory, disk full, a folder that cannot be written.

An entry point calls `catch_early_sigterm()` before its heavy imports and `main(entry)` at the
end, so a SIGTERM is answered with one line whenever it comes. This module imports neither torch nor
tqdm at the top, so that the first of those calls comes within milliseconds of start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import select
import signal
import sys
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from core.errors import UserError

DEBUG_ENV = "SYNTHDIFF_DEBUG"


class RunError(RuntimeError):
    """An expected way for a run to end early (divergence), reported as its message."""
    exit_code = 1
    every_process = True  # under torchrun all processes end so together (all-reduced means): rank 0 reports it


class RunInterrupted(KeyboardInterrupt):
    """Stopped by a signal; the message says what was saved and how to go on. Exit code 128 + signal.

    A KeyboardInterrupt, as Ctrl-C's own is, so that no `except Exception` guarding a file read, a
    decode or a download takes an interruption for a fault of what it was reading."""

    every_process = True  # under torchrun all processes stop after the same step: rank 0, which saves, reports it

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

    def told_from(self, where: str, advice: str) -> RunInterrupted:
        """The same stop told by the command the user typed, when it stopped in a run that command started
        (whose own advice would name a command the user never typed): `where` it stopped, and `advice`."""
        signum = self.exit_code - 128
        return RunInterrupted(f"stopped by {signal.Signals(signum).name} {where}; {advice}", signum)


# PyTorch's CPU allocator raises a RuntimeError with this text when malloc fails (numpy raises MemoryError).
CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"
# How PyTorch's collectives (gloo, NCCL) report a peer process that died mid-job.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
             "Broken pipe")


class ReportedByAnotherProcess(Exception):
    """This process of a torchrun job stops because another one failed, and that one reports why."""
    exit_code = 1


def launched_rank() -> int:
    """This process's rank in a torchrun job (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of processes of this torchrun job (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def explain(err: BaseException) -> tuple[str, int] | None:
    """(one-sentence message, exit code) for an expected failure, or None for one that is a bug."""
    if isinstance(err, (RunError, RunInterrupted, ReportedByAnotherProcess)):
        return str(err), err.exit_code
    if isinstance(err, UserError):
        return _original_message(str(err)), 1
    if isinstance(err, KeyboardInterrupt):
        return interrupted("interrupted (Ctrl-C)"), 128 + signal.SIGINT
    stopped = compiler_stopped(err)
    if stopped is not None:
        how = "interrupted (Ctrl-C)" if stopped == signal.SIGINT else f"stopped by {signal.Signals(stopped).name}"
        return interrupted(f"{how} while torch.compile was compiling"), 128 + stopped
    damaged = damaged_compile_cache(err)
    if damaged is not None:
        return (f"torch.compile's cache holds a damaged file, {damaged[0]} (from a compile that was stopped part "
                f"way); delete the folder {damaged[1]} (torch.compile builds it anew) and run again.", 1)
    torch = sys.modules.get("torch")  # not imported here (see the module docstring); loaded if it raised this
    if torch is not None and isinstance(err, torch.cuda.OutOfMemoryError):
        return "the GPU ran out of memory; lower --batch-size.", 1
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and CPU_OUT_OF_MEMORY in str(err)):
        asked = re.search(r"allocate (\d+) bytes", str(err))
        failed = f" (an allocation of {_size(int(asked[1]))} failed)" if asked else ""
        return (f"this machine ran out of memory{failed}; ask for less (a smaller --batch-size, image or network, or "
                f"fewer images) and run again; files written before are intact.", 1)
    if launched_world_size() > 1 and isinstance(err, RuntimeError) and any(
            sign in str(err) for sign in PEER_LOST):
        return ("another process of this torchrun job ended while this one waited for it (see the launcher's report "
                "for which, and why); the checkpoints written before are intact: resume the job with --resume (a job "
                "that wrote none yet starts over with the same command).", 1)
    # (A full disk inside torch.save surfaces as its zip writer's own error: atomic_write re-raises the OSError.)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" while writing {err.filename}" if err.filename else ""
        full, fix = (("file size limit reached", "raise the limit (ulimit -f)") if err.errno == errno.EFBIG
                     else ("disk full", "free some space"))
        return (f"{full}{where}: {fix} and run the same command again (with --resume for a training run that wrote "
                f"a checkpoint); files written before are intact.", 1)
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        name = str(err.filename or "")
        shown = f" ({name[:40]}...{name[-20:]})" if len(name) > 64 else f" ({name})" if name else ""
        return f"a path given{shown} is too long for the file system; choose a shorter one.", 1
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = f" {err.filename}" if err.filename else ""
        return f"cannot write{where} ({err.strerror}); choose a folder you can write to.", 1
    return None


def _causes(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and the errors it was raised from or wraps (torch.compile's wrappers keep theirs as
    `inner_exception`), innermost last."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__


COMPILER_ERRORS = ("torch._inductor", "torch._dynamo")  # the modules of torch.compile's own errors


def compiler_stopped(err: BaseException) -> int | None:
    """The stop signal (SIGINT, SIGTERM) that killed a compiler torch.compile ran, where that is why `err` was
    raised; else None. A Ctrl-C in a terminal, or a scheduler's SIGTERM, reaches the whole process group: the
    compiler (g++ for Inductor's CPU code) dies of it mid-build, and Inductor raises a CppCompileError with the
    compiler's command line and output (thousands of lines) before this process answers its own stop (a training
    loop answers one after its step)."""
    failed = getattr(sys.modules.get("subprocess"), "CalledProcessError", ())  # (not imported: no compiler ran)
    causes = list(_causes(err))
    if not any(type(cause).__module__.startswith(COMPILER_ERRORS) for cause in causes):
        return None  # another command's end, whatever stopped it
    for cause in causes:
        if isinstance(cause, failed):
            signum = -cause.returncode
            return signum if signum in (signal.SIGINT, signal.SIGTERM) else None
    return None


# How the dynamic loader refuses a shared library that was cut short or never written.
UNLOADABLE = re.compile(r"(/\S+\.so): (?:file too short|invalid ELF header)")


def damaged_compile_cache(err: BaseException) -> tuple[str, str] | None:
    """(the file, the cache folder) where `err` is torch.compile failing to load a library from Inductor's cache
    that is empty or cut short; else None. Inductor builds a library straight into its cache and, on a later run,
    uses any file of that name without a check: a build stopped by SIGTERM or SIGKILL (the linker killed mid-write)
    leaves an empty file there, and every compile that needs it fails from then on (measured: a SIGTERM to the
    process group during a link left a 0-byte .so)."""
    cache_dir_utils = sys.modules.get("torch._inductor.runtime.cache_dir_utils")  # loaded by any compile
    for cause in _causes(err):
        found = UNLOADABLE.search(str(cause)) if isinstance(cause, (ImportError, OSError)) else None
        if found is not None and cache_dir_utils is not None:
            cache = cache_dir_utils.cache_dir()
            if os.path.abspath(found[1]).startswith(os.path.join(cache, "")):
                return found[1], cache
    return None


def _size(nbytes: int) -> str:
    return f"{nbytes / 2 ** 30:.1f} GiB" if nbytes >= 2 ** 30 else f"{nbytes / 2 ** 20:.0f} MiB"


def interrupted(how: str) -> str:
    """The sentence for an interruption outside a training step, whatever it interrupted."""
    return (f"{how}; every file written before is intact: run the same command again to go on (a training run "
            f"with --resume, from its last checkpoint if it wrote one; a dataset where it stopped).")


def _original_message(message: str) -> str:
    """The user's message from an error re-raised by a DataLoader worker, without the worker's traceback."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


# No count, size or seed of this toolkit comes near it; larger numbers overflow C integers inside PyTorch and
# numpy (a traceback instead of a message) or ask for work that would never end.
INT_LIMIT = 2 ** 31


def int_option(text: str) -> int:
    """argparse type of a whole-number option: int(text), refused beyond +-INT_LIMIT."""
    value = int(text)  # argparse reports a ValueError as "invalid int value"
    if abs(value) >= INT_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a whole number below {INT_LIMIT:,}")
    return value


def seed_option(text: str) -> int:
    """argparse type of a --seed option: a whole number from 0 (numpy's generators take no negative seed)."""
    value = int_option(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is 0 or positive, got {text}")
    return value


def path_option(text: str) -> Path:
    """argparse type of a file or folder option: refuses an empty path, which would silently mean the current
    folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path names no file or folder; give one")
    return Path(text)


def text_option(text: str) -> str:
    """argparse type of an option naming something (a class, a parameter spec, a name): refuses an empty value,
    which would otherwise read as the option not given."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value names nothing; give one or drop the option")
    return text


# As argparse names them in "invalid ... value".
int_option.__name__, seed_option.__name__, path_option.__name__, text_option.__name__ = "int", "int", "path", "text"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a mistyped command line reported as one line like every other error."""

    def error(self, message: str):
        # Every process of a torchrun job parses the same command line and fails the same way: rank 0 says so.
        if launched_rank() == 0:
            print(f"error: {message}; see {self.prog} --help.", file=sys.stderr, flush=True)
        raise SystemExit(2)


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone, so that a BrokenPipeError is ours to end
    quietly; one from another pipe (a worker process, a socket) is a failure to report like any other."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # captured: not where the pipe broke
        return False
    if not hasattr(select, "poll"):  # pragma: no cover - not POSIX
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)`; return 0, or print an expected failure as one line and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except SystemExit:
        raise
    except BaseException as err:
        if isinstance(err, BrokenPipeError) and stdout_gone():
            # What reads our output has gone (`--help | head`): nothing more can be said there, and the flush at
            # exit must not fail again. The code a process killed by SIGPIPE gives, as other command-line tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 128 + signal.SIGPIPE
        explained = None if debug_requested(argv) else explain(err)
        if explained is None:
            raise
        message, code = explained
        if isinstance(err, ReportedByAnotherProcess) or (getattr(err, "every_process", False) and launched_rank()):
            return code  # one line for a torchrun job, not one per process
        # A progress bar cut short by the error has left the cursor at the end of its line.
        tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)  # not imported here: see the module docstring
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code
    signum = lost_stop()
    if signum is not None:  # the command finished its work while the stop was put off: it ends as stopped
        how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        if launched_rank() == 0:
            print(f"error: stopped by {how} as the command finished; what it was to write is written.",
                  file=sys.stderr, flush=True)
        return 128 + signum
    return 0


def terminate_as_interrupt(signum: int, frame: Any) -> None:
    """A SIGTERM outside a training loop: unwind like Ctrl-C (finally blocks run, locks are released)."""
    if not _deferred_from_finalizer(signum, frame):
        raise RunInterrupted(interrupted("stopped by SIGTERM"), signum)


def interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C outside a training loop: KeyboardInterrupt, as Python's own handler raises it."""
    if not _deferred_from_finalizer(signum, frame):
        raise KeyboardInterrupt


_deferred: list[int] = []  # stop signals that came inside a finalizer, sent again and not yet answered


def _deferred_from_finalizer(signum: int, frame: Any) -> bool:
    """Whether the signal `signum` came while a `__del__` or a `weakref.finalize` callback runs (`frame` or a caller
    of it), and was sent again to be answered once that has returned. Python prints an exception raised in either
    as "Exception ignored in" and goes on, so a stop raised there would be lost: the command would run on, or end
    with 0 as if never stopped (a results table would go on to its next run). Such a wait is longest where an
    object's end is slow: a DataLoader's, which stops its worker processes. Where the command ends before the
    signal comes again, `run` answers it (`lost_stop`). False, having done nothing, anywhere else."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code is weakref.finalize.__call__.__code__:
            _send_again(signum)
            return True
        frame = frame.f_back
    _deferred.clear()  # answered now
    return False


def _send_again(signum: int) -> None:
    """Put the stop signal `signum` off: sent again in 50 ms, to be answered where it can be raised."""
    _deferred.append(signum)
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def _stop_in_unraisable(unraisable: Any) -> None:
    """`sys.unraisablehook`: a stop raised where Python cannot raise it is put off (`_send_again`) instead of
    printed as "Exception ignored in" and lost. `_deferred_from_finalizer` sees a `__del__` and a
    `weakref.finalize` callback coming; a plain `weakref.ref` callback it cannot tell from the code that dropped
    the object, and torch.compile runs many of those (dynamo's weak-keyed caches, while it compiles)."""
    err = unraisable.exc_value
    if isinstance(err, KeyboardInterrupt):  # (raised by our handlers, which run in the main thread)
        _send_again(err.exit_code - 128 if isinstance(err, RunInterrupted) else signal.SIGINT)
        return
    sys.__unraisablehook__(unraisable)


def lost_stop() -> int | None:
    """A stop signal that came inside a finalizer and was not answered since (by the time the command ended, its
    work done; or by a training loop, which answers a stop after its step), if any; taken, so that it is answered
    once."""
    signum = _deferred[-1] if _deferred else None
    _deferred.clear()
    return signum


def _terminated_while_starting(signum: int, frame: Any) -> None:
    how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    if launched_rank() == 0:  # torchrun passes its stop to every worker: rank 0 says it for the job
        print(f"error: stopped by {how} while starting, before anything was written; run the same command again.",
              file=sys.stderr, flush=True)
    os._exit(128 + signum)  # from inside an import: nothing is open and nothing needs unwinding


def ignore_stop_signals(worker_id: int) -> None:
    """`worker_init_fn` of DataLoader workers: they leave SIGINT and SIGTERM to the main process, which stops
    them after saving what it must (a Ctrl-C in a terminal, or a scheduler's SIGTERM to the process group,
    reaches every process, and a worker killed by it would add a traceback of its own)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread while the body starts processes (a DataLoader's workers), which
    are born with this thread's signal mask and keep it: a stop for the job (a scheduler's SIGTERM, a Ctrl-C,
    which reach every process of the group) is left to this process, which saves after its step.

    `ignore_stop_signals` comes too late for that where the workers start anew rather than as forks of this
    process (the "spawn" and "forkserver" start methods, the latter Python 3.14's default on Linux): a worker,
    or the fork server that forks them (started with the first of them, and slow to start: it imports torch),
    killed while starting made the next batch fail with "DataLoader worker exited unexpectedly", a traceback,
    and nothing saved. This process still answers a signal that comes meanwhile (CPython runs its handlers in the
    main thread whichever thread received it). A no-op where signal masks are not available, or off the main
    thread."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def started_as(module: str) -> bool:
    """Whether this process is `python -m MODULE`. A package's __init__ runs before its command module
    (`python -m fid` imports fid/__init__.py, and torch with it, before fid/__main__.py), so such a package
    asks this to call `catch_early_sigterm` first."""
    args = getattr(sys, "orig_argv", [])[1:]
    i = 0
    while i < len(args):  # the interpreter's own options, up to -m, -c or a script (whose arguments follow)
        if args[i] == "-m":
            return i + 1 < len(args) and args[i + 1] == module
        if args[i] == "-c" or not args[i].startswith("-") or args[i] == "-":
            return False
        i += 2 if args[i] in ("-X", "-W") else 1  # the options that take their value as the next word
    return False


def catch_early_sigterm() -> None:
    """Until `main` installs its own handlers, answer SIGTERM and Ctrl-C with one line and exit 143 or 130
    (Python's defaults would end the process without a word, or with a KeyboardInterrupt traceback from
    deep inside the import of torch). A torchrun worker also dies with its launcher from here on (see
    `die_with_the_launcher`): killed while it starts, stopped by SIGTERM once it trains."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated_while_starting)
        signal.signal(signal.SIGINT, _terminated_while_starting)
    if launched_world_size() > 1:
        die_with_the_launcher(signal.SIGKILL)


_launcher: int | None = None  # the torchrun launcher's process id, as this worker first saw it


def die_with_the_launcher(signum: int) -> None:
    """Ask Linux to send this torchrun worker `signum` when its launcher dies (PR_SET_PDEATHSIG).

    A launcher killed with SIGKILL (`kill -9`, the OOM killer) cannot pass a stop on, and its workers, each
    in a session of its own, would run on as orphans: while starting, blocked for many minutes joining a
    process group that will never form (deaf to SIGTERM inside that call), later training on and holding the
    run's lock. So a worker asks for SIGKILL as soon as it starts (it has written nothing yet), and for SIGTERM
    once it has joined its group (`core.distributed.setup`): then the workers stop as after any SIGTERM,
    all together after the current step, which is checkpointed. The launcher is the parent this process
    first saw; if that is gone when the request takes hold, the signal is sent at once. Only under torchrun: a
    single process's parent is a shell, whose exit must not stop a `nohup` run. Elsewhere than Linux
    nothing is asked.
    """
    global _launcher
    if not sys.platform.startswith("linux"):
        return
    if _launcher is None:
        _launcher = os.getppid()
    try:
        import ctypes  # here: most commands never run under torchrun
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signum)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != _launcher:  # the launcher died before the request took hold (1 is no sign: in a
        # container torchrun itself may be process 1)
        os.kill(os.getpid(), signum)


def print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for a person at a terminal: "warning: ..." on one line, without the source
    location and line that Python's default adds (--debug keeps those).

    While a progress bar is on screen the line goes through tqdm, which clears the bar, prints the line and
    draws the bar again below it; a plain print would continue the bar's line. tqdm is asked only if it
    was imported already (no bar can be on screen otherwise), keeping this module free of it at start-up.
    """
    stream = sys.stderr if file is None else file
    text = f"warning: {message}"
    bars = sys.modules.get("tqdm.std")
    if bars is not None:
        bars.tqdm.write(text, file=stream)
    else:
        print(text, file=stream)
    stream.flush()


def main(entry: Callable[[list[str]], Any]) -> None:
    """How every command's `if __name__ == "__main__"` ends: SIGTERM unwinds like Ctrl-C, warnings are one
    line each, and the process exits with `run(entry)`'s code."""
    if not debug_requested(sys.argv[1:]):
        warnings.showwarning = print_warning
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate_as_interrupt)
        signal.signal(signal.SIGINT, interrupt)  # Ctrl-C: KeyboardInterrupt, as `run` expects
        sys.unraisablehook = _stop_in_unraisable
    code = run(entry)
    if threading.current_thread() is threading.main_thread():
        # Ended (done, or with what had to be saved saved and the line printed): a Ctrl-C or SIGTERM while Python
        # shuts down (joining DataLoader workers, atexit; torchrun's to the workers left after one failed) could
        # only add a traceback, or turn a finished command's 0 into 130 or 143, so it is ignored now.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
