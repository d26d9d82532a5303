"""Writing output files whole or not at all: under a temporary name, renamed when complete."""

import contextlib
import csv
import json
import os


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary path beside ``path`` (same suffix, for writers that check it), renamed to
    ``path`` when the block succeeds and removed when it fails."""
    stem, suffix = os.path.splitext(path)
    tmp = f"{stem}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def write_csv(path: str, header: list, rows):
    """A CSV of ``header`` then ``rows``, written whole or not at all."""
    with atomic_path(str(path)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
