"""The one event validator: a Kafka record's bytes -> the typed event, or the reason it is refused.

The speed layer's ingest (quarantine reasons), stream scoring (skipped records) and the
prediction service's request model (422 messages) all apply these rules, so a value is refused
with the same words everywhere:

- **One JSON object per record**, strict RFC 8259: valid UTF-8, double-quoted keys and
  strings, no ``NaN``/``Infinity``, no duplicate keys, nothing but whitespace after the object
  (a second object or trailing bytes are refused, never half-read). Avro topics decode with
  :mod:`lambda_ml.avro` (exactly one record, every byte used) and then pass the same field and
  time checks.
- **Sizes**: a record is at most ``events.max_record_bytes`` bytes, a string field at most
  ``events.max_string_length`` characters.
- **Strict types, no coercion**: a string field must be a JSON string (not blank, no lone
  surrogate); an int field a JSON integer that fits 32 bits (``"2"``, ``2.0`` and ``true`` are
  refused); a double a finite JSON number; a timestamp an ISO-8601 *string* with seconds and a time zone,
  ``2026-11-22T08:00:00.123Z`` or ``...+01:00`` (at most microseconds; ``12345`` is refused).
- **Unknown fields are ignored**, however deeply nested: a producer that adds a field keeps its
  events flowing (a record nested too deep for the C parser is parsed again iteratively).
- **Time bounds**: ``event_time`` before ``speed.min_event_date`` is absurd; ``event_time``
  ahead of the Kafka record time by more than ``speed.max_future_minutes`` is refused, so one
  producer with a wrong clock cannot move the streaming watermark past everybody's events.

>>> from lambda_ml.schemas import EventField, EventType
>>> CLICK = EventType("clicks", (EventField("event_id", "string"), EventField("impression_id", "string"),
...                              EventField("event_time", "timestamp")))
>>> rules = EventRules()
>>> at = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
>>> check_record(CLICK, b'{"event_id": "c1", "impression_id": "i1", "event_time": "2026-11-22T07:59:00Z", "x": [[1]]}', at, rules)
{'event_id': 'c1', 'impression_id': 'i1', 'event_time': datetime.datetime(2026, 11, 22, 7, 59, tzinfo=datetime.timezone.utc)}
>>> check_record(CLICK, b'{"event_id": "c1", "impression_id": 7, "event_time": "2026-11-22T07:59:00Z"}', at, rules)
'bad value for impression_id: expected a string, got 7'
>>> check_record(CLICK, b'{"event_id": "c1", "impression_id": "i1", "event_time": "2026-11-22T18:00:00Z"}', at, rules)
'event_time 10:00:00 ahead of the Kafka record time (limit 5 minutes)'
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from json.decoder import WHITESPACE, scanstring  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any

from lambda_ml import avro
from lambda_ml.config import EventsConfig, SpeedConfig

if TYPE_CHECKING:
    from lambda_ml.config import PlatformConfig
    from lambda_ml.schemas import EventField, EventType

EVENT_TIME = "event_time"  # the field the time bounds apply to
# The config's defaults (conf/platform.yaml comments them), for callers without a config.
DEFAULT_MAX_RECORD_BYTES: int = EventsConfig.model_fields["max_record_bytes"].default
DEFAULT_MAX_STRING_LENGTH: int = EventsConfig.model_fields["max_string_length"].default
DEFAULT_MAX_FUTURE_MINUTES: float = SpeedConfig.model_fields["max_future_minutes"].default
DEFAULT_MIN_EVENT_DATE: date = SpeedConfig.model_fields["min_event_date"].default
INT_RANGE = (-(2**31), 2**31 - 1)  # bronze stores ints as 32-bit integers
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})")
_SHOWN = 40  # characters of a refused string quoted in a reason
EXPECTED = {
    "string": "a string",
    "int": "an integer",
    "double": "a finite number",
    "timestamp": "an ISO-8601 timestamp string with a time zone",
}


class InvalidEvent(ValueError):
    """A record or value the rules refuse; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class EventRules:
    """The configurable bounds (``events.*`` and ``speed.*`` keys, see :meth:`from_config`)."""

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH
    max_future_minutes: float = DEFAULT_MAX_FUTURE_MINUTES
    min_event_date: date | None = DEFAULT_MIN_EVENT_DATE

    @functools.cached_property
    def max_future(self) -> timedelta:
        return timedelta(minutes=self.max_future_minutes)

    @functools.cached_property
    def min_event_time(self) -> datetime | None:
        if self.min_event_date is None:
            return None
        return datetime.combine(self.min_event_date, time(), UTC)

    @classmethod
    def from_config(cls, cfg: PlatformConfig) -> EventRules:
        return cls(
            max_record_bytes=cfg.events.max_record_bytes,
            max_string_length=cfg.events.max_string_length,
            max_future_minutes=cfg.speed.max_future_minutes,
            min_event_date=cfg.speed.min_event_date,
        )


