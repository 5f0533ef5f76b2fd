"""The speed layer as one streaming application: several queries in one Spark session, each with
its own checkpoint under ``lake.checkpoints/<query>``.

- ``ingest``: Kafka -> bronze Delta, exactly once, bad records -> quarantine (:mod:`speed_layer.ingest`).
- ``increments``: the declared features on the stream, per (entity, bucket, bronze version) ->
  the increments tables the serving layer merges on top of the batch views
  (:mod:`speed_layer.increments`).
- the application's own queries (``SpeedUpdater.queries``): e.g. the CTR
  application's label join and online model, k-means' moving centres, each publishing its
  updates on the model-updates topic.

``speed.queries`` picks the queries, ``speed.trigger_seconds`` the micro-batch interval. On
SIGTERM or Ctrl-C each query is let finish the micro-batch it is running, then stopped; a
restart resumes every query from its checkpoint.

Run it with ``lambda-ml speed run`` or ``spark-submit speed_layer/app.py``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from urllib.parse import urlparse

from pyspark.sql import SparkSession
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery

from lambda_ml.apps import QueryBuilder, Trigger, load_application
from lambda_ml.config import PlatformConfig, load_config
from lambda_ml.logs import setup_logging
from lambda_ml.spark import get_spark
from speed_layer.ingest import IngestTotals
from speed_layer.monitor import ProgressReporter

log = logging.getLogger(__name__)



def _ingest(spark: SparkSession, cfg: PlatformConfig, trigger: Trigger, totals: IngestTotals | None = None) -> StreamingQuery:
    from speed_layer import ingest

    return ingest.start_ingest(spark, cfg, trigger=trigger, totals=totals)


def _increments(spark: SparkSession, cfg: PlatformConfig, trigger: Trigger) -> StreamingQuery:
    from speed_layer import increments

    return increments.start_increments(spark, cfg, trigger, load_application(cfg).features)


# The layer's own queries; the application adds its own after them (``SpeedUpdater.queries``).
LAYER_QUERIES: dict[str, QueryBuilder] = {"ingest": _ingest, "increments": _increments}


def queries(cfg: PlatformConfig) -> dict[str, QueryBuilder]:
    """Every query the speed layer can run for ``cfg``'s application, in the order they start
    (downstream queries read what upstream ones write)."""
    return {**LAYER_QUERIES, **load_application(cfg).speed.queries()}


def checkpoint(cfg: PlatformConfig, query: str) -> str:
    """The checkpoint folder of one query of the application."""
    return f"{cfg.lake.checkpoints.rstrip('/')}/{query}"


def checkpoint_query_id(spark: SparkSession, cfg: PlatformConfig, query: str) -> str | None:
    """The id of a query, from its checkpoint's metadata (kept across restarts); None before
    its first start."""
    from pyspark.errors import AnalysisException

    try:
        row = spark.read.text(f"{checkpoint(cfg, query)}/metadata").first()
    except AnalysisException:
        return None
    return None if row is None else str(json.loads(row[0]).get("id"))


class CheckpointInUse(RuntimeError):
    """Another process runs a query on the same checkpoint."""


class NothingLanded(RuntimeError):
    """An ``--available-now`` run read records from Kafka and quarantined every one of them."""


def _local_path(uri: str) -> Path | None:
    """The local file-system path of a ``file:`` URI or a plain path; None for other schemes."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else uri)
    return None


