"""The prediction log: one record per scored row on ``kafka.topics.predictions``, so that joining
it with the outcomes that follow gives live metrics per model version (the CTR
application's ``lambda-ml batch evaluate``).

A record is a JSON object the application builds (keyed by the event id when the request gave
one, else the request id), with at least ``request_id``, ``event_id``, ``event_time`` (the
row's, or null when scored at ``scored_at``), ``scored_at``, ``registered_model``, ``policy``,
``version`` (the one version that answered, null when several did: ``versions`` names them
all) and ``source``. The CTR application's records are described in
``lambda_ml_apps.ctr.predict``.

The service never waits for Kafka: :class:`PredictionLog` queues records in a bounded buffer
and a background thread sends them. With Kafka down the producer keeps what it holds and
retries; once the buffer is full, new records are dropped and counted (``/metrics``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from serving_layer.reloadable import BackgroundLoop

log = logging.getLogger(__name__)

# The fields of a record, in order; the evaluation job reads the same names.
RECORD_FIELDS = (
    "request_id", "event_id", "user_id", "item_id", "device", "position", "event_time", "scored_at",
    "registered_model", "policy", "arm", "version", "versions", "probability", "source",
)  # fmt: skip


def record_key(record: Mapping[str, Any]) -> bytes:
    """The Kafka key of a record: its event id if any, else its request id.

    >>> record_key({"event_id": None, "request_id": "r1"}), record_key({"event_id": "imp-1", "request_id": "r1"})
    (b'r1', b'imp-1')
    """
    return str(record.get("event_id") or record["request_id"]).encode()


def record_value(record: Mapping[str, Any]) -> bytes:
    """A record as compact JSON, times in ISO-8601.

    >>> from datetime import UTC, datetime
    >>> record_value({"event_time": datetime(2026, 1, 1, tzinfo=UTC), "version": 3})
    b'{"event_time":"2026-01-01T00:00:00+00:00","version":3}'
    """
    return json.dumps(
        {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()}, separators=(",", ":")
    ).encode()


class PredictionLog(BackgroundLoop):
    """Sends records to ``topic`` from a background thread; ``submit`` never blocks."""

    thread_name = "prediction-log"

    def __init__(self, bootstrap_servers: str, topic: str, buffer_size: int = 100_000, linger_ms: int = 50) -> None:
        super().__init__()
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.buffer_size, self.linger_ms = buffer_size, linger_ms
        self._queue: deque[Mapping[str, Any]] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.sent = 0  # acknowledged by the broker
        self.dropped = 0  # refused because the buffer was full
        self.failed = 0  # handed to the producer but never acknowledged (delivery timed out)
        self.connected: bool | None = False  # None: no producer yet (Kafka unreachable at start)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Queue records to send; those beyond the buffer are dropped and counted."""
        room = self.buffer_size - len(self._queue)
        if room < len(records):
            with self._lock:
                self.dropped += len(records) - max(room, 0)
            records = records[: max(room, 0)]
        self._queue.extend(records)
        self._wake.set()

    def _acked(self, _: Any) -> None:
        with self._lock:
            self.sent += 1

    def _lost(self, exc: BaseException) -> None:
        with self._lock:
            self.failed += 1
        log.debug("a prediction record was not delivered: %s", exc)

    def _producer(self) -> Any:
        from kafka import KafkaProducer

        return KafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            linger_ms=self.linger_ms,
            acks=1,
            # The constructor waits this long for a broker; it then fails and is retried.
            bootstrap_timeout_ms=2000,
            # send() waits at most this long for metadata or buffer space; the record then goes
            # back to the queue, so a broker outage costs only the background thread's time.
            max_block_ms=2000,
            # A record the producer holds is retried until then, covering a broker restart.
            delivery_timeout_ms=300_000,
            reconnect_backoff_max_ms=2000,
        )

    def _send_queued(self, producer: Any) -> None:
        from kafka.errors import KafkaTimeoutError

        while self._queue and not self._stop.is_set():
            record = self._queue.popleft()
            try:
                future = producer.send(self.topic, key=record_key(record), value=record_value(record))
            except KafkaTimeoutError:
                self._queue.appendleft(record)  # no metadata or no buffer space: Kafka is down
                if self.connected:
                    log.warning("prediction log: Kafka at %s does not answer; %d record(s) wait", self.bootstrap_servers, self.queued)
                self.connected = False
                self._stop.wait(1)
                return
            future.add_callback(self._acked)
            future.add_errback(self._lost)
            if not self.connected:
                log.info("prediction log: sending to %s on %s", self.topic, self.bootstrap_servers)
                self.connected = True

    def _run(self) -> None:
        producer = None
        while not self._stop.is_set():
            try:
                if producer is None:
                    producer = self._producer()
                self._wake.wait(0.5)
                self._wake.clear()
                self._send_queued(producer)
            except Exception as exc:  # noqa: BLE001 - Kafka down at start: retry; requests go on
                # Once, not every 2 s: Kafka being down is reported by the service's probe.
                if self.connected is not None:
                    log.warning("prediction log: Kafka at %s unavailable (%s); retrying", self.bootstrap_servers, exc)
                self.connected = None
                self._stop.wait(2)
        if producer is not None:
            try:
                self._send_queued_on_stop(producer)
            finally:
                producer.close(timeout=5)

    def _send_queued_on_stop(self, producer: Any) -> None:
        """Hand what is queued to the producer and wait a little for it to be sent."""
        from kafka.errors import KafkaError

        try:
            while self._queue:
                record = self._queue.popleft()
                future = producer.send(self.topic, key=record_key(record), value=record_value(record))
                future.add_callback(self._acked)
                future.add_errback(self._lost)
            producer.flush(timeout=5)
        except KafkaError as exc:
            log.warning("prediction log: %d record(s) not sent at shutdown: %s", self.queued + 1, exc)

    def counts(self) -> Iterable[tuple[str, int]]:
        return (("sent", self.sent), ("dropped", self.dropped), ("failed", self.failed))