def check_record(
    event: EventType,
    data: bytes | None,
    record_time: datetime | None,
    rules: EventRules,
    avro_schema: dict[str, Any] | None = None,
) -> dict[str, Any] | str:
    """The typed fields of one record (JSON, or Avro binary when ``avro_schema`` is given), or
    the reason it is refused. ``record_time`` is the Kafka record time (None: now)."""
    try:
        return parse_record(event, data, record_time, rules, avro_schema)
    except InvalidEvent as exc:
        return str(exc)


def parse_record(
    event: EventType,
    data: bytes | None,
    record_time: datetime | None,
    rules: EventRules,
    avro_schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """As :func:`check_record`, raising :class:`InvalidEvent` with the reason."""
    if not data:
        raise InvalidEvent("empty payload")
    if len(data) > rules.max_record_bytes:
        raise InvalidEvent(f"record of {len(data)} bytes, more than the limit of {rules.max_record_bytes} (events.max_record_bytes)")
    if avro_schema is None:
        payload = decode_json(data)
        if not isinstance(payload, dict):
            raise InvalidEvent(f"malformed JSON: the record is {_json_kind(payload)}, not a JSON object")
    else:
        try:
            payload = avro.decode(data, avro_schema)
        except avro.AvroDecodeError as exc:
            raise InvalidEvent(f"malformed Avro: does not decode with {event.name}.avsc: {exc}") from None
    return check_fields(event, payload, record_time, rules)


def check_fields(event: EventType, payload: Mapping[str, Any], record_time: datetime | None, rules: EventRules) -> dict[str, Any]:
    """The event's declared fields of a decoded record, typed and checked (unknown fields are
    left out); raises :class:`InvalidEvent` with the first problem, missing fields first."""
    for field in event.fields:
        if field.name not in payload:
            raise InvalidEvent(f"missing field: {field.name}")
    limit = rules.max_string_length
    typed: dict[str, Any] = {field.name: _KINDS[field.kind](field, payload[field.name], limit) for field in event.fields}
    if EVENT_TIME in typed:
        check_event_time(typed[EVENT_TIME], record_time, rules)
    return typed


def field_value(field: EventField, value: Any, max_string_length: int) -> Any:
    """One field's value as its declared kind takes it: a ``str``, an ``int`` or an aware UTC
    ``datetime``; raises :class:`InvalidEvent` naming the field (the service's 422 message).

    >>> from lambda_ml.schemas import EventField
    >>> field_value(EventField("position", "int"), "2", 256)
    Traceback (most recent call last):
    ...
    lambda_ml.validation.InvalidEvent: bad value for position: expected an integer, got "2"
    """
    check = _KINDS.get(field.kind)
    if check is None:
        raise InvalidEvent(f"field {field.name}: unknown kind {field.kind!r}")
    return check(field, value, max_string_length)


def _string(field: EventField, value: Any, max_length: int) -> str:
    if type(value) is not str:
        raise _bad(field, value)
    if not value or value.isspace():
        raise InvalidEvent(f"bad value for {field.name}: expected a non-blank string, got {_describe(value)}")
    if len(value) > max_length:
        raise InvalidEvent(
            f"bad value for {field.name}: {len(value)} characters, more than the limit of {max_length} (events.max_string_length)"
        )
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            raise InvalidEvent(f"bad value for {field.name}: a lone UTF-16 surrogate (\\u{code:04x}) is not a character") from None
    return value


def _integer(field: EventField, value: Any, _: int) -> int:
    if type(value) is not int:  # bool is a subclass of int, and is refused here too
        raise _bad(field, value)
    if not INT_RANGE[0] <= value <= INT_RANGE[1]:
        raise InvalidEvent(f"bad value for {field.name}: {value} does not fit a 32-bit integer")
    return value


def _double(field: EventField, value: Any, _: int) -> float:
    # An integer is a number too (JSON writes 2.0 as 2 in many clients); a bool is not.
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(field, value)
    return float(value)


def _timestamp(field: EventField, value: Any, _: int) -> datetime:
    if type(value) is str and _TIMESTAMP.fullmatch(value):
        try:
            return datetime.fromisoformat(value).astimezone(UTC)
        except (ValueError, OverflowError):  # a day or an hour that does not exist
            raise _bad(field, value) from None
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)  # decoded from an Avro timestamp
    raise _bad(field, value)


_KINDS = {"string": _string, "int": _integer, "double": _double, "timestamp": _timestamp}


def check_event_time(event_time: datetime, record_time: datetime | None, rules: EventRules) -> None:
    """Refuse an event time before ``speed.min_event_date`` or ahead of the Kafka record time
    (now when it has none) by more than ``speed.max_future_minutes``."""
    earliest = rules.min_event_time
    if earliest is not None and event_time < earliest:
        raise InvalidEvent(f"event_time before {rules.min_event_date}: absurd timestamp")
    ahead = event_time - (record_time if record_time is not None else datetime.now(UTC))
    if ahead > rules.max_future:
        # H:MM:SS, with milliseconds when there are any: 5 min 0.25 s ahead is not "0:05:00".
        seconds, micros = divmod(ahead // timedelta(microseconds=1), 1_000_000)
        shown = str(timedelta(seconds=seconds)) + (f".{micros // 1000:03d}" if micros >= 1000 else "")
        raise InvalidEvent(f"event_time {shown} ahead of the Kafka record time (limit {rules.max_future_minutes:g} minutes)")


def _bad(field: EventField, value: Any) -> InvalidEvent:
    return InvalidEvent(f"bad value for {field.name}: expected {EXPECTED[field.kind]}, got {_describe(value)}")


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def _describe(value: Any) -> str:
    """A value as a reason shows it: scalars as JSON (strings cut short), containers by kind
    (a 10,000-deep array is never printed)."""
    if isinstance(value, str):
        cut = value[:_SHOWN]
        return json.dumps(cut) + ("..." if len(value) > _SHOWN else "")
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return json.dumps(value) if not isinstance(value, int) or abs(value) < 10**30 else f"an integer of {len(str(abs(value)))} digits"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime):
        return value.isoformat()
    return type(value).__name__


