"""Event types, as the config declares them (``events.types``), and the lake tables they land in.

Events are JSON objects (or Avro records) on Kafka, one topic per event type, each with an
``event_id`` and an ``event_time`` (ISO-8601 with a time zone, ``2026-11-22T08:00:00.123Z``)
besides its own fields. Bronze tables keep every
valid event with its Kafka topic, partition, offset and record timestamp; the quarantine table
keeps the raw bytes of everything else with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyspark.sql.types import (
    BinaryType,
    DataType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

if TYPE_CHECKING:
    from lambda_ml.config import PlatformConfig


@dataclass(frozen=True)
class EventField:
    name: str
    kind: str  # "string" | "int" | "double" | "timestamp"

    @property
    def spark_type(self) -> DataType:
        kinds: dict[str, DataType] = {"string": StringType(), "int": IntegerType(), "double": DoubleType(), "timestamp": TimestampType()}
        return kinds[self.kind]


@dataclass(frozen=True)
class EventType:
    name: str
    fields: tuple[EventField, ...]

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def bronze_schema(self) -> StructType:
        """Schema of this event type's bronze Delta table."""
        return StructType(
            [StructField(f.name, f.spark_type, nullable=False) for f in self.fields] + list(KAFKA_COLUMNS.fields)
        )


def event_types(cfg: PlatformConfig) -> dict[str, EventType]:
    """The declared event types (``events.types``), by name, fields in declaration order."""
    return {
        name: EventType(name, tuple(EventField(field, kind) for field, kind in declared.fields.items()))
        for name, declared in cfg.events.types.items()
    }


def event_type(cfg: PlatformConfig, name: str) -> EventType:
    """One declared event type; ValueError naming the key when it is not declared."""
    types = event_types(cfg)
    if name not in types:
        raise ValueError(f"events.types: the event type {name!r} is not declared (declared: {', '.join(types)})")
    return types[name]


# Lineage columns every bronze row carries: where in Kafka it came from and when it landed.
KAFKA_COLUMNS = StructType(
    [
        StructField("kafka_topic", StringType(), nullable=False),
        StructField("kafka_partition", IntegerType(), nullable=False),
        StructField("kafka_offset", LongType(), nullable=False),
        StructField("kafka_timestamp", TimestampType(), nullable=True),
        StructField("ingested_at", TimestampType(), nullable=False),
    ]
)

QUARANTINE_SCHEMA = StructType(
    [
        StructField("kafka_topic", StringType(), nullable=False),
        StructField("kafka_partition", IntegerType(), nullable=False),
        StructField("kafka_offset", LongType(), nullable=False),
        StructField("kafka_timestamp", TimestampType(), nullable=True),
        StructField("raw_value", BinaryType(), nullable=True),
        StructField("reason", StringType(), nullable=False),
        StructField("ingested_at", TimestampType(), nullable=False),
    ]
)
