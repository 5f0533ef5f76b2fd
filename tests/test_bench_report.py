"""The benchmarks page's tables (bench/report.py): each rendered from its result JSON, the page
kept equal to the committed results, and a missing result named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.common import RESULTS_DIR

# Hand-made results: every figure below is chosen to test one rule of the rendering (rounding at
# a boundary, a run that did not finish, a non-200 answer, a time zone other than UTC).
SERVING: dict[str, Any] = {
    "machine": {"cores": 4, "cores_usable": 2, "ram_gib": 16.0, "cpu": "Test CPU"},
    "params": {"seconds_per_level": 5.0, "started_at": "2026-01-02T03:04:05+01:00"},
    "results": {
        "1": {"requests_per_s": 1234.4, "p50_ms": 0.5, "p99_ms": 12.34, "server_cpu_ms_per_request": 0.3,
              "memory_mib": 300.4, "statuses": {"200": 10}, "load_average": 1.0},
        "half_saturation": {"requests_per_s": 617.0, "target_rate": 617.3, "p50_ms": 0.456, "p99_ms": 150.2,
                            "server_cpu_ms_per_request": 0.25, "memory_mib": 301.6, "statuses": {"200": 5}, "load_average": 3.04},
    },
    "peer": {
        "1": {"requests_per_s": 400.0, "p50_ms": 2.0, "p99_ms": 99.96, "server_cpu_ms_per_request": 1.0,
              "memory_mib": 450.0, "statuses": {"200": 8, "500": 2}, "load_average": 2.0},
        "half_saturation": {"requests_per_s": 199.9, "target_rate": 200.0, "p50_ms": 2.5, "p99_ms": 9.0,
                            "server_cpu_ms_per_request": 1.1, "memory_mib": 451.0, "statuses": {"200": 4}, "load_average": 2.5},
    },
    "ratios": {"requests_per_s": {"1": 3.09}},
    "targets": {"requests_per_s_ratio": 3.0, "p99_ms_at_half_saturation": 10.0},
}  # fmt: skip

SERVING_MARKDOWN = """\
| concurrency | ours req/s | mlflow req/s | ratio | ours p50 / p99 ms | mlflow p50 / p99 ms | CPU ms per request (ours / mlflow) | memory MiB (ours / mlflow) |
|---|---|---|---|---|---|---|---|
| 1 | 1,234 | 400 | 3.09 | 0.50 / 12.3 | 2.00 / 100 | 0.30 / 1.00 | 300 / 450 |
| half of saturation (617/s; mlflow 200/s) | 617 | 200 | | 0.46 / 150 | 2.50 / 9.00 | 0.25 / 1.10 | 302 / 451 |

5 s per level. Targets: 3x the requests/s of mlflow at every concurrency: met (3.09x); p99 at half of saturation under 10 ms: missed (150 ms). Answers other than 200: mlflow at 1: 8 x 200, 2 x 500.

Machine: 2 of 4 cores (Test CPU), 16 GiB RAM; load average 1.0-3.0 during the measurements; run started 2026-01-02 02:04 UTC."""

BATCH: dict[str, Any] = {
    "machine": {"cores": 2, "cores_usable": 2, "ram_gib": 23.5, "cpu": "AMD EPYC"},
    "params": {},
    "results": {
        "sizes": {
            "1M": {"wall_s": 99.96, "cpu_s": 150.4, "events_per_s": 10003.6, "peak_memory_gib": 4.5, "machine_load_1m": 2.04},
            "10M": {"error": "stopped after 600 s (time limit)", "peak_memory_gib": 7.9},
        },
        "targets": {"description": "10M events in under 300 s", "10M_under_300_s": False, "peak_under_8_GiB": True, "at_most_linear": None},
    },
    "peer": {"sizes": {"1M": {"wall_s": 20.04, "peak_memory_gib": 2.0, "machine_load_1m": 1.96}, "10M": {"skipped": "not run: projected 20 GiB"}}},
    "ratios": {"scaling": {}},
}  # fmt: skip

BATCH_MARKDOWN = """\
| events | retrain s | CPU s | events/s | peak GiB | peer s | peer peak GiB |
|---|---|---|---|---|---|---|
| 1M | 100 | 150 | 10,004 | 4.50 | 20.0 | 2.00 |
| 10M | stopped after 600 s (time limit) | | | 7.90 | not run (projected 20 GiB) | |

