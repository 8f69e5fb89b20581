"""Check the published set of an output folder without Spark (delta-rs / pyarrow).

    python jobs/check_published_set.py /data/semids

The last ``published`` entry of the ``runs`` table names the set; the tables read at those versions
must be one run's: its rejects, and prefix and level statistics that count exactly the active IDs of
``semantic_ids``. Tables whose latest version is not the published one (a stopped run's) and a report of
another run are reported as notes; the next run of the job puts them right.

Exit codes: 0 the published set is consistent, 1 it is not (the problems are listed), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.publish import check_files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="check_published_set", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="the job's --output folder (holds semantic_ids, rejects, ..., runs)")
    a = p.parse_args(argv)
    if "://" not in a.output and not Path(a.output).is_dir():  # a local path: object stores are delta-rs's to read
        what = "is a file" if Path(a.output).exists() else "does not exist"
        print(f"check_published_set: error: {a.output} {what}: give the job's --output folder", file=sys.stderr)
        return 2
    problems, notes = check_files(a.output)
    for line in problems:
        print(f"FAIL  {line}")
    for line in notes:
        print(f"note  {line}")
    if not problems:
        print(f"ok    the published set under {a.output} is one run's")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
