"""bench/memory_timeline.py: the phases of a command's run (a new output line or materialised frame starts
one), each with the peak PSS sampled in it, and the command's exit code."""
from __future__ import annotations

import subprocess
import sys

import helpers

BENCH = helpers.ROOT / "bench" / "memory_timeline.py"

# Holds 200 MB only after its line 'big' (a phase is the work after its line), then exits with 3.
HOG = ("import time; print('small', flush=True); time.sleep(1.0); print('big', flush=True); x = b'1' * (200 << 20); "
       "time.sleep(1.5); del x; print('freed', flush=True); time.sleep(1.0); raise SystemExit(3)")


def test_each_phase_gets_the_peak_sampled_while_it_ran() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--every", "0.1", "--", sys.executable, "-c", HOG],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines()
            if line.startswith("| ") and "start s" not in line]
    peaks = {cells[4].strip(): float(cells[2].replace(",", "")) for cells in rows}
    assert set(peaks) >= {"small", "big", "freed"}
    assert peaks["big"] > peaks["small"] + 150 and peaks["big"] > peaks["freed"] + 150  # the 200 MB in its phase
    assert "exit code 3" in out.stdout and "] big" in out.stdout  # the output, timestamped


def test_a_missing_command_is_a_usage_error() -> None:
    out = subprocess.run([sys.executable, str(BENCH)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "give the command to run after --" in out.stderr
