"""Stream scoring: impressions read from a Kafka topic are scored and written to the predictions
topic, with the service's own model store, view merge and policies (``score_rows``, the
function behind ``POST /predict``), so a row gets the same probability from both.

Delivery is **at least once**: a batch's predictions are sent and acknowledged by the broker
(``acks=all``) before the consumer group commits the batch's offsets. A crash between the two
re-scores that batch on restart, so a prediction may be written twice; records are keyed by the
impression's event id, and ``lambda-ml batch evaluate`` keeps one per (event id, version).
It is not exactly once: the scores would have to be written in a Kafka transaction with the
offsets, which kafka-python does not offer here.

Impressions are read in the encoding ``events.types.impressions.topic.format`` declares: JSON, or
Avro binary with the schema in ``kafka.avro_schemas`` (decoded by ``lambda_ml.avro``, the
module the producers encode with). SIGTERM or Ctrl-C lets the batch in hand finish (sent, then
committed) before the process exits 0.

Each impression is scored at its own event time with the events strictly before it: a backlog
sees no later event, its bucket's part before it read from bronze once per bucket
(``serving_layer.lake_events``). If bronze cannot be read, the process exits 1 without
committing the batch in hand.

A record that is not a valid impression (it does not decode, or a field is wrong) is skipped,
counted and logged with its partition, offset and reason, in the words of the speed layer's
quarantine (both apply ``lambda_ml.validation``, time bounds against the Kafka record time
included); it never stops the stream.

Run it with ``lambda-ml serve stream`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from lambda_ml import avro, validation
from lambda_ml.config import ConfigError, PlatformConfig, load_command_config
from lambda_ml.logs import setup_logging
from lambda_ml.schemas import event_type
from lambda_ml_apps.ctr.api_models import PredictRow, row_type_with_limits

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0


@dataclass
class StreamProgress:
    """What the scorer has done since it started."""

    read: int = 0
    scored: int = 0
    invalid: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"read {self.read} impression(s), scored {self.scored} ({self.scored / elapsed:.0f}/s), "
            f"skipped {self.invalid} invalid, {self.batches} batch(es) committed"
        )


def describe_error(exc: ValidationError) -> str:
    """One line naming each bad field of an impression."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors())


class StreamScorer:
    """Scores batches of impression records with the service's code; ``run`` loops on Kafka."""

    def __init__(
        self,
        cfg: PlatformConfig,
        *,
        policy: str | None = None,
        input_topic: str | None = None,
        input_format: str | None = None,
        output_topic: str | None = None,
        group_id: str = "lambda-ml-stream-scoring",
        batch_size: int = 500,
        models: Any = None,
        views: Any = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        from lambda_ml_apps.ctr.serving import CtrServingModels
        from serving_layer.model_store import ModelStore
        from lambda_ml_apps.ctr.policies import PolicyRunner
        from serving_layer.views import ViewStore

        self.cfg = cfg
        self.policy = policy or cfg.serving.policy
        self.input_topic = input_topic or cfg.events.topic("impressions").name
        self.output_topic = output_topic or cfg.kafka.topics.predictions.name
        self.group_id, self.batch_size, self.clock = group_id, batch_size, clock
        self.models = models if models is not None else ModelStore.from_config(cfg, CtrServingModels())
        self.views = views if views is not None else ViewStore.from_config(cfg)
        self.runner = PolicyRunner(cfg.serving.consensus, cfg.serving.deadline_ms / 1000, cfg.serving.prior_probability)
        self.progress = StreamProgress()
        self.input_format = input_format or cfg.events.topic("impressions").format
        self.event_type = event_type(cfg, "impressions")
        self.schema: dict[str, Any] | None = None  # the Avro schema of an Avro input topic
        self.rules = validation.EventRules.from_config(cfg)
        self.row_type = row_type_with_limits(cfg.events.max_string_length)
        if self.input_format == "avro":
            self.schema = avro.event_schema(cfg.kafka.avro_schemas, "impressions")
        elif self.input_format != "json":
            raise ValueError(f"unknown input format {self.input_format!r}: expected json or avro")

    def parse(self, value: bytes | None, record_time: datetime | None = None) -> PredictRow | str:
        """One impression record as a request row, or the reason it is skipped: the speed
        layer's own checks (``lambda_ml.validation``, the same words as its quarantine), then
        the request model's (e.g. ``position`` at least 1). ``record_time``: the Kafka record
        time (default: the scorer's clock)."""
        event = validation.check_record(self.event_type, value, record_time or self.clock(), self.rules, self.schema)
        if isinstance(event, str):
            return event
        try:
            return self.row_type.model_validate(event)
        except ValidationError as exc:
            return f"not a valid impression: {describe_error(exc)}"

    def score(self, values: Sequence[tuple[str, bytes | None] | tuple[str, bytes | None, datetime | None]]) -> list[dict[str, Any]]:
        """Prediction-log records (``source`` "stream") for the valid impressions among
        ``values`` ((where, raw value[, Kafka record time]) tuples); invalid ones are logged,
        counted and skipped."""
        from lambda_ml_apps.ctr.answers import predict_response
        from lambda_ml_apps.ctr.predict import prediction_records, score_rows

        rows: list[PredictRow] = []
        for where, value, *record_time in values:
            parsed = self.parse(value, record_time[0] if record_time else None)
            if isinstance(parsed, str):
                self.progress.invalid += 1
                log.warning("skipped the record at %s: %s", where, parsed)
            else:
                rows.append(parsed)
        self.progress.read += len(values)
        if not rows:
            return []
        served, views = self.models.get(), self.views.get()
        now = self.clock()
        records: list[dict[str, Any]] = []
        step = self.cfg.serving.max_rows
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            scored = score_rows(
                chunk, served, views, self.cfg.features, now, self.runner, self.policy, None, self.cfg.serving.ab,
                uuid.uuid4().hex,
            )  # fmt: skip
            predict_response(scored)  # checked as /predict checks its answers (a probability outside [0, 1] raises)
            records += prediction_records(scored, self.cfg.mlflow.registered_model, now, "stream")
        self.progress.scored += len(records)
        return records

    def wait_until_ready(self, stop: threading.Event) -> bool:
        """Block until a model and the views are loaded (or ``stop``); True when ready."""
        from serving_layer.reloadable import NotReadyError

        while not stop.is_set():
            try:
                self.models.get()
                self.views.get()
                return True
            except NotReadyError as exc:
                log.warning("not ready to score yet (%s); retrying", exc)
                stop.wait(5)
        return False

    def run(self, stop: threading.Event, idle_stop_s: float | None = None) -> StreamProgress:
        """Consume, score, send, commit until ``stop`` is set (or nothing arrived for
        ``idle_stop_s`` seconds). The batch in hand always finishes before returning."""
        from kafka import KafkaConsumer, KafkaProducer

        from serving_layer.prediction_log import record_key, record_value
        from serving_layer.reloadable import Poller

        poller = Poller([(self.models, self.cfg.serving.poll_interval_s), (self.views, self.cfg.serving.views_refresh_s)])
        if not self.wait_until_ready(stop):
            return self.progress
        poller.start()
        servers = self.cfg.kafka.bootstrap_servers
        consumer = KafkaConsumer(
            self.input_topic, bootstrap_servers=servers, group_id=self.group_id, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.batch_size,
        )  # fmt: skip
        producer = KafkaProducer(bootstrap_servers=servers, acks="all", linger_ms=20)
        log.info("scoring %s (%s) into %s with the %s policy (consumer group %s)", self.input_topic, self.input_format,
                 self.output_topic, self.policy, self.group_id)  # fmt: skip
        last_record = last_report = time.monotonic()
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=500)
                batch = [
                    (f"{r.topic}/{r.partition}@{r.offset}", r.value, _record_time(r.timestamp))
                    for records in polled.values()
                    for r in records
                ]
                now = time.monotonic()
                if batch:
                    last_record = now
                    futures = [
                        producer.send(self.output_topic, key=record_key(rec), value=record_value(rec))
                        for rec in self.score(batch)
                    ]
                    producer.flush()
                    for future in futures:
                        future.get(timeout=30)  # raises if a prediction was not written: no commit
                    consumer.commit()
                    self.progress.batches += 1
                elif idle_stop_s is not None and now - last_record >= idle_stop_s:
                    log.info("nothing new on %s for %.0f s: stopping", self.input_topic, idle_stop_s)
                    break
                if now - last_report >= PROGRESS_EVERY_S:
                    log.info("stream scoring: %s", self.progress.line())
                    last_report = now
        finally:
            poller.stop()
            producer.close(timeout=10)
            consumer.close()
            self.runner.close()
            log.info("stream scoring stopped: %s", self.progress.line())
        return self.progress