@contextmanager
def checkpoint_locks(cfg: PlatformConfig, names: Sequence[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``<checkpoint>.lock`` of each query while the block runs.

    Spark refuses a second run of a query on the same checkpoint only within one session: two
    processes would both run it, and the second one's commits clash with the first one's. Here
    the second process fails at once, naming the PID that holds the checkpoint. The lock is
    ``flock``: the kernel drops it when its holder dies, even by ``kill -9``, so a restart after
    a crash is never refused. Checkpoints on other file systems (``hdfs://``, ``s3a://``) are
    not guarded; the log says so.
    """
    with ExitStack() as held:
        for name in names:
            uri = checkpoint(cfg, name)
            path = _local_path(uri)
            if path is None:
                log.warning("query %s: checkpoint %s is not on a local file system; a second run on it is not refused", name, uri)
                continue
            lock_path = path.with_name(f"{path.name}.lock")
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            handle = held.enter_context(lock_path.open("a+"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise CheckpointInUse(
                    f"query {name}: its checkpoint {path} is in use by another speed layer (PID {holder}); "
                    "stop that one first (lambda-ml stack down stops the one the demo started)"
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        yield


def processing_trigger(cfg: PlatformConfig) -> Trigger:
    """A micro-batch every ``speed.trigger_seconds``."""
    return lambda writer: writer.trigger(processingTime=f"{cfg.speed.trigger_seconds:g} seconds")


def available_now_trigger(writer: DataStreamWriter) -> DataStreamWriter:
    """Process what the sources hold now, then stop."""
    return writer.trigger(availableNow=True)


def stop_gracefully(queries: Sequence[StreamingQuery], timeout_s: float) -> dict[str, bool]:
    """Stop each query as soon as it is between micro-batches (at most ``timeout_s`` in all).

    Returns ``{query name: True}`` for a query stopped between micro-batches, False for one the
    timeout cut short (its checkpoint replays the batch on restart and the idempotent sinks
    skip what was already written). Queries are watched together, so the wait is that of the
    slowest micro-batch, not the sum.
    """
    deadline = time.monotonic() + timeout_s
    pending = [q for q in queries if q.isActive]
    stopped: dict[str, bool] = {}
    while pending:
        for query in list(pending):
            late = time.monotonic() > deadline
            if not query.isActive or not query.status.get("isTriggerActive") or late:
                if late and query.isActive:
                    log.warning("query %s: micro-batch still running after %.0f s; stopping it anyway", query.name, timeout_s)
                query.stop()
                stopped[query.name] = not late
                log.info("query %s stopped %s", query.name, "mid-batch" if late else "between micro-batches")
                pending.remove(query)
        time.sleep(0.05)
    return stopped


def _failed(queries: Sequence[StreamingQuery]) -> StreamingQuery | None:
    return next((q for q in queries if not q.isActive and q.exception() is not None), None)


def run(cfg: PlatformConfig, names: Sequence[str] | None = None, available_now: bool = False) -> IngestTotals:
    """Run the application until SIGTERM / Ctrl-C, or, with ``available_now``, until every
    query has processed what its sources hold (one query after the other, upstream first).
    Returns what the ingest query read, landed and quarantined (zeros if it did not run).

    Raises ``RuntimeError`` if a query fails; the other queries are stopped gracefully first;
    :class:`CheckpointInUse` if another process runs one of the queries on its checkpoint;
    :class:`NothingLanded` if an ``available_now`` run read records and landed none.
    """
    names = list(names or cfg.speed.queries)
    known = queries(cfg)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown speed-layer queries {unknown}; known: {list(known)}")
    ordered = [n for n in known if n in names]
    totals = IngestTotals()
    with checkpoint_locks(cfg, ordered):
        _run(cfg, ordered, available_now, {**known, "ingest": partial(_ingest, totals=totals)})
    log.info("speed layer stopped")
    if totals.read:
        log.info("ingest: %d records read, %d landed in bronze, %d quarantined", totals.read, totals.landed, totals.quarantined)
    failure = totals.nothing_landed()
    if available_now and failure:
        raise NothingLanded(failure)
    return totals


def _run(cfg: PlatformConfig, ordered: Sequence[str], available_now: bool, builders: dict[str, QueryBuilder]) -> None:
    spark = get_spark(cfg, "speed")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping after the current micro-batches", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    queries: list[StreamingQuery] = []
    reporter = ProgressReporter(cfg)
    spark.streams.addListener(reporter)
    try:
        if available_now:
            for name in ordered:
                if stop.is_set():
                    break
                query = builders[name](spark, cfg, available_now_trigger)
                queries.append(query)
                while query.isActive and not stop.is_set():
                    query.awaitTermination(1)
                if _failed(queries) is not None:
                    break
        else:
            for name in ordered:
                queries.append(builders[name](spark, cfg, processing_trigger(cfg)))
            log.info("speed layer running: %s (every %g s)", ", ".join(ordered), cfg.speed.trigger_seconds)
            while not stop.is_set() and _failed(queries) is None:
                stop.wait(1)
        failed = _failed(queries)
        if failed is not None:
            raise RuntimeError(f"speed-layer query {failed.name} failed: {failed.exception()}")
    finally:
        stop_gracefully(queries, cfg.speed.stop_timeout_seconds)
        reporter.drain(queries)
        spark.streams.removeListener(reporter)
        reporter.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="speed_layer/app.py",
        description=(
            "The speed layer: ingest (Kafka -> bronze), feature increments, and the application's own queries "
            "(app.type), one Spark application, each query checkpointed. Stops cleanly on SIGTERM."
        ),
    )
    parser.add_argument("--config", help="platform config file (default: conf/platform.yaml)")
    parser.add_argument(
        "--query", action="append", dest="queries", metavar="QUERY",
        help="run only this query (repeatable; default: speed.queries; e.g. ingest, increments, or one of the application's)",
    )  # fmt: skip
    parser.add_argument("--available-now", action="store_true", help="process what the sources hold now, then stop")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        run(load_config(args.config), args.queries, available_now=args.available_now)
    except (CheckpointInUse, NothingLanded, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
