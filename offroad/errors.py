"""How a stage process ends: the one error type it reports to the user, the wrapper that reports it, and
interrupts (Ctrl-C, SIGTERM) that stop it cleanly, worker processes included."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Callable

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


def _interrupt(signum: int, frame) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not break the clean-up of the first
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def run_cli(main: Callable[[], None], kept: str = KEPT) -> None:
    """Run a stage: a PipelineError or an OSError is one `error:` line and exit 1; SIGINT / SIGTERM one
    `interrupted` line saying what was `kept`, and exit 130 / 143."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _interrupt)
    try:
        main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a read or write that the stage did not expect to fail (disk full, permissions)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"interrupted by {signal.Signals(signum).name}: {kept}; `dvc repro` resumes", file=sys.stderr)
        sys.exit(128 + signum)


def worker_init() -> None:
    """Initializer of a stage's worker processes. Ctrl-C and a SIGTERM to the process group reach the workers
    too, but only the stage handles them (it then shuts its pool down); a worker ends when the stage dies,
    even by SIGKILL."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the stage died before prctl took effect
            os._exit(1)