def _record_time(timestamp_ms: int | None) -> datetime | None:
    """A Kafka record's timestamp (ms since the epoch; -1 or None when it has none)."""
    return None if timestamp_ms is None or timestamp_ms < 0 else datetime.fromtimestamp(timestamp_ms / 1000, UTC)


def build_parser(prog: str = "python -m lambda_ml_apps.ctr.stream") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Score impressions from a Kafka topic into the predictions topic, with the prediction service's "
            "model store, view merge and policies. At least once: predictions are acknowledged by the broker "
            "before the input offsets are committed. SIGTERM finishes the batch in hand, then exits 0."
        ),
    )
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-topic", help="topic of impressions (default: events.types.impressions.topic.name)")
    parser.add_argument("--input-format", choices=("json", "avro"),
                        help="encoding of the input topic's records (default: events.types.impressions.topic.format; "
                        "Avro with the schema kafka.avro_schemas/impressions.avsc)")  # fmt: skip
    parser.add_argument("--output-topic", help="topic the predictions go to (default: kafka.topics.predictions.name)")
    parser.add_argument("--policy", choices=("champion", "latest", "quality", "consensus", "deadline", "ab"),
                        help="serving policy (default: serving.policy)")  # fmt: skip
    parser.add_argument("--group", default="lambda-ml-stream-scoring", help="Kafka consumer group; offsets are committed there")
    parser.add_argument("--batch-size", type=int, default=500, help="most records scored per batch (default: 500)")
    parser.add_argument("--stop-when-idle", type=float, metavar="SECONDS",
                        help="stop once no record arrived for this long (default: run until SIGTERM)")  # fmt: skip


def run_from_args(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    """Run the scorer as the CLI asked, stopping cleanly on SIGTERM/SIGINT."""
    if args.batch_size <= 0:
        print(f"error: --batch-size must be positive, not {args.batch_size}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _: Any) -> None:
        log.info("%s received: finishing the batch in hand", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        scorer = StreamScorer(
            cfg, policy=args.policy, input_topic=args.input_topic, input_format=args.input_format,
            output_topic=args.output_topic, group_id=args.group, batch_size=args.batch_size,
        )  # fmt: skip
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from serving_layer.lake_events import LakeEventsError

    try:
        scorer.run(stop, args.stop_when_idle)
    except LakeEventsError as exc:
        log.error("stream scoring stopped without committing the batch in hand: %s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--config", metavar="FILE", help="platform config (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_command_config(args.config)
    if cfg is None:
        return 2
    return run_from_args(cfg, args)


if __name__ == "__main__":
    sys.exit(main())
