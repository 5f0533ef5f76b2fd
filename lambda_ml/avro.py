"""Avro binary encoding of flat event records, for the platform's producers.

Events travel on Kafka as plain Avro binary (no container header, no schema-registry prefix):
the schema is agreed through ``conf/avro/<event type>.avsc``, which the speed layer hands to
``spark-avro``'s ``from_avro``. Only what the event schemas use is supported: records of
``string``, ``int``, ``long``, ``boolean``, ``double`` and ``long`` timestamps
(``timestamp-millis`` / ``timestamp-micros``, given as ISO-8601 text or ``datetime``).

>>> schema = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "string"},
...           {"name": "n", "type": "int"}]}
>>> encode({"id": "a", "n": -2}, schema)
b'\\x02a\\x03'
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lambda_ml.config import PROJECT_ROOT


class AvroEncodeError(ValueError):
    """A record does not fit its Avro schema (missing field, wrong type)."""


def schema_path(schema_dir: str | Path, event_type: str) -> Path:
    """The ``.avsc`` file of an event type, e.g. ``conf/avro/impressions.avsc``."""
    folder = Path(schema_dir)
    return (folder if folder.is_absolute() else PROJECT_ROOT / folder) / f"{event_type}.avsc"


def load_schema(path: str | Path) -> dict[str, Any]:
    schema = json.loads(Path(path).read_text())
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise ValueError(f"{path}: an event schema must be an Avro record")
    return schema


def _long(value: int) -> bytes:
    """Zig-zag then variable-length encoding of a 64-bit integer."""
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _timestamp(value: Any, unit: int) -> int:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise AvroEncodeError(f"expected a timestamp, got {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    micros = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return micros // unit


def _field(value: Any, kind: Any, name: str) -> bytes:
    logical = kind.get("logicalType") if isinstance(kind, dict) else None
    base = kind["type"] if isinstance(kind, dict) else kind
    try:
        if logical in ("timestamp-millis", "timestamp-micros"):
            return _long(_timestamp(value, 1000 if logical == "timestamp-millis" else 1))
        if base == "string" and isinstance(value, str):
            data = value.encode()
            return _long(len(data)) + data
        if base in ("int", "long") and isinstance(value, int) and not isinstance(value, bool):
            limit = 2**31 if base == "int" else 2**63
            if -limit <= value < limit:
                return _long(value)
        if base == "boolean" and isinstance(value, bool):
            return b"\x01" if value else b"\x00"
        if base == "double" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return struct.pack("<d", float(value))
    except (ValueError, OverflowError) as exc:
        raise AvroEncodeError(f"field {name}: {exc}") from None
    if base not in ("string", "int", "long", "boolean", "double"):
        raise AvroEncodeError(f"field {name}: Avro type {kind!r} is not supported")
    raise AvroEncodeError(f"field {name}: expected {base}, got {value!r}")


def encode(record: dict[str, Any], schema: dict[str, Any]) -> bytes:
    """The Avro binary encoding of ``record`` (fields in schema order)."""
    out = bytearray()
    for field in schema["fields"]:
        name = field["name"]
        if name not in record:
            raise AvroEncodeError(f"missing field: {name}")
        out += _field(record[name], field["type"], name)
    return bytes(out)