Targets: 10M events in under 300 s: missed; peak memory under 8 GiB: met; time growing no faster than linearly: not measured.

Machine: 2 cores (AMD EPYC), 23.5 GiB RAM; load average 2.0 during the measurements; date of the run not recorded."""


def test_serving_result_renders_as_written_by_hand() -> None:
    assert report.serving_table(SERVING) == SERVING_MARKDOWN


def test_batch_result_with_an_unfinished_size_renders_as_written_by_hand() -> None:
    assert report.batch_retrain_table(BATCH) == BATCH_MARKDOWN


def test_the_page_holds_the_tables_of_the_committed_results() -> None:
    """A benchmark re-run without `python bench/report.py` fails here."""
    assert report.stale_tables(report.PAGE.read_text()) == []
    assert report.main(["--check"]) == 0


def copy_results(to: Path) -> Path:
    to.mkdir()
    for path in RESULTS_DIR.glob("*.json"):
        shutil.copy(path, to / path.name)
    return to


def test_a_changed_result_makes_its_table_stale_until_the_page_is_rewritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = copy_results(tmp_path / "results")
    serving = json.loads((results / "serving.json").read_text())
    serving["results"]["8"]["requests_per_s"] += 1000
    (results / "serving.json").write_text(json.dumps(serving))
    page = tmp_path / "benchmarks.md"
    shutil.copy(report.PAGE, page)
    before = page.read_text()

    assert report.stale_tables(before, page, results) == ["serving.json"]
    assert report.main(["--check", "--page", str(page), "--results", str(results)]) == 1
    assert "serving.json" in capsys.readouterr().err
    assert page.read_text() == before  # --check writes nothing

    assert report.main(["--page", str(page), "--results", str(results)]) == 0
    after = page.read_text()
    assert report.stale_tables(after, page, results) == []
    changed = [line for line in after.splitlines() if line not in before.splitlines()]
    expected_rate = f"{serving['results']['8']['requests_per_s']:,.0f}"
    assert [line.split(" | ")[:2] for line in changed if line.startswith("| 8 |")] == [["| 8", expected_rate]]
    # The prose around the tables is kept: outside the markers, the page is as it was.
    assert _outside_markers(after) == _outside_markers(before)


def _outside_markers(text: str) -> list[str]:
    kept, inside = [], False
    for line in text.splitlines():
        if report.START_MARKER.match(line):
            inside = True
        elif line == report.END_MARKER:
            inside = False
        elif not inside:
            kept.append(line)
    return kept


def test_a_missing_result_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = copy_results(tmp_path / "results")
    (results / "speed.json").unlink()

    with pytest.raises(report.ReportError, match=r"speed\.json: no such result file \(run python bench/speed\.py"):
        report.stale_tables(report.PAGE.read_text(), report.PAGE, results)
    assert report.main(["--check", "--results", str(results)]) == 2
    assert "speed.json: no such result file" in capsys.readouterr().err


def test_a_result_lacking_a_figure_is_named_with_its_table(tmp_path: Path) -> None:
    results = copy_results(tmp_path / "results")
    real = json.loads((results / "real_data.json").read_text())
    del real["peer"]["holdout_rows"]
    (results / "real_data.json").write_text(json.dumps(real))

    with pytest.raises(
        report.ReportError, match=r"real_data\.json: the result has no 'holdout_rows', which its table needs"
    ):
        report.render_page(report.PAGE.read_text(), report.PAGE, results)
