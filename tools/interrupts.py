"""Ctrl-C at random moments of ``altgrad compare`` and ``altgrad bench``: how each one ended.

    JAX_PLATFORMS=cpu python tools/interrupts.py --compare 32 --bench 8

Prints, per command, a count of each outcome: the exit status, whether a traceback was printed,
and whether the last line is the one-line "interrupted" report. A clean stop is status 130, no
traceback, that line. (The test suite runs a few of these; this runs as many as asked.)
"""

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

COMMANDS = {
  "compare": ["compare", "--rules", "backprop", "--hidden", "8", "--no-progress", "--plot", "", "--epochs", "500"],
  "bench": ["bench", "--suite", "smoke", "--no-progress"],
}


def interrupt_once(name: str, delay: float, out: str) -> tuple:
  argv = [sys.executable, "-m", "altgrad", *COMMANDS[name]] + (["--out", out] if name == "bench" else [])
  process = subprocess.Popen(argv, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  time.sleep(delay)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=300)
  lines = err.strip().splitlines()
  reported = bool(lines) and lines[-1].startswith(f"altgrad {name}: interrupted")
  return process.returncode, "Traceback" in err, reported


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--compare", type=int, default=32, help="interrupts of compare")
  parser.add_argument("--bench", type=int, default=8, help="interrupts of bench")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  timings = random.Random(args.seed)
  for name, count, latest in (("compare", args.compare, 3.5), ("bench", args.bench, 20.0)):
    outcomes = collections.Counter()
    for _ in range(count):
      with tempfile.TemporaryDirectory() as out:
        outcomes[interrupt_once(name, timings.uniform(0.3, latest), out)] += 1
    print(f"{name}: {count} interrupts")
    for (status, traceback, reported), n in sorted(outcomes.items()):
      print(f"  {n:3d} x status {status}, traceback: {traceback}, one-line report: {reported}")


if __name__ == "__main__":
  main()
