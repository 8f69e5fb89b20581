r"""Where a job's memory goes: run a command, sample its process tree's PSS, print the phases and their peaks.

    python bench/memory_timeline.py -- python jobs/tokenize_catalog.py --input bench/out/catalog_50000000_256_q8_delta \
        --output /tmp/r50/tables --work-dir /tmp/r50/work --stages validate,encode,report \
        --model bench/out/model_256_default.pt --max-reject-share 0

The command's output is printed as it comes, each line with the seconds since the start. Every
``--every`` seconds the tree's PSS (each page counted once, see bench/encode_throughput.run_sampled) is
sampled together with the number of frames the embedded engine has materialised so far (folders
``materialized-*`` in the job's scratch directories under ``TMPDIR``) and the last line the command
printed. A phase is a run of samples with the same (frames, line): the time between two materialised
frames, so the work that computes one. At the end a table gives each phase's start, end, peak PSS, frame
count and line, then the overall peak. Exit code: the command's.

Other embedded sessions running beside the command (a test suite) write scratch folders too: their
frames would be counted. Run it alone.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def tree_pss(root: psutil.Process) -> int:
    """Bytes of PSS of ``root`` and its descendants (RSS where PSS cannot be read)."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def phases(samples: list[tuple[float, int, int, str]]) -> list[tuple[float, float, int, int, str]]:
    """(start s, end s, peak bytes, frames, line) per run of samples with the same (frames, line)."""
    out: list[tuple[float, float, int, int, str]] = []
    for t, pss, frames, line in samples:
        if out and (out[-1][3], out[-1][4]) == (frames, line):
            start, _, peak, _, _ = out[-1]
            out[-1] = (start, t, max(peak, pss), frames, line)
        else:
            out.append((t, t, pss, frames, line))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=float, default=0.5, help="seconds between samples (default 0.5)")
    p.add_argument("--min-mb", type=float, default=0.0,
                   help="print only the phases whose peak reaches this many MB (default: all)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    a = p.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the command to run after --")
    start = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, int, int, str]] = []
    last = ["<start>"]
    scratch = os.path.join(tempfile.gettempdir(), "csid-engine-*", "materialized-*")

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            pss = tree_pss(root)
            samples.append((time.perf_counter() - start, pss, len(glob.glob(scratch)), last[0]))
            time.sleep(a.every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"[{time.perf_counter() - start:7.1f}s] {line.rstrip()}", flush=True)
        if line.strip() and " INFO " not in line:  # the engine's log lines do not start a phase
            last[0] = line.strip()[:100]
    rc = proc.wait()
    sampler.join()
    print("\n| start s | end s | peak PSS MB | frames | last line |\n|---:|---:|---:|---:|---|")
    for t0, t1, peak, frames, line in phases(samples):
        if peak >= a.min_mb * 2**20:
            print(f"| {t0:.1f} | {t1:.1f} | {peak / 2**20:,.0f} | {frames} | {line.replace('|', '/')} |")
    peak = max((pss for _, pss, _, _ in samples), default=0)
    print(f"\nexit code {rc}, wall {time.perf_counter() - start:.1f} s, peak PSS {peak / 2**20:,.0f} MB")
    return rc


if __name__ == "__main__":
    sys.exit(main())
