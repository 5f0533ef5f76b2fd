"""The notebooks (``notebooks/*.ipynb``) run headless on a small lake built on the real stack.

One lake for the three notebooks: generated impressions and clicks (malformed records among them)
go through Kafka and the speed layer into bronze and quarantine, a batch run writes the views and
registers a champion in MLflow, then fresh events after its horizon go through the speed layer
(increments, labels, the online model, which registers itself). Each notebook is executed with
nbclient against that lake's config (``LAMBDA_ML_CONFIG``): no cell may fail, and the figures its
summary cell shows are checked against what this test sent or reads itself. The executed
notebooks, outputs included, are kept in pytest's temporary directory (``executed-notebooks*``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nbformat
import pytest

from lambda_ml.config import PROJECT_ROOT, LrGridConfig, PlatformConfig, SearchConfig, write_config
from lambda_ml.producer import Record, iso

log = logging.getLogger(__name__)

NOTEBOOKS = PROJECT_ROOT / "notebooks"
NAMES = ("lake.ipynb", "models.ipynb", "lambda_identity.ipynb")
SUMMARY_TAG = "summary"  # the cell showing a notebook's figures as JSON
CELL_TIMEOUT_S = 600
# Users of the fresh events: generated users (their buckets get speed rows on top of batch rows)
# and one the batch run has never seen.
FRESH_USERS = ("u0", "u1", "u2", "u3", "u4", "u5", "newcomer")


def test_the_notebooks_are_committed_without_outputs() -> None:
    """Diffs stay readable: no outputs and no execution counts in the committed notebooks, and
    each has one summary cell."""
    assert sorted(path.name for path in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert [(cell.outputs, cell.execution_count) for cell in code] == [([], None)] * len(code), name
        assert sum(SUMMARY_TAG in cell.metadata.get("tags", ()) for cell in code) == 1, name


@dataclass(frozen=True)
class SmallLake:
    cfg: PlatformConfig
    config_file: Path
    sent: dict[str, int]  # valid records sent per event type, resent clicks included
    before_horizon: dict[str, int]  # of them, those sent before the batch run
    malformed: Counter[str]  # the generator's malformed records, by kind
    result: Any  # the batch run's TrainResult
    artifacts: Path


def fresh_events(now: datetime) -> list[Record]:
    """Impressions a minute ago (after the batch horizon, well within the speed layer's
    watermark) and a click on every other one thirty seconds later."""
    records = []
    for n, user in enumerate(FRESH_USERS):
        impression = f"fresh-imp-{n}"
        body = {"event_id": impression, "event_time": iso(now - timedelta(seconds=60)), "user_id": user,
                "item_id": f"i{n % 3}", "device": "mobile", "position": 1 + n % 5}  # fmt: skip
        records.append(Record("impressions", user.encode(), json.dumps(body).encode()))
        if n % 2 == 0:
            click = {"event_id": f"fresh-clk-{n}", "impression_id": impression, "event_time": iso(now - timedelta(seconds=30))}
            records.append(Record("clicks", impression.encode(), json.dumps(click).encode()))
    return records


@pytest.fixture(scope="module")
def small_lake(running_stack: PlatformConfig, spark, tmp_path_factory: pytest.TempPathFactory) -> SmallLake:  # type: ignore[no-untyped-def]
    from batch_layer import train
    from lambda_ml import producer
    from lambda_ml_apps.ctr import generator
    from lambda_ml_cli import stack
    from speed_layer import app as speed_app
    from support import isolated

    root = tmp_path_factory.mktemp("notebooks-lake")
    # One logistic regression, no parameter search: the notebooks need a champion, not the best one.
    no_search = SearchConfig(lr=LrGridConfig(reg_param=(), elastic_net_param=()))
    cfg = isolated(running_stack, "notebooks", lake_root=root / "lake", topic_prefix="notebooks", search=no_search, max_iter=20)
    # A few hours of a few users: enough to train on; the online model registers at every step.
    cfg = cfg.model_copy(update={
        "generator": cfg.generator.model_copy(update={"impressions": 2000, "span_hours": 4, "users": 60, "items": 20}),
        "speed": cfg.speed.model_copy(update={"online": cfg.speed.online.model_copy(update={"register_every": 1})}),
    })  # fmt: skip
    config_file = write_config(cfg, root / "platform.yaml")
    stack.create_topics(cfg)

    # History up to two hours ago: the online model learns from the impressions after its
    # champion's training labels (final up to the attribution window before the history's end),
    # whose labels the fresh events close: a step or two, and a registered `speed` version.
    truth = generator.run(cfg, now=datetime.now(UTC) - timedelta(hours=2))
    speed_app.run(cfg, ["ingest"], available_now=True)
    result = train.run(spark, cfg)
    assert result.decision == "champion", result.summary()
    fresh = fresh_events(datetime.now(UTC))
    producer.produce(cfg, fresh, progress=False)
    # The speed layer's other queries start after the batch run (fewer runs of each): the
    # increments keep only the events after its horizon, the labels and the online model all.
    speed_app.run(cfg, ["ingest", "increments", "labels", "online"], available_now=True)

    before = {"impressions": truth.impressions, "clicks": truth.clicks_sent}
    added = Counter(record.event_type for record in fresh)
    artifacts = tmp_path_factory.mktemp("executed-notebooks")
    log.info("executed notebooks go to %s", artifacts)
    return SmallLake(
        cfg, config_file, {event: n + added[event] for event, n in before.items()}, before, truth.malformed, result, artifacts
    )


def execute(name: str, lake: SmallLake) -> dict[str, Any]:
    """Run a notebook headless on the lake's config, save it with its outputs, and return what
    its summary cell shows; fail on any error."""
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # The kernel imports this checkout, reads the lake's config, and starts its own Spark session
    # (not the gateway of the test process's one).
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYSPARK_GATEWAY")}
    path = [str(PROJECT_ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env.update({"LAMBDA_ML_CONFIG": str(lake.config_file), "PYTHONPATH": os.pathsep.join(path)})
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute(env=env)
    finally:
        nbformat.write(notebook, lake.artifacts / name)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert errors == [], f"{name}: {errors}"
    assert all(cell.execution_count is not None for cell in code), f"{name}: a cell did not run"
    [summary_cell] = [cell for cell in code if SUMMARY_TAG in cell.metadata.get("tags", ())]
    [shown] = [output.data["application/json"] for output in summary_cell.outputs if "application/json" in output.get("data", {})]
    return dict(shown)


@pytest.mark.integration
def test_the_lake_notebook_counts_what_was_sent(small_lake: SmallLake) -> None:
    summary = execute("lake.ipynb", small_lake)
    horizon = small_lake.result.horizon
    assert summary["horizon"] == horizon.parts
    assert summary["bronze_rows"] == summary["rows_now"] == small_lake.sent
    # Time travel: bronze at the champion's horizon holds what was sent before the batch run.
    assert summary["rows_at_horizon"] == small_lake.before_horizon
    malformed = small_lake.malformed
    assert summary["quarantined"] == sum(malformed.values()) > 0
    # Records that are no JSON and JSON that is no object are both refused as malformed JSON.
    assert summary["quarantined_by_kind"]["malformed JSON"] == malformed["not_json"] + malformed["not_object"]


@pytest.mark.integration
def test_the_models_notebook_shows_the_registry_and_the_online_model(small_lake: SmallLake, spark) -> None:  # type: ignore[no-untyped-def]
    from pyspark.sql import functions as F

    from lambda_ml.catalog import ONLINE_MODEL_TABLE

    summary = execute("models.ipynb", small_lake)
    result = small_lake.result
    champion = int(result.versions.served)
    assert summary["aliases"]["champion"] == champion
    assert summary["aliases"]["speed"] > champion  # registered by the online model after the batch run
    assert summary["versions"] >= 4  # the batch run's Spark and ONNX versions, the online model's
    online = spark.read.format("delta").load(small_lake.cfg.lake.table(*ONLINE_MODEL_TABLE))
    latest = online.orderBy(F.col("sequence").desc()).first()
    assert summary["online_rows"] == online.count() > 0
    assert summary["online_cumulative_auc"] == pytest.approx(latest["cumulative_auc"])
    # The champion's calibration bins hold its holdout rows, and their error is the run's.
    assert summary["calibration_rows"] == result.rows["holdout"]
    assert summary["ece"] == pytest.approx(result.metrics["ece"])


@pytest.mark.integration
def test_the_lambda_identity_notebook_finds_no_mismatch(small_lake: SmallLake, spark) -> None:  # type: ignore[no-untyped-def]
    summary = execute("lambda_identity.ipynb", small_lake)
    assert summary["mismatches"] == 0 and summary["compared_keys"] > 0
    # Not trivial: the fresh events reached every entity through the speed layer's increments.
    assert summary["served_horizon"] == small_lake.result.horizon.parts != summary["bronze_versions"]
    assert all(n > 0 for n in summary["increment_rows_merged"].values()), summary["increment_rows_merged"]
    impressions = spark.read.format("delta").load(small_lake.cfg.lake.table("bronze", "impressions"))
    assert summary["keys_per_entity"] == {
        "user": impressions.select("user_id").distinct().count(),
        "item": impressions.select("item_id").distinct().count(),
        "user_device": impressions.select("user_id", "device").distinct().count(),
    }
    assert summary["landed_rows"] == sum(small_lake.sent.values())
