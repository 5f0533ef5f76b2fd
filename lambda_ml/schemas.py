"""Event schemas of the click-through application and the lake tables they land in.

Events are JSON objects on Kafka, one topic per event type:

- ``impressions``: ``{"event_id", "event_time", "user_id", "item_id", "device", "position"}``
- ``clicks``: ``{"event_id", "impression_id", "event_time"}``

``event_time`` is ISO-8601 in UTC (``2026-11-22T08:00:00.123Z``). Bronze tables keep every
valid event with its Kafka topic, partition, offset and record timestamp; the quarantine table
keeps the raw bytes of everything else with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql.types import (
    BinaryType,
    DataType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)


@dataclass(frozen=True)
class EventField:
    name: str
    kind: str  # "string" | "int" | "timestamp"

    @property
    def spark_type(self) -> DataType:
        return {"string": StringType(), "int": IntegerType(), "timestamp": TimestampType()}[self.kind]


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


IMPRESSION = EventType(
    "impressions",
    (
        EventField("event_id", "string"),
        EventField("event_time", "timestamp"),
        EventField("user_id", "string"),
        EventField("item_id", "string"),
        EventField("device", "string"),
        EventField("position", "int"),
    ),
)
CLICK = EventType(
    "clicks",
    (
        EventField("event_id", "string"),
        EventField("impression_id", "string"),
        EventField("event_time", "timestamp"),
    ),
)
EVENT_TYPES: dict[str, EventType] = {e.name: e for e in (IMPRESSION, CLICK)}

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

# Devices the generator emits; the model one-hot encodes them and treats others as unknown.
DEVICES = ("mobile", "desktop", "tablet")
