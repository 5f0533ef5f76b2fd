"""Sending events to their topics as a producer would: each record in its topic's format (JSON
as it is, or Avro with the schema in ``conf/``). The demos, the benchmarks and the tests send
their generated events through it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lambda_ml import avro
from lambda_ml.config import PlatformConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One Kafka record: event type (= topic key in config), key and JSON value bytes."""

    event_type: str
    key: bytes
    value: bytes


def iso(ts: datetime) -> str:
    """UTC ISO-8601 with milliseconds and a Z.

    >>> iso(datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC))
    '2026-01-02T03:04:05.678Z'
    """
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def wire_value(record: Record, schema: dict[str, Any] | None) -> bytes:
    """The bytes sent for a record: its JSON as it is, or, for a topic in Avro (``schema``
    given), its Avro encoding. A record that does not fit the schema (the malformed ones) is
    sent as it is, so that the speed layer quarantines it as undecodable."""
    if schema is None or not record.value:
        return record.value
    try:
        payload = json.loads(record.value)
        return avro.encode(payload, schema) if isinstance(payload, dict) else record.value
    except (ValueError, avro.AvroEncodeError):
        return record.value


def produce(cfg: PlatformConfig, records: list[Record], progress: bool = True) -> int:
    """Send records to their topics with kafka-python, each in its topic's format (JSON or
    Avro); return the number acknowledged."""
    from kafka import KafkaProducer

    topics = cfg.events.topics()
    schemas = {
        name: avro.load_schema(avro.schema_path(cfg.kafka.avro_schemas, name)) if topic.format == "avro" else None
        for name, topic in topics.items()
    }
    compression = None if cfg.generator.compression == "none" else cfg.generator.compression
    producer = KafkaProducer(
        bootstrap_servers=cfg.kafka.bootstrap_servers,
        compression_type=compression,
        acks="all",
        linger_ms=20,
        batch_size=256 * 1024,
    )
    try:
        step = max(1, len(records) // 10)
        for i, record in enumerate(records, 1):
            producer.send(topics[record.event_type].name, key=record.key, value=wire_value(record, schemas[record.event_type]))
            if progress and i % step == 0:
                log.info("produced %d/%d records (%d%%)", i, len(records), 100 * i // len(records))
        producer.flush()
    finally:
        producer.close()
    return len(records)
