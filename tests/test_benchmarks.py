"""benchmarks/common.py: the figure line, the result files, the README table and the memory probes.

The heavy benchmarks themselves are not run here (`make bench` does); their scripts are only compiled.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


@pytest.fixture(scope="module")
def common():
    # benchmarks/ is a folder of scripts, not a package: load the helper under a name no other module uses.
    spec = importlib.util.spec_from_file_location("pacsai_benchmarks_common", BENCH / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_figure_lines_have_one_format_and_parse_back(common):
    fig = common.Figure("read_series", 1.9623, "sitk_ImageSeriesReader", "96 ms vs 189 ms")
    assert fig.line() == "read_series: 1.96 x sitk_ImageSeriesReader  (96 ms vs 189 ms)"
    assert common.Figure("retrieve_warm", 88.71, "retrieve_cold").line() == "retrieve_warm: 88.7 x retrieve_cold"
    for ratio, text in [(0.36609, "0.366"), (311.4, "311"), (1234.5, "1234"), (0.0412, "0.0412"), (0, "0")]:
        assert common.format_ratio(ratio) == text
    parsed = common.parse_line(fig.line())
    assert (parsed.name, parsed.baseline) == ("read_series", "sitk_ImageSeriesReader")
    assert parsed.detail == "96 ms vs 189 ms"
    assert parsed.ratio == pytest.approx(1.96)
    skipped = common.Figure("dvh", None, "dicompyler-core", "dicompyler-core cannot be imported")
    assert skipped.line() == "dvh: skipped (dicompyler-core cannot be imported)"
    assert common.parse_line(skipped.line()).ratio is None
    # informational output can never be mistaken for a figure
    assert common.parse_line("# raw HTTP 44 ms (1193 MB/s)") is None
    assert common.parse_line("raw_http: 44 ms") is None
    with pytest.raises(ValueError, match="single tokens"):
        common.Figure("two words", 1.0, "x").line()
    with pytest.raises(ValueError, match="finite"):
        common.Figure("nan_ratio", math.nan, "x").line()


def test_result_json_is_complete_and_written_atomically(common, tmp_path):
    figs = [common.Figure("a_fig", 2.5, "base", "detail"), common.Figure("b_fig", None, "base", "why")]
    path = common.write_result("demo", figs, {"seconds": {"x": 0.123456789, "bad": math.inf}},
                               started_load=[1.0, 2.0, 3.0], results_dir=tmp_path)
    assert path == tmp_path / "demo.json"
    assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]  # no temporary file left behind
    doc = json.loads(path.read_text())
    assert doc["benchmark"] == "demo" and doc["date"].endswith("Z")
    assert doc["figures"][0] == {"name": "a_fig", "ratio": 2.5, "baseline": "base", "detail": "detail"}
    assert doc["figures"][1]["ratio"] is None
    assert doc["seconds"] == {"x": 0.123457, "bad": None}  # 6 significant figures; inf is not JSON
    assert doc["load_average_start"] == [1.0, 2.0, 3.0]
    m = doc["machine"]
    assert m["cpu"] and m["logical_cpus"] >= 1 and m["ram_gib"] > 0 and len(m["load_average"]) == 3
    assert m["python"] == sys.version.split()[0]
    assert m["packages"]["numpy"] and m["packages"]["pydicom"].startswith("3")


def test_readme_table_is_regenerated_between_the_markers_only(common, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    results = tmp_path / "results"
    common.write_result("read_series", [common.Figure("read_series", 1.96, "sitk_ImageSeriesReader", "a | b")],
                        {}, results_dir=results)
    common.write_result("dvh", [common.Figure("dvh", None, "dicompyler-core", "not installed")], {},
                        results_dir=results)
    (results / "old-format.json").write_text(json.dumps({"ratio": 3}))  # a pre-format file: ignored
    before = readme.read_text()

    assert common.update_readme(readme, results) is True
    after = readme.read_text()
    head, rest = after.split(common.TABLE_START)
    table, tail = rest.split(common.TABLE_END)
    assert head == before.split(common.TABLE_START)[0] and tail == before.split(common.TABLE_END)[1]
    assert "| `read_series` | 1.96 × sitk_ImageSeriesReader | a \\| b |" in table
    assert "| `dvh` | skipped | not installed |" in table
    assert "Latest run " in table and " cores (" in table and "GiB RAM" in table
    assert common.update_readme(readme, results) is False  # idempotent

    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="README.md: needs exactly one"):
        common.update_readme(readme, results)


def test_peak_memory_probes_see_a_real_allocation(common):
    probe = common.peak_rss_of_call("import numpy as np", "np.ones(64 * 2**20 // 8)")
    assert probe["result_nbytes"] == 64 * 2**20
    assert 60 * 2**20 <= probe["net_bytes"] <= 200 * 2**20
    assert probe["baseline_bytes"] > 5 * 2**20  # the interpreter and numpy

    # bytes that are written, not calloc'ed: untouched zero pages would not count as resident
    code = "import time; b = b'\\x01' * (96 * 2**20); time.sleep(0.6)"
    child = subprocess.Popen([sys.executable, "-c", code])
    with common.TreePeak(child.pid, interval_s=0.02) as peak:
        child.wait(timeout=20)
    assert peak.samples >= 3
    assert peak.bytes >= 96 * 2**20 and peak.bytes_without == peak.bytes


def test_benchmark_scripts_compile():
    scripts = sorted(BENCH.glob("*.py"))
    assert {p.name for p in scripts} >= {"common.py", "run_all.py", "retrieve.py", "read_series.py",
                                         "rtstruct.py", "dvh.py", "report.py"}
    for path in scripts:
        compile(path.read_text(), str(path), "exec")


def test_benchmark_results_carry_no_patient_identifiers(test_data: Path):
    # The committed results (and so the README table) come from real patients' files: none of their names,
    # IDs or birth dates may appear in them (benchmark output is as public as the repository).
    import pydicom

    identifiers: set[str] = set()
    for folder in ("tcia_sts001_mr_t2_rtstruct", "dicompyler_breast_rt", "tcia_nsclc_lung1_001"):
        for path in sorted((test_data / folder).rglob("*.dcm")):
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID", "PatientBirthDate"])
            for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
                value = str(ds.get(keyword, "") or "").strip()
                if len(value) >= 3:  # shorter values ("0", "M") would match anywhere
                    identifiers.add(value)
    assert identifiers, "no identifiers read: the check would prove nothing"
    texts = {p.name: p.read_text() for p in sorted((BENCH / "results").glob("*.json"))}
    leaks = sorted((name, ident) for name, text in texts.items() for ident in identifiers if ident in text)
    # The README names the public NSCLC-Radiomics case by TCIA's own de-identified label on purpose (where the
    # real-CT figures come from); the results never do ("set 9"), and no other identifier may appear anywhere.
    readme = (REPO / "README.md").read_text()
    leaks += sorted(("README.md", ident) for ident in identifiers - {"LUNG1-001"} if ident in readme)
    assert not leaks, leaks