# --------------------------------------------------------------------------- strict JSON


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {json.dumps(key)}")
            seen.add(key)
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)


def decode_json(data: bytes) -> Any:
    """The one JSON value ``data`` holds (UTF-8, strict); raises :class:`InvalidEvent`.

    >>> decode_json(b'{"a": 1} {"a": 2}')
    Traceback (most recent call last):
    ...
    lambda_ml.validation.InvalidEvent: malformed JSON: more data after the JSON value at character 9 (one JSON value per record)
    >>> decode_json(b'[' * 5000 + b']' * 5000) == decode_json(b'[[]]') or 'deep'
    'deep'
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"malformed JSON: invalid UTF-8 at byte {exc.start}") from None
    start = WHITESPACE.match(text, 0).end()
    try:
        try:
            value, end = _DECODER.raw_decode(text, start)
        except RecursionError:  # deeper than the C parser's recursion allows
            value, end = _decode_iteratively(text, start)
    except json.JSONDecodeError as exc:  # "Expecting value", "Unterminated string starting at"...
        where = "character" if exc.msg.endswith(" at") else "at character"
        raise InvalidEvent(f"malformed JSON: {exc.msg} {where} {exc.pos}") from None
    except ValueError as exc:  # a duplicate key, NaN or Infinity, an integer of thousands of digits
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    end = WHITESPACE.match(text, end).end()
    if end != len(text):
        raise InvalidEvent(f"malformed JSON: more data after the JSON value at character {end} (one JSON value per record)")
    return value


_NUMBER = re.compile(r"(-?(?:0|[1-9]\d*))(\.\d+)?([eE][-+]?\d+)?")
_LITERALS = (("true", True), ("false", False), ("null", None))
_CONSTANTS = ("NaN", "Infinity", "-Infinity")


def _decode_iteratively(text: str, position: int) -> tuple[Any, int]:
    """:meth:`json.JSONDecoder.raw_decode` with the same rules, without recursion: an explicit
    stack of open arrays and objects, so nesting depth is bounded by the record size only."""
    # Each open container: its items so far (values, or (key, value) pairs for an object),
    # whether it is an object, and the key whose value comes next (in a one-item list).
    stack: list[tuple[list[Any], bool, list[str]]] = []

    def skip(at: int) -> int:
        return WHITESPACE.match(text, at).end()  # type: ignore[no-any-return]

    def key_at(at: int) -> tuple[str, int]:
        if text[at : at + 1] != '"':
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
        key, at = scanstring(text, at + 1, True)
        at = skip(at)
        if text[at : at + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
        return key, skip(at + 1)

    while True:
        position = skip(position)
        char = text[position : position + 1]
        value: Any
        if char == "{":
            position = skip(position + 1)
            if text[position : position + 1] == "}":
                value, position = {}, position + 1
            else:
                first_key, position = key_at(position)
                stack.append(([], True, [first_key]))
                continue
        elif char == "[":
            position = skip(position + 1)
            if text[position : position + 1] == "]":
                value, position = [], position + 1
            else:
                stack.append(([], False, []))
                continue
        elif char == '"':
            value, position = scanstring(text, position + 1, True)
        elif any(text.startswith(name, position) for name in _CONSTANTS):
            _no_constant(next(name for name in _CONSTANTS if text.startswith(name, position)))
        else:
            number = _NUMBER.match(text, position)
            literal = next(((word, v) for word, v in _LITERALS if text.startswith(word, position)), None)
            if number is not None:
                integer, fraction, exponent = number.groups()
                value = float(integer + (fraction or "") + (exponent or "")) if fraction or exponent else int(integer)
                position = number.end()
            elif literal is not None:
                value, position = literal[1], position + len(literal[0])
            else:
                raise json.JSONDecodeError("Expecting value", text, position)
        # A value is complete: hand it to the containers it closes, up to one that goes on.
        while True:
            if not stack:
                return value, position
            items, is_object, key = stack[-1]
            items.append((key[0], value) if is_object else value)
            position = skip(position)
            char = text[position : position + 1]
            if char == ",":
                position = skip(position + 1)
                if is_object:
                    key[0], position = key_at(position)
                break
            if char != ("}" if is_object else "]"):
                raise json.JSONDecodeError("Expecting ',' delimiter", text, position)
            stack.pop()
            value, position = (_unique_keys(items) if is_object else items), position + 1
