"""Avro binary encoding of flat event records, for the platform's producers, and its decoding,
for the consumers (the speed layer's ingest and stream scoring, through
:mod:`lambda_ml.validation`).

Events travel on Kafka as plain Avro binary (no container header, no schema-registry prefix):
the schema is agreed through ``conf/avro/<event type>.avsc`` (spark-avro's ``to_avro`` writes
the same bytes, a test checks). Only what the event schemas use is supported: records of
``string``, ``int``, ``long``, ``boolean``, ``double`` and ``long`` timestamps
(``timestamp-millis`` / ``timestamp-micros``, given as ISO-8601 text or ``datetime``, decoded
as UTC ``datetime``).

>>> schema = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "string"},
...           {"name": "n", "type": "int"}]}
>>> encode({"id": "a", "n": -2}, schema)
b'\\x02a\\x03'
>>> decode(b'\\x02a\\x03', schema)
{'id': 'a', 'n': -2}
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta
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


def event_schema(schema_dir: str | Path, event_type: str) -> dict[str, Any]:
    """The checked schema of an event type's Avro topic; ConfigError (naming the key, the file
    and the field) when it is unreadable or has a type :func:`decode` does not handle."""
    from lambda_ml.config import ConfigError

    path = schema_path(schema_dir, event_type)
    try:
        schema = load_schema(path)
        check_schema(schema)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"kafka.avro_schemas: cannot decode Avro {event_type} with {path}: {exc}") from exc
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


class AvroDecodeError(ValueError):
    """Bytes that are not a record of the schema: cut short, left over, or a value its type
    cannot hold; the message names the field."""


_SUPPORTED = ("string", "int", "long", "boolean", "double")
_TIMESTAMP_UNITS = {"timestamp-millis": 1000, "timestamp-micros": 1}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def check_schema(schema: dict[str, Any]) -> None:
    """Fail (ValueError naming the field) unless every field has a type this module handles.

    >>> check_schema({"type": "record", "name": "R", "fields": [{"name": "tags", "type": {"type": "array", "items": "string"}}]})
    Traceback (most recent call last):
    ...
    ValueError: field tags: Avro type {'type': 'array', 'items': 'string'} is not supported
    """
    for field in schema.get("fields", []):
        kind = field.get("type")
        logical = kind.get("logicalType") if isinstance(kind, dict) else None
        base = kind.get("type") if isinstance(kind, dict) else kind
        supported = logical in _TIMESTAMP_UNITS and base == "long" if logical is not None else base in _SUPPORTED
        if not supported:
            raise ValueError(f"field {field.get('name')}: Avro type {kind!r} is not supported")


def decode(data: bytes, schema: dict[str, Any]) -> dict[str, Any]:
    """The record ``data`` holds in Avro binary with ``schema`` (see :func:`encode`); raises
    AvroDecodeError when the bytes do not hold exactly one such record.

    >>> schema = {"type": "record", "name": "R", "fields": [{"name": "at", "type": {"type": "long",
    ...           "logicalType": "timestamp-millis"}}, {"name": "ok", "type": "boolean"}]}
    >>> decode(encode({"at": "2026-11-22T10:00:00.250Z", "ok": True}, schema), schema)
    {'at': datetime.datetime(2026, 11, 22, 10, 0, 0, 250000, tzinfo=datetime.timezone.utc), 'ok': True}
    >>> decode(b"\\x80", schema)
    Traceback (most recent call last):
    ...
    lambda_ml.avro.AvroDecodeError: field at: the record ends inside the value
    """
    record: dict[str, Any] = {}
    position = 0
    for field in schema["fields"]:
        name = field["name"]
        record[name], position = _read_field(data, position, field["type"], name)
    if position != len(data):
        raise AvroDecodeError(f"{len(data) - position} byte(s) left after the last field ({schema['fields'][-1]['name']})")
    return record


def _read_long(data: bytes, position: int, name: str) -> tuple[int, int]:
    """A zig-zag variable-length integer and the position after it."""
    n = shift = 0
    while True:
        if position >= len(data):
            raise AvroDecodeError(f"field {name}: the record ends inside the value")
        byte = data[position]
        position += 1
        n |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift >= 70:
            raise AvroDecodeError(f"field {name}: a variable-length integer of more than 10 bytes")
    value = (n >> 1) ^ -(n & 1)
    if not -(2**63) <= value < 2**63:
        raise AvroDecodeError(f"field {name}: {value} does not fit a long")
    return value, position


def _read_field(data: bytes, position: int, kind: Any, name: str) -> tuple[Any, int]:
    logical = kind.get("logicalType") if isinstance(kind, dict) else None
    base = kind["type"] if isinstance(kind, dict) else kind
    if logical in _TIMESTAMP_UNITS:
        value, position = _read_long(data, position, name)
        try:
            return _EPOCH + timedelta(microseconds=value * _TIMESTAMP_UNITS[logical]), position
        except OverflowError:
            raise AvroDecodeError(f"field {name}: timestamp {value} ({logical}) is out of range") from None
    if base in ("int", "long"):
        value, position = _read_long(data, position, name)
        if base == "int" and not -(2**31) <= value < 2**31:
            raise AvroDecodeError(f"field {name}: {value} does not fit an int")
        return value, position
    if base == "string":
        length, position = _read_long(data, position, name)
        if length < 0 or position + length > len(data):
            raise AvroDecodeError(f"field {name}: a string of {length} byte(s) with {len(data) - position} left")
        try:
            return data[position : position + length].decode(), position + length
        except UnicodeDecodeError as exc:
            raise AvroDecodeError(f"field {name}: not UTF-8 ({exc.reason})") from None
    if base == "boolean":
        if position >= len(data):
            raise AvroDecodeError(f"field {name}: the record ends inside the value")
        if data[position] not in (0, 1):
            raise AvroDecodeError(f"field {name}: boolean byte {data[position]}, not 0 or 1")
        return data[position] == 1, position + 1
    if base == "double":
        if position + 8 > len(data):
            raise AvroDecodeError(f"field {name}: the record ends inside the value")
        return struct.unpack_from("<d", data, position)[0], position + 8
    raise AvroDecodeError(f"field {name}: Avro type {kind!r} is not supported")
