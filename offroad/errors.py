"""The one error type a stage reports to the user, and the wrapper that reports it."""
from __future__ import annotations

import sys
from typing import Callable


class PipelineError(Exception):
    """A problem with the user's input (params, data, weights): message only, no traceback."""


def run_cli(main: Callable[[], None]) -> None:
    try:
        main()
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
