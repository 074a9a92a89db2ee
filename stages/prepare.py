"""Stage `prepare`: decode, map and resize the train, val and test PNGs into memory-mappable arrays."""
from __future__ import annotations

import time

from offroad.artifacts import PREPARED, SPLITS
from offroad.atomic import check_writable, together
from offroad.config import load_params
from offroad.data import list_splits, prepare_split, split_folders
from offroad.errors import run_cli


def main() -> None:
    params = load_params()
    check_writable(*(PREPARED / split for split in SPLITS))
    folders = split_folders(params.data)
    pairs = list_splits(folders)
    with together():  # the three splits are replaced as one set, once all are prepared
        for split in SPLITS:
            start = time.perf_counter()
            count = prepare_split(params.data.root, split, PREPARED, params.data, params.prepare.workers, pairs[split])
            seconds = time.perf_counter() - start
            print(f"prepare: {split}: {count} images at {list(params.data.image_size)} "
                  f"({seconds:.1f} s, {count / seconds:.1f} images/s)")
    print(f"prepare: wrote {', '.join(str(PREPARED / split) for split in SPLITS)}")


if __name__ == "__main__":
    run_cli(main)
