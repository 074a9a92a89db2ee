"""How a stage process ends: the one error type it reports to the user, the wrapper that reports it, and
interrupts (Ctrl-C, SIGTERM) that stop it cleanly, worker processes included."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import yaml

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
    if not inspect.signature(main).parameters:  # a stage: params.yaml is its only input
        stage_arguments(sys.argv[1:])
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


def stage_arguments(args: list[str]) -> None:
    """A stage takes no arguments: --help prints what it does, reads and writes (from dvc.yaml); anything
    else is an error that says where its configuration is."""
    module = getattr(sys.modules["__main__"].__spec__, "name", "stages.?")
    name = module.rpartition(".")[2]
    if args in (["-h"], ["--help"]):
        print(f"usage: python -m {module}   (or: dvc repro {name})\n\n{(sys.modules['__main__'].__doc__ or '').strip()}"
              f"\n\nIt takes no arguments: its configuration is params.yaml (for one experiment: "
              f"dvc exp run -S key=value).{_stage_spec(name)}")
        sys.exit(0)
    if args:
        print(f"error: {module} takes no arguments (got {' '.join(args)}); its configuration is params.yaml: "
              f"edit it, or `dvc exp run -S key=value`; --help says what it reads", file=sys.stderr)
        sys.exit(2)


def _stage_spec(name: str) -> str:
    try:
        stage = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][name]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return ""

    def names(key: str, keep: Callable[[str], bool] = lambda _: True) -> str:
        listed = (next(iter(e)) if isinstance(e, dict) else str(e) for e in stage.get(key) or [])
        return ", ".join(n for n in listed if keep(n))
    return (f"\n\nFrom dvc.yaml (its code deps are the modules it imports):\n  params: {names('params')}\n"
            f"  reads: {names('deps', lambda n: not n.endswith('.py'))}\n  writes: {names('outs')}")


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
