"""Avro binary encoding of flat event records, for the platform's producers, and its decoding,
for the consumers (the speed layer's ingest and stream scoring, through
:mod:`lambda_ml.validation`), both done by ``fastavro``.

Events travel on Kafka as plain Avro binary (no container header, no schema-registry prefix):
the schema is agreed through ``conf/avro/<event type>.avsc`` (spark-avro's ``to_avro`` writes
the same bytes, a test checks). Only what the event schemas use is supported: records of
``string``, ``int``, ``long``, ``boolean``, ``double`` and ``long`` timestamps
(``timestamp-millis`` / ``timestamp-micros``, given as ISO-8601 text or ``datetime``, decoded
as UTC ``datetime``).

Decoding is strict: the bytes must hold exactly one record, every byte used. fastavro reads
leniently (a boolean byte of 2, a variable-length integer of more than 10 bytes or past 64
bits, an int past 32 bits, bytes left over), so a decoded record that could hide one of these
is written back and must give the same bytes; one that does not is read again field by field,
to name the field and the reason, or to accept it when it only holds an integer padded past
its shortest form.

>>> schema = {"type": "record", "name": "R", "fields": [{"name": "id", "type": "string"},
...           {"name": "n", "type": "int"}]}
>>> encode({"id": "a", "n": -2}, schema)
b'\\x02a\\x03'
>>> decode(b'\\x02a\\x03', schema)
{'id': 'a', 'n': -2}
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import SchemaParseException
from fastavro.validation import ValidationError, validate

from lambda_ml.config import PROJECT_ROOT


class AvroEncodeError(ValueError):
    """A record does not fit its Avro schema (missing field, wrong type)."""


class AvroDecodeError(ValueError):
    """Bytes that are not a record of the schema: cut short, left over, or a value its type
    cannot hold; the message names the field."""


_SUPPORTED = ("string", "int", "long", "boolean", "double")
_TIMESTAMPS = ("timestamp-millis", "timestamp-micros")
_INT_RANGE = range(-(2**31), 2**31)
# fastavro misreads a variable-length integer only past 9 bytes that carry the continuation bit
# (more than 10 bytes, or bits past the 64th): bytes without such a run need no write-back.
_LONG_RUN = re.compile(rb"[\x80-\xff]{9}")
_ENDS = "the record ends inside the value"
_TOO_LONG = "a variable-length integer of more than 10 bytes"


def schema_path(schema_dir: str | Path, event_type: str) -> Path:
    """The ``.avsc`` file of an event type, e.g. ``conf/avro/impressions.avsc``."""
    folder = Path(schema_dir)
    return (folder if folder.is_absolute() else PROJECT_ROOT / folder) / f"{event_type}.avsc"


def load_schema(path: str | Path) -> dict[str, Any]:
    """The JSON of an ``.avsc`` file; ValueError unless it is an Avro record."""
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
        _parsed(schema)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"kafka.avro_schemas: cannot decode Avro {event_type} with {path}: {exc}") from exc
    return schema


def check_schema(schema: dict[str, Any]) -> None:
    """Fail (ValueError naming the field) unless every field has a type this module handles.

    >>> check_schema({"type": "record", "name": "R", "fields": [{"name": "tags", "type": {"type": "array", "items": "string"}}]})
    Traceback (most recent call last):
    ...
    ValueError: field tags: Avro type {'type': 'array', 'items': 'string'} is not supported
    """
    for field in schema.get("fields", []):
        kind = field.get("type")
        base, logical = _kind(kind) if isinstance(kind, (str, dict)) else (None, None)
        supported = logical in _TIMESTAMPS and base == "long" if logical is not None else base in _SUPPORTED
        if not supported:
            raise ValueError(f"field {field.get('name')}: Avro type {kind!r} is not supported")


@dataclass(frozen=True)
class _Schema:
    """A record schema as given, fastavro's parsed form of it and what the strict checks need."""

    source: dict[str, Any]
    parsed: Any
    timestamps: tuple[str, ...]
    ints: tuple[str, ...]
    has_boolean: bool


# Parsed schemas by the identity of the dict the caller holds: parsing costs as much as
# decoding a record, and callers pass the same dict for every record (and never change it).
_PARSED: dict[int, _Schema] = {}


def _parsed(schema: dict[str, Any]) -> _Schema:
    cached = _PARSED.get(id(schema))
    if cached is not None and cached.source is schema:
        return cached
    check_schema(schema)
    try:
        parsed = parse_schema(schema)
    except SchemaParseException as exc:
        raise ValueError(f"not a valid Avro schema: {exc}") from None
    fields = schema["fields"]
    entry = _Schema(
        source=schema,
        parsed=parsed,
        timestamps=tuple(f["name"] for f in fields if _kind(f["type"])[1] in _TIMESTAMPS),
        ints=tuple(f["name"] for f in fields if _kind(f["type"]) == ("int", None)),
        has_boolean=any(_kind(f["type"])[0] == "boolean" for f in fields),
    )
    if len(_PARSED) >= 64:  # schemas built on the fly (tests) must not pile up
        _PARSED.clear()
    _PARSED[id(schema)] = entry
    return entry


