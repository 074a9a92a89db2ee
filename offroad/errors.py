"""How a stage process ends: the one error type it reports to the user, the wrapper that reports it, and
interrupts (Ctrl-C, SIGTERM) that stop it cleanly, worker processes included."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator

KEPT = "nothing half-written was kept and the earlier outputs are as they were"
PR_SET_PDEATHSIG = 1  # linux prctl option


class PipelineError(Exception):
    """A problem with the user's input (params, data, weights): message only, no traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: raised in the main thread, so `finally` blocks remove temporaries and stop pools."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def warn(message: str) -> None:
    """Input that is legal but most likely a mistake: one `warning:` line, and the run goes on."""
    print(f"warning: {message}", file=sys.stderr)


_pending: list[int] = []  # the signal that stopped the stage


def _interrupt(signum: int, frame) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not break the clean-up of the first
        signal.signal(s, signal.SIG_IGN)
    _pending.append(signum)
    raise Interrupted(signum)


def check_interrupt() -> None:
    """Raise the interrupt again if code that swallows exceptions (an at-fork hook, a __del__) caught it."""
    if _pending:
        raise Interrupted(_pending[0])


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` processes (None for one: work in this process) that end with the stage: after the work,
    or at once on an error or an interrupt (they hold nothing worth keeping)."""
    if workers <= 1:
        yield None
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:  # start the workers now, interrupts held back: Python's at-fork hooks would swallow them
        pool = ProcessPoolExecutor(workers, initializer=worker_init, initargs=(os.getpid(),))
        pool.submit(int).result()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        yield pool
    except BaseException:
        for process in list(pool._processes.values()):  # no public way to stop a running work item
            process.kill()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def run_cli(main: Callable[[], None], kept: str = KEPT, then: str = "`dvc repro` resumes") -> None:
    """Run a stage or command: a PipelineError or an OSError is one `error:` line and exit 1; SIGINT / SIGTERM
    one `interrupted` line saying what was `kept` and what to do `then`, and exit 130 / 143."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupt)
    try:
        main()
        return
    except PipelineError as e:
        line, code = f"error: {e}", 1
    except OSError as e:  # a read or write that the stage did not expect to fail (disk full, permissions)
        line, code = f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", 1
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        line, code = f"interrupted by {signal.Signals(signum).name}: {kept}; {then}", 128 + signum
    # exit with the exception and its frames released: a process pool they hold is then gone before the
    # interpreter's exit hooks (which would wake its dead manager thread and print an ignored error)
    gc.collect()
    print(line, file=sys.stderr)
    sys.exit(code)


def worker_init(stage: int) -> None:
    """Initializer of a stage's worker processes (`stage`: its pid). Ctrl-C and a SIGTERM to the process group
    reach the workers too, but only the stage handles them (it then shuts its pool down); a worker ends when
    the stage dies, even by SIGKILL."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    die_with_parent(stage)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process (SIGKILL) when its parent, pid `parent`, dies (Linux only); exit at
    once if it has died already."""
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
