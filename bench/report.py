"""The tables of the benchmarks page, rendered from the benchmarks' result JSON.

Each benchmark has one rendering here, in markdown: the benchmark prints it at the end of its
run, and ``docs/benchmarks.md`` holds it between markers, so the page cannot drift from
``bench/results/*.json``::

    <!-- generated from bench/results/serving.json: do not edit -->
    ...the table, its notes and the machine it ran on...
    <!-- end of generated table -->

A result with several tables names the one in brackets:
``<!-- generated from bench/results/speed.json (drain): do not edit -->``.

    python bench/report.py            # rewrite the tables in docs/benchmarks.md
    python bench/report.py --check    # exit 1 naming the stale tables, writing nothing

A cell shows a figure as the page does: seconds with one decimal below 100 and none above,
rates as whole numbers with thousands separators:

    >>> _seconds(84.73), _seconds(273.6), _count(2847.5), _ms(2.395), _ms(16.993), _ms(103.4), _ms(99.96)
    ('84.7', '274', '2,848', '2.40', '17.0', '103', '100')
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import PROJECT_ROOT, RESULTS_DIR, markdown_table  # noqa: E402
from lambda_ml.config import LIFETIME  # noqa: E402

PAGE = PROJECT_ROOT / "docs" / "benchmarks.md"
END_MARKER = "<!-- end of generated table -->"
START_MARKER = re.compile(
    r"^<!-- generated from bench/results/(?P<file>[^ ()]+?)(?: \((?P<part>[^)]+)\))?: do not edit -->$"
)

Result = dict[str, Any]


class ReportError(Exception):
    """A result file missing or lacking a figure, or a page whose markers do not match the tables."""


# --------------------------------------------------------------------------- figures as the page shows them


def _count(value: float | None) -> str:
    """A count or rate: whole, with thousands separators."""
    return "" if value is None else f"{value:,.0f}"


def _digits(value: float | None, decimals: Sequence[tuple[int, float]]) -> str:
    """``value`` with the first count of decimals whose limit its rounded value stays under, else
    none (so 99.96 s shows as 100, not 100.0)."""
    if value is None:
        return ""
    for digits, limit in decimals:
        if abs(round(value, digits)) < limit:
            return f"{value:.{digits}f}"
    return f"{value:,.0f}"


def _seconds(value: float | None) -> str:
    """Seconds: one decimal below 100 s, none above (the decimal is noise there)."""
    return _digits(value, [(1, 100)])


def _ms(value: float | None) -> str:
    """A latency in ms to three significant figures (none after the point from 100 ms)."""
    return _digits(value, [(2, 10), (1, 100)])


def _span(values: Sequence[float], digits: int) -> str:
    """``"2.0-2.9"``, or one figure when the lowest and highest show the same."""
    low, high = f"{min(values):.{digits}f}", f"{max(values):.{digits}f}"
    return low if low == high else f"{low}-{high}"


def _fixed(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "missed"


def _blocks(*parts: str | None) -> str:
    """Caption, table, notes and machine line, each its own markdown block."""
    return "\n\n".join(p for p in parts if p)


def machine_line(result: Result, loads: Sequence[float | None] = ()) -> str:
    """Cores, RAM, the load average over ``loads`` (the figures' own, from the result) and when
    the run started, each where the result holds it.

    >>> machine_line({"machine": {"cores": 2, "cores_usable": 2, "ram_gib": 23.5, "cpu": "AMD EPYC"},
    ...               "params": {"started_at": "2026-11-22T18:19:14.99+00:00"}}, [2.19, 1.48])
    'Machine: 2 cores (AMD EPYC), 23.5 GiB RAM; load average 1.5-2.2 during the measurements; run started 2026-11-22 18:19 UTC.'
    """
    machine = result["machine"]
    cores, usable = machine.get("cores"), machine.get("cores_usable")
    cpu = f" ({machine['cpu']})" if machine.get("cpu") else ""
    used = f"{usable} of {cores} cores" if usable is not None and usable != cores else f"{cores} cores"
    parts = [f"Machine: {used}{cpu}, {machine['ram_gib']:g} GiB RAM"]
    known = [load for load in loads if load is not None]
    if known:
        parts.append(f"load average {_span(known, 1)} during the measurements")
    elif machine.get("load_average_at_end") is not None:
        parts.append(f"load average {machine['load_average_at_end']:.1f} at the end of the run")
    else:
        parts.append("load average not recorded")
    started = result.get("params", {}).get("started_at") or machine.get("started_at")
    if started:
        parts.append(f"run started {datetime.fromisoformat(started).astimezone(UTC):%Y-%m-%d %H:%M} UTC")
    else:
        parts.append("date of the run not recorded")
    return "; ".join(parts) + "."


# --------------------------------------------------------------------------- batch retrain


def _outcome(entry: Result) -> str:
    """What stands in a time cell when the run did not finish."""
    if "skipped" in entry:
        reason = str(entry["skipped"])
        return f"not run ({reason.removeprefix('not run: ')})" if reason.startswith("not run: ") else reason
    return str(entry.get("error", "not measured"))


def batch_retrain_table(result: Result) -> str:
    """Retrain time, CPU, rate and peak memory per size, beside the peer's time and memory."""
    platform, peer = result["results"]["sizes"], result["peer"]["sizes"]
    rows = []
    for label, p in platform.items():
        q = peer.get(label, {})
        finished = "wall_s" in q
        rows.append([
            label,
            _seconds(p["wall_s"]) if "wall_s" in p else _outcome(p),
            _seconds(p.get("cpu_s")),
            _count(p.get("events_per_s")),
            _fixed(p.get("peak_memory_gib"), 2),
            _seconds(q["wall_s"]) if finished else _outcome(q),
            _fixed(q.get("peak_memory_gib"), 2) if finished else "",
        ])  # fmt: skip
    table = markdown_table(["events", "retrain s", "CPU s", "events/s", "peak GiB", "peer s", "peer peak GiB"], rows)
    targets = result["results"]["targets"]
    names = {"10M_under_300_s": "10M events in under 300 s", "peak_under_8_GiB": "peak memory under 8 GiB",
             "at_most_linear": "time growing no faster than linearly"}  # fmt: skip
    verdicts = [
        f"{names.get(key, key)}: {_verdict(met)}"
        for key, met in targets.items()
        if key in names or isinstance(met, bool)
    ]
    scaling = result.get("ratios", {}).get("scaling", {})
    measured = [label for label, p in platform.items() if "wall_s" in p]
    widest = scaling.get(f"{measured[-1]}_over_{measured[0]}") if len(measured) > 1 else None
    growth = (
        f" ({measured[-1]} takes {widest['wall_time']:.2f}x the time of {measured[0]} for {widest['events']:g}x the events)"
        if widest else ""
    )  # fmt: skip
    notes = "Targets: " + "; ".join(verdicts) + growth + "." if verdicts else None
    loads = [e.get("machine_load_1m") for sizes in (platform, peer) for e in sizes.values()]
    return _blocks(table, notes, machine_line(result, loads))


# --------------------------------------------------------------------------- real data

BASELINES = {
    "item_popularity_auc": "item popularity (pandas: the film's ratings before)",
    "user_item_rates_auc": "user + item all-history click rates (pandas)",
    "user_item_smoothed_rates_auc": "smoothed user + item all-history click rates (pandas)",
    "user_item_mean_ratings_auc": "smoothed user + item all-history mean ratings (pandas)",
}
MODEL_NAMES = {"gbt": "GBT", "lr": "logistic regression"}


def _windows(windows: Sequence[str]) -> str:
    """``["1h", "24h", "7d", "all"]`` -> ``"lifetime + 1 h/24 h/7 d windows"``.

    >>> _windows(["1h", "24h", "7d", "all"]), _windows(["30m"])
    ('lifetime + 1 h/24 h/7 d windows', '30 m windows')
    """
    timed = "/".join(re.sub(r"^(\d+)\s*(\D+)$", r"\1 \2", w) for w in windows if w != LIFETIME)
    parts = (["lifetime"] if LIFETIME in windows else []) + ([f"{timed} windows"] if timed else [])
    return " + ".join(parts)


def real_data_table(result: Result) -> str:
    """Holdout AUC of the champion and of each pandas baseline, on the same rows."""
    params, results, peer, ratios = result["params"], result["results"], result["peer"], result["ratios"]
    model = params.get("config_overrides", {}).get("ctr.model")
    champion = ", ".join(p for p in ("batch layer", _windows(params["windows"]), MODEL_NAMES.get(model, model)) if p)
    rows = [[f"champion ({champion})", f"{results['champion_auc']:.4f}"]]
    rows += [[label, f"{peer[key]:.4f}"] for key, label in BASELINES.items() if key in peer]
    holdout_after = datetime.fromisoformat(results["holdout_after"]).astimezone(UTC)
    seconds = results["seconds"]
    caption = (
        f"On the batch run's {peer['holdout_rows']:,} holdout rows (ratings after {holdout_after:%Y-%m-%d %H:%M} UTC, "
        f"{_percent(peer['holdout_clicks'] / peer['holdout_rows'])} clicked); "
        f"{'a quick run on the first users' if params.get('quick') else 'whole data set'}, "
        f"{results['wall_s'] / 60:.0f} min, of which ingest {seconds['ingest'] / 60:.0f} min "
        f"and the batch run {seconds['train'] / 60:.0f} min:"
    )  # fmt: skip
    best = f"{ratios['best_baseline']}_auc"
    notes = (
        f"Champion minus the best baseline ({BASELINES.get(best, best).removesuffix(' (pandas)')}): "
        f"{ratios['champion_minus_best_baseline_auc']:+.4f}; "
        f"target {ratios['target_margin']:+.2f}: {_verdict(ratios['target_met'])}."
    )
    return _blocks(
        caption,
        markdown_table(["holdout AUC", "value"], rows),
        notes,
        machine_line(result, [results.get("load_average")]),
    )


# --------------------------------------------------------------------------- speed layer


def speed_drain_table(result: Result) -> str:
    """Drain throughput of the speed layer, the plain loop and the Spark ceiling."""
    ours, peer = result["results"]["throughput"], result["peer"]["throughput"]
    ceiling = result["results"].get("ceiling")
    rows = [
        ["speed layer (ingest + increments)", _count(ours["records"]), _seconds(ours["seconds"]), _count(ours["events_per_s"]),
         _seconds(ours["cpu_s"]), _count(ours["events_per_cpu_s"]), _fixed(ours["peak_memory_gib"], 2), _fixed(ours["load_average"], 2)],
        ["ingest alone (its micro-batches)", "", _seconds(ours["ingest_seconds"]), _count(ours["ingest_events_per_s"]), "", "", "", ""],
        ["plain kafka-python loop", _count(peer["records"]), _seconds(peer["seconds"]), _count(peer["events_per_s"]),
         _seconds(peer["cpu_s"]), _count(peer["events_per_cpu_s"]), _fixed(peer["peak_memory_gib"], 2), _fixed(peer["load_average"], 2)],
    ]  # fmt: skip
    if ceiling:
        rows.append(["Spark ceiling: Kafka -> parse -> Delta only", _count(ceiling["records"]), _seconds(ceiling["seconds"]),
                     _count(ceiling["events_per_s"]), _seconds(ceiling["cpu_s"]), "", "", _fixed(ceiling["load_average"], 2)])  # fmt: skip
    headers = ["", "records", "seconds", "events/s", "CPU s", "events per CPU s", "peak GiB", "load average"]
    targets, ratios = result["targets"], result["ratios"]
    notes = (
        f"Targets: {_count(targets['events_per_s'])} events/s: {_verdict(ratios.get('events_per_s_target_met'))} "
        f"({_count(ours['events_per_s'])}); "
        f"{targets['vs_plain_loop']:g}x the plain loop ({_count(targets['vs_plain_loop'] * peer['events_per_s'])} events/s): "
        f"{_verdict(ratios.get('vs_plain_loop_target_met'))} ({ratios['events_per_s_vs_plain_loop']:.2f}x)"
        + (
            f"; the speed layer reaches {_percent(ratios['events_per_s_vs_ceiling'])} of the ceiling's rate"
            if ceiling
            else ""
        )
        + "."
    )
    loads = [entry["load_average"] for entry in (ours, peer, ceiling or {}) if "load_average" in entry]
    return _blocks("Drain:", markdown_table(headers, rows), notes, machine_line(result, loads))


def speed_steady_table(result: Result) -> str:
    """Micro-batch durations and freshness at a steady rate, of the speed layer and the one-hop ceiling."""
    runs = [(label, result["results"][key]) for key, label in (("steady", "speed layer"), ("steady_ceiling", "Spark ceiling, one hop"))
            if key in result["results"]]  # fmt: skip
    if not runs:
        raise KeyError("steady")
    first = runs[0][1]

    def pair(run: Result, prefix: str) -> str:
        return f"{_fixed(run[f'{prefix}_p50_s'], 1)} / {_fixed(run[f'{prefix}_p95_s'], 1)}"

    def freshness(run: Result) -> str:
        return " / ".join(
            _fixed(run[key], 1) if run[key] is not None else "not seen"
            for key in ("freshness_p50_s", "freshness_p95_s")
        )

    rows = []
    for label, run in runs:
        batches = (f"ingest {pair(run, 'ingest_batch')}, increments {pair(run, 'increments_batch')}"
                   if "ingest_batch_p50_s" in run else pair(run, "ceiling_batch"))  # fmt: skip
        rows.append(
            [
                label,
                f"{run['trigger_seconds']:g} s",
                batches,
                freshness(run),
                _seconds(run["cpu_s"]),
                _fixed(run["load_average"], 2),
            ]
        )
    seconds = result["params"]["fresh_seconds"]
    unseen = sum(run["impressions_not_visible_at_stop"] for _, run in runs)
    caption = (
        f"Steady rate: {first['rate_target']:,} records/s sent for {seconds:g} s by a paced producer on the same machine, "
        f"first {first['warmup_s']:g} s left out; "
        + ("every impression sent was counted before each run stopped:" if unseen == 0 else
           f"{unseen:,} impressions sent were not counted when the runs stopped (they count as later than any figure):")
    )  # fmt: skip
    headers = [
        "",
        "trigger",
        "micro-batch p50 / p95 s",
        "freshness p50 / p95 s",
        f"CPU s ({seconds:g} s)",
        "load average",
    ]
    target = result["targets"]["freshness_p95_s"]
    p95s = "; ".join(f"{label}: {freshness(run).split(' / ')[1]} s" for label, run in runs)
    notes = (
        f"Target: freshness p95 of {target:g} s: {_verdict(result['ratios'].get('freshness_p95_target_met'))} ({p95s})."
    )
    return _blocks(
        caption, markdown_table(headers, rows), notes, machine_line(result, [run["load_average"] for _, run in runs])
    )


def speed_bytes_table(result: Result) -> str:
    """Kafka bytes per event for each format and codec, and what each saves against plain JSON."""
    measured = result["results"]["bytes"]
    codecs = list(dict.fromkeys(key.split("/", 1)[1] for key in measured))
    rows = []
    for codec in codecs:
        row = [codec]
        for fmt in ("json", "avro"):
            entry = measured.get(f"{fmt}/{codec}")
            row += (
                ["", ""]
                if entry is None
                else [_fixed(entry["bytes_per_event"], 1), _percent(entry["saved_vs_json_none"])]
            )
        rows.append(row)
    records = sorted({entry["records"] for entry in measured.values()})
    caption = f"Kafka bytes per event ({', '.join(f'{n:,}' for n in records)} records each):"
    headers = ["codec", "JSON bytes/event", "JSON saves", "Avro bytes/event", "Avro saves (vs plain JSON)"]
    ratios = result["ratios"]
    notes = (
        f"Target: at least {_percent(result['targets']['bytes_saved'])} fewer bytes than plain JSON: "
        f"{_verdict(ratios.get('bytes_target_met'))} ({ratios['bytes_best']} saves {_percent(ratios['bytes_saved_best'])})."
    )
    return _blocks(caption, markdown_table(headers, rows), notes, machine_line(result))


def speed_tables(result: Result) -> str:
    """The tables of the parts a run measured (``--parts`` may leave some out)."""
    measured = result["results"]
    parts = [(speed_drain_table, "throughput" in measured), (speed_steady_table, "steady" in measured or "steady_ceiling" in measured),
             (speed_bytes_table, "bytes" in measured)]  # fmt: skip
    return "\n\n".join(render(result) for render, present in parts if present)


# --------------------------------------------------------------------------- serving


HALF_SATURATION = "half_saturation"


def serving_table(result: Result) -> str:
    """Requests/s, latency, CPU and memory of ours and ``mlflow models serve`` per concurrency,
    and both at half of their own saturation."""
    ours, peer, ratios = result["results"], result["peer"], result["ratios"]["requests_per_s"]

    def pair(level: str, keys: tuple[str, str], show: Callable[[float], str]) -> list[str]:
        return [f"{show(side[level][keys[0]])} / {show(side[level][keys[1]])}" for side in (ours, peer)]

    def side_by_side(level: str, key: str, show: Callable[[float], str]) -> str:
        return f"{show(ours[level][key])} / {show(peer[level][key])}"

    def figures(level: str) -> list[str]:
        return [*pair(level, ("p50_ms", "p99_ms"), _ms), side_by_side(level, "server_cpu_ms_per_request", lambda v: f"{v:.2f}"),
                side_by_side(level, "memory_mib", lambda v: f"{v:.0f}")]  # fmt: skip

    levels = [level for level in ours if level != HALF_SATURATION]
    rows = [[level, _count(ours[level]["requests_per_s"]), _count(peer[level]["requests_per_s"]), _fixed(ratios.get(level), 2),
             *figures(level)] for level in levels]  # fmt: skip
    targets = result["targets"]
    measured = [ratios[level] for level in levels if ratios.get(level) is not None]
    verdicts = []
    if measured:
        verdicts.append(f"{targets['requests_per_s_ratio']:g}x the requests/s of mlflow at every concurrency: "
                        f"{_verdict(min(measured) >= targets['requests_per_s_ratio'])} ({_span(measured, 2)}x)")  # fmt: skip
    if HALF_SATURATION in ours:
        half, peer_half = ours[HALF_SATURATION], peer[HALF_SATURATION]
        label = f"half of saturation ({_count(half['target_rate'])}/s; mlflow {_count(peer_half['target_rate'])}/s)"
        rows.append(
            [label, _count(half["requests_per_s"]), _count(peer_half["requests_per_s"]), "", *figures(HALF_SATURATION)]
        )
        limit = targets["p99_ms_at_half_saturation"]
        verdicts.append(
            f"p99 at half of saturation under {limit:g} ms: {_verdict(half['p99_ms'] <= limit)} ({_ms(half['p99_ms'])} ms)"
        )
    headers = ["concurrency", "ours req/s", "mlflow req/s", "ratio", "ours p50 / p99 ms", "mlflow p50 / p99 ms",
               "CPU ms per request (ours / mlflow)", "memory MiB (ours / mlflow)"]  # fmt: skip
    notes = f"{result['params']['seconds_per_level']:g} s per level." + (
        f" Targets: {'; '.join(verdicts)}." if verdicts else ""
    )
    failed = [f"{name} at {level}: " + ", ".join(f"{n:,} x {code}" for code, n in entry["statuses"].items()) for name, side in (("ours", ours), ("mlflow", peer))
              for level, entry in side.items() if set(entry.get("statuses", {})) - {"200"}]  # fmt: skip
    if failed:
        notes += " Answers other than 200: " + "; ".join(failed) + "."
    loads = [entry.get("load_average") for side in (ours, peer) for entry in side.values()]
    return _blocks(markdown_table(headers, rows), notes, machine_line(result, loads))


# --------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class PageTable:
    """One generated table of the page: which result file it comes from and its rendering."""

    result: str  # file name in bench/results
    part: str | None  # the table's name when its result has several
    render: Callable[[Result], str]

    @property
    def name(self) -> str:
        return f"{self.result} ({self.part})" if self.part else self.result

    @property
    def marker(self) -> str:
        part = f" ({self.part})" if self.part else ""
        return f"<!-- generated from bench/results/{self.result}{part}: do not edit -->"


TABLES = (
    PageTable("batch_retrain.json", None, batch_retrain_table),
    PageTable("real_data.json", None, real_data_table),
    PageTable("speed.json", "drain", speed_drain_table),
    PageTable("speed.json", "steady rate", speed_steady_table),
    PageTable("speed.json", "bytes", speed_bytes_table),
    PageTable("serving.json", None, serving_table),
)


def _shown(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def load_result(path: Path) -> Result:
    """A benchmark's result JSON; a clear error naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise ReportError(
            f"{_shown(path)}: no such result file (run python bench/{path.stem.split('.')[0]}.py to write it)"
        )
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{_shown(path)}: not valid JSON ({exc})") from None
    if not isinstance(loaded, dict):
        raise ReportError(f"{_shown(path)}: a result is a JSON object, not {type(loaded).__name__}")
    return loaded


def render_table(table: PageTable, results_dir: Path = RESULTS_DIR) -> str:
    """The table as the page holds it between its markers, from its result file."""
    path = results_dir / table.result
    result = load_result(path)
    which = f"its {table.part} table" if table.part else "its table"
    try:
        return table.render(result)
    except KeyError as exc:
        raise ReportError(f"{_shown(path)}: the result has no {exc.args[0]!r}, which {which} needs") from None
    except (TypeError, ValueError, IndexError) as exc:
        raise ReportError(f"{_shown(path)}: a figure {which} needs is not as expected ({exc})") from None


@dataclass(frozen=True)
class _Block:
    table: PageTable
    start: int  # line index of the start marker
    end: int  # line index of the end marker


def _find_blocks(lines: Sequence[str], page: Path) -> list[_Block]:
    by_marker = {t.marker: t for t in TABLES}
    blocks, i = [], 0
    while i < len(lines):
        if START_MARKER.match(lines[i]):
            table = by_marker.get(lines[i])
            if table is None:
                raise ReportError(f"{_shown(page)} line {i + 1}: no table is generated for {lines[i]!r}")
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j] == END_MARKER or START_MARKER.match(lines[j])), None
            )
            if end is None or lines[end] != END_MARKER:
                raise ReportError(f"{_shown(page)} line {i + 1}: the {table.name} table has no {END_MARKER!r} after it")
            blocks.append(_Block(table, i, end))
            i = end
        i += 1
    missing = [t.name for t in TABLES if t not in {b.table for b in blocks}]
    if missing:
        raise ReportError(f"{_shown(page)} has no marker for the tables of {', '.join(missing)}")
    return blocks


def _generated(table: PageTable, results_dir: Path) -> list[str]:
    return ["", *render_table(table, results_dir).splitlines(), ""]


def render_page(text: str, page: Path = PAGE, results_dir: Path = RESULTS_DIR) -> str:
    """``text`` (the page) with every generated table rendered afresh; the prose is kept as it is."""
    lines = text.splitlines()
    out, done = [], 0
    for block in _find_blocks(lines, page):
        out += [*lines[done : block.start + 1], *_generated(block.table, results_dir)]
        done = block.end
    out += lines[done:]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def stale_tables(text: str, page: Path = PAGE, results_dir: Path = RESULTS_DIR) -> list[str]:
    """Names of the tables whose text in the page differs from their result file's rendering."""
    lines = text.splitlines()
    return [
        b.table.name
        for b in _find_blocks(lines, page)
        if lines[b.start + 1 : b.end] != _generated(b.table, results_dir)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/report.py",
        description="Rewrite the tables of docs/benchmarks.md from bench/results/*.json (between their "
        "'generated from' markers; the prose around them is kept).",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 naming the tables that differ from their results"
    )
    parser.add_argument("--page", type=Path, default=PAGE, help="the page (default: docs/benchmarks.md)")
    parser.add_argument(
        "--results", type=Path, default=RESULTS_DIR, help="folder of the result files (default: bench/results)"
    )
    args = parser.parse_args(argv)
    try:
        if not args.page.is_file():
            raise ReportError(f"{_shown(args.page)}: no such page")
        text = args.page.read_text()
        if args.check:
            stale = stale_tables(text, args.page, args.results)
            for name in stale:
                print(
                    f"stale: the table from {name} differs from the result; run python bench/report.py", file=sys.stderr
                )
            return 1 if stale else 0
        rendered = render_page(text, args.page, args.results)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rendered != text:
        args.page.write_text(rendered)
        print(f"rewrote the tables of {_shown(args.page)}")
    else:
        print(f"{_shown(args.page)}: every table is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