def _kind(kind: str | dict[str, Any]) -> tuple[str | None, str | None]:
    """The base type and logical type of a field type, e.g. ``("long", "timestamp-millis")``."""
    if isinstance(kind, dict):
        return kind.get("type"), kind.get("logicalType")
    return kind, None


def _write(value: Any, parsed: Any) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parsed, value)
    return out.getvalue()


def _read(data: bytes, position: int, parsed: Any) -> tuple[Any, int]:
    """The value at ``position`` and the position after it."""
    stream = io.BytesIO(data)
    stream.seek(position)
    return schemaless_reader(stream, parsed, None), stream.tell()


def _timestamp(value: Any, name: str) -> datetime:
    """A timestamp field's value as an aware datetime (naive ones are UTC: fastavro would read
    them in the machine's time zone)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise AvroEncodeError(f"field {name}: {exc}") from None
    if not isinstance(value, datetime):
        raise AvroEncodeError(f"field {name}: expected a timestamp, got {value!r}")
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def encode(record: dict[str, Any], schema: dict[str, Any]) -> bytes:
    """The Avro binary encoding of ``record`` (fields in schema order); AvroEncodeError naming
    the field when a field is missing or its value does not fit its type (no coercion: a
    ``bool`` is not an ``int``, ``"3"`` is not a number)."""
    try:
        entry = _parsed(schema)
    except ValueError as exc:
        raise AvroEncodeError(str(exc)) from None
    prepared: dict[str, Any] = {}
    for field in schema["fields"]:
        name = field["name"]
        if name not in record:
            raise AvroEncodeError(f"missing field: {name}")
        prepared[name] = _timestamp(record[name], name) if name in entry.timestamps else record[name]
    try:
        validate(prepared, entry.parsed, raise_errors=True)
    except ValidationError as exc:
        error = exc.errors[0]
        name = str(error.field).rsplit(".", 1)[-1]
        raise AvroEncodeError(f"field {name}: expected {error.schema}, got {error.datum!r}") from None
    return _write(prepared, entry.parsed)


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
    >>> decode(b"\\x02\\x02", schema)
    Traceback (most recent call last):
    ...
    lambda_ml.avro.AvroDecodeError: field ok: boolean byte 2, not 0 or 1
    """
    try:
        entry = _parsed(schema)
    except ValueError as exc:
        raise AvroDecodeError(str(exc)) from None
    record: dict[str, Any]
    try:
        record, end = _read(data, 0, entry.parsed)
    except (EOFError, IndexError, ValueError, OverflowError, TypeError):
        raise _explain(data, schema) or AvroDecodeError("the bytes are not the Avro encoding of one record") from None
    exact = end == len(data) and all(record[name] in _INT_RANGE for name in entry.ints)
    if exact and (entry.has_boolean or _LONG_RUN.search(data)):
        exact = _write(record, entry.parsed) == data
    if exact:
        return record
    problem = _explain(data, schema)
    if problem is not None:
        raise problem
    return record  # a variable-length integer longer than it needs to be, which Avro allows


def _explain(data: bytes, schema: dict[str, Any]) -> AvroDecodeError | None:
    """Why ``data`` is not exactly one record of ``schema``: the first field that does not read,
    or the bytes left after the last one; None when it is one."""
    position = 0
    for field in schema["fields"]:
        reason, position = _check_field(data, position, field["type"])
        if reason is not None:
            return AvroDecodeError(f"field {field['name']}: {reason}")
    if position != len(data):
        return AvroDecodeError(f"{len(data) - position} byte(s) left after the last field ({schema['fields'][-1]['name']})")
    return None


def _check_field(data: bytes, position: int, kind: str | dict[str, Any]) -> tuple[str | None, int]:
    """What is wrong with the value of type ``kind`` at ``position`` (None: nothing), and the
    position after it."""
    base, logical = _kind(kind)
    if base == "boolean":
        if position >= len(data):
            return _ENDS, position
        if data[position] not in (0, 1):
            return f"boolean byte {data[position]}, not 0 or 1", position
        return None, position + 1
    if base == "double":
        return (_ENDS, position) if position + 8 > len(data) else (None, position + 8)
    # int, long, the timestamps and a string's length: a zig-zag variable-length integer.
    try:
        number, end = _read(data, position, "long")
    except (EOFError, IndexError):
        continued = next((n for n, byte in enumerate(data[position:]) if not byte & 0x80), len(data) - position)
        return (_TOO_LONG if continued >= 10 else _ENDS), position
    if end - position > 10:
        return _TOO_LONG, position
    if end - position == 10 and data[end - 1] > 1:  # bits past the 64th, which fastavro drops
        return "a variable-length integer that does not fit a long", position
    if logical is not None:
        try:
            _read(data, position, parse_schema(kind))
        except (OverflowError, ValueError):
            return f"timestamp {number} ({logical}) is out of range", position
    if base == "int" and number not in _INT_RANGE:
        return f"{number} does not fit an int", position
    if base != "string":
        return None, end
    if number < 0 or end + number > len(data):
        return f"a string of {number} byte(s) with {len(data) - end} left", position
    try:
        _read(data, position, "string")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 ({exc.reason})", position
    return None, end + number
