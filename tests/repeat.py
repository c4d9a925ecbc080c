"""The whole suite N times from a clean clone: a test that fails once is a flake to fix.

``make test-repeat N=10 BUSY=5`` (``python -m tests.repeat --runs 10 --busy 5``):
clones the repository's committed HEAD into a fresh folder, runs ``make
setup`` there once, then the suite ``--runs`` times, each from a clean tree
(``git clean`` of everything but the virtual environment) with its own
pytest temporary folder; the last ``--busy`` runs with a CPU-bound process
beside them (one core kept busy, as on a shared machine).  Each run prints
one line (its pytest summary and seconds) and the tests that failed in it;
the end lists every test that failed at least once, with how often.  Exit
status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: A core kept busy beside a run (killed when the run ends).
BURNER = "while True: pass"


def _failed(junit: Path) -> list[str]:
    """The failed or erroring tests of one run, as pytest node ids."""
    if not junit.exists():
        return ["(no report: pytest did not finish)"]
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            out.append(f"{case.get('classname')}::{case.get('name')}")
    return out


def _summary(output: str) -> str:
    lines = [line.strip("= ") for line in output.splitlines() if line.startswith("=") and " in " in line]
    return lines[-1] if lines else (output.strip().splitlines() or ["(no output)"])[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.repeat", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10, help="how many runs (default 10)")
    ap.add_argument("--busy", type=int, default=0, help="how many of them (the last) with a CPU-bound process beside")
    ap.add_argument("--workers", type=int, default=2, help="pytest-xdist workers, as `make test` (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (default: tests)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mlxgate-repeat-"))
    clone = work / "mlxgate"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    print(f"clone of {ROOT} at {head} in {clone}", flush=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    t0 = time.monotonic()
    setup = subprocess.run(["make", "-s", "setup"], cwd=clone, capture_output=True, text=True)
    if setup.returncode != 0:
        print(setup.stdout[-3000:] + setup.stderr[-3000:], file=sys.stderr)
        return 2
    print(f"make setup: {time.monotonic() - t0:.0f} s", flush=True)

    failures: collections.Counter[str] = collections.Counter()
    failed_runs = 0
    try:
        for i in range(1, args.runs + 1):
            busy = i > args.runs - args.busy
            subprocess.run(["git", "clean", "-xdfq", "-e", ".venv"], cwd=clone, check=True)
            junit, base = work / f"run-{i}.xml", work / f"tmp-{i}"
            burner = subprocess.Popen([sys.executable, "-c", BURNER]) if busy else None
            t0 = time.monotonic()
            try:
                run = subprocess.run(
                    [str(clone / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                     f"--junitxml={junit}", f"--basetemp={base}", "-n", str(args.workers), "--dist", "loadscope",
                     *(args.pytest_args or ["tests"])],
                    cwd=clone, capture_output=True, text=True,
                )
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
            took = time.monotonic() - t0
            failed = _failed(junit) if run.returncode != 0 else []
            failed_runs += bool(run.returncode)
            failures.update(failed)
            print(f"run {i}/{args.runs}{' (busy)' if busy else ''}: {_summary(run.stdout)} [{took:.0f} s wall]",
                  flush=True)
            for nodeid in failed:
                print(f"    FAILED {nodeid}", flush=True)
            shutil.rmtree(base, ignore_errors=True)
    finally:
        if args.keep:
            print(f"clone kept: {clone}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{args.runs - failed_runs} of {args.runs} runs passed", flush=True)
    for nodeid, n in failures.most_common():
        print(f"    failed {n}x: {nodeid}")
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
