"""The README's numbers about the suite and the metrics, checked so that they cannot drift.

Each statement is found by its wording and compared with what it describes:
the suite's size (the items pytest collects from ``tests/``), the tests
that need tools from outside PyPI (marked ``outside_pypi``) and the files
they live in, and the histograms' bucket ranges.  In a run of the whole
suite the collected items are this session's; in a partial run (one file,
``-k``) the suite is collected once in a subprocess.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from backends.metrics import LATENCY_BUCKETS, TOKEN_GAP_BUCKETS
from gateway.metrics import HTTP_BUCKETS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TESTS = ROOT / "tests"

#: Prints the suite's items as JSON: [[nodeid, [marker names]], ...].
_COLLECT = """
import json, sys, pytest
class Items:
    def pytest_collection_finish(self, session):
        self.items = [[i.nodeid, sorted({m.name for m in i.iter_markers()})] for i in session.items]
items = Items()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", sys.argv[1]], plugins=[items])
print("ITEMS " + json.dumps(items.items))
sys.exit(code)
"""


def _whole_suite_here(session: pytest.Session) -> bool:
    opt = session.config.option
    if opt.keyword or opt.markexpr or getattr(opt, "lf", False) or getattr(opt, "deselect", None):
        return False
    files = {Path(str(item.path)).name for item in session.items}
    return files == {p.name for p in TESTS.glob("test_*.py")}


@pytest.fixture(scope="module")
def suite(request) -> list[tuple[str, set[str]]]:
    """Every test of ``tests/``: (node id, its marker names)."""
    session = request.session
    if _whole_suite_here(session):
        return [(i.nodeid, {m.name for m in i.iter_markers()}) for i in session.items]
    out = subprocess.run([sys.executable, "-c", _COLLECT, str(TESTS)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("ITEMS ")), None)
    assert out.returncode == 0 and line, out.stdout[-3000:] + out.stderr[-3000:]
    return [(nodeid, set(markers)) for nodeid, markers in json.loads(line[6:])]


def _number(pattern: str) -> re.Match:
    m = re.search(pattern, README)
    assert m, f"the README no longer says {pattern!r}: update it and this test together"
    return m


def test_the_suite_size_is_the_readmes(suite):
    m = _number(r"`make test` runs the whole suite \((\d[\d,]*) tests")
    assert int(m.group(1).replace(",", "")) == len(suite), f"README says {m.group(1)} tests; the suite has {len(suite)}"


def test_the_tests_needing_tools_from_outside_pypi_are_the_readmes(suite):
    m = _number(r"(\d+) tests in (\d+) files need tools\s+from outside PyPI")
    marked = [nodeid for nodeid, markers in suite if "outside_pypi" in markers]
    files = sorted({nodeid.split("::")[0] for nodeid in marked})
    assert (int(m.group(1)), int(m.group(2))) == (len(marked), len(files)), (marked, files)
    for f in files:  # each file is named where the README explains what it needs
        assert f"`{f}`" in README, f


def test_the_bucket_ranges_are_the_readmes():
    m = _number(r"Latency buckets run from (\d+) ms to (\d+) minutes; inter-token buckets from (\d+) ms to (\d+) s")
    lat_lo, lat_hi, gap_lo, gap_hi = (int(g) for g in m.groups())
    for buckets in (LATENCY_BUCKETS, HTTP_BUCKETS):
        assert (buckets[0], buckets[-1]) == (lat_lo / 1000, lat_hi * 60), buckets
    assert (TOKEN_GAP_BUCKETS[0], TOKEN_GAP_BUCKETS[-1]) == (gap_lo / 1000, gap_hi), TOKEN_GAP_BUCKETS
