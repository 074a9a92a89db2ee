"""Progress of a long loop: tqdm's bar on a terminal; without one (a log file, `dvc queue`), a line every 10 %."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], total: int, desc: str, unit: str = "img") -> Iterator[T]:
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr)
        return
    step, start = max(1, -(-total // 10)), time.perf_counter()
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0 or done == total:
            seconds = time.perf_counter() - start
            left = seconds / done * (total - done)
            print(f"{desc}: {done}/{total} {unit} ({100 * done // max(total, 1)} %), {seconds:.0f} s, "
                  f"{left:.0f} s left", file=sys.stderr, flush=True)
