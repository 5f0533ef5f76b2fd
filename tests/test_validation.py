"""The event validator alone (lambda_ml/validation.py), its config keys, and the prediction
service and stream scoring refusing the same values with the same words."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
from fastapi.testclient import TestClient

from lambda_ml import avro, validation
from lambda_ml.config import DEFAULT_CONFIG, ConfigError, PlatformConfig, load_config
from support import CLICK, IMPRESSION

AT = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)  # the Kafka record time of every case
RULES = validation.EventRules()
VALID = {"event_id": "imp-1", "event_time": "2026-11-20T11:59:00.250Z", "user_id": "u1", "item_id": "i1", "device": "mobile", "position": 3}
TYPED = {**VALID, "event_time": datetime(2026, 11, 20, 11, 59, 0, 250_000, tzinfo=UTC)}


def _record(**changes: Any) -> bytes:
    return json.dumps({**VALID, **changes}).encode()


DEEP = b"[" * 10_000 + b"]" * 10_000

# (case, record bytes, the reason, or the typed event for a valid one)
CASES: list[tuple[str, bytes | None, str | dict[str, Any]]] = [
    ("valid", _record(), TYPED),
    ("valid, whitespace around", b" \n\t" + _record() + b"\r\n ", TYPED),
    ("valid unicode", json.dumps({**VALID, "user_id": "Zoë 🚲", "item_id": 'i"\n'}, ensure_ascii=False).encode(),
     {**TYPED, "user_id": "Zoë 🚲", "item_id": 'i"\n'}),
    ("valid, escaped unicode", _record(user_id="Zoë 🚲"), {**TYPED, "user_id": "Zoë 🚲"}),
    ("valid, a time zone offset", _record(event_time="2026-11-20T12:59:00.25+01:00"), TYPED),
    ("valid, unknown fields", _record(extra={"a": [1, 2.5, None, True]}, more="x"), TYPED),
    ("valid, a 10,000-deep unknown field", _record()[:-1] + b', "extra": ' + DEEP + b"}", TYPED),
    ("valid, 5 min ahead: the bound itself", _record(event_time="2026-11-20T12:05:00Z"),
     {**TYPED, "event_time": datetime(2026, 11, 20, 12, 5, tzinfo=UTC)}),
    ("empty", b"", "empty payload"),
    ("none", None, "empty payload"),
    ("too large", _record(user_id="u" * 70_000), f"record of {len(_record(user_id='u' * 70_000))} bytes, more than the limit of 65536 (events.max_record_bytes)"),
    ("two objects", _record() + _record(), f"malformed JSON: more data after the JSON value at character {len(_record())} (one JSON value per record)"),
    ("trailing garbage", _record() + b"\n#", f"malformed JSON: more data after the JSON value at character {len(_record()) + 1} (one JSON value per record)"),
    ("single quotes", b"{'event_id': 'imp-1'}", "malformed JSON: Expecting property name enclosed in double quotes at character 1"),
    ("cut short", b'{"event_id": "imp-1", "user', "malformed JSON: Unterminated string starting at character 22"),
    ("invalid UTF-8", b'{"event_id": "imp-\xc3\x28"}', "malformed JSON: invalid UTF-8 at byte 18"),
    ("a UTF-8 byte order mark", b"\xef\xbb\xbf" + _record(), "malformed JSON: Expecting value at character 0"),
    ("NaN", _record()[:-1] + b', "x": NaN}', "malformed JSON: NaN is not a JSON value"),
    ("-Infinity", _record()[:-1] + b', "x": -Infinity}', "malformed JSON: -Infinity is not a JSON value"),
    ("a duplicate key", _record()[:-1] + b', "position": 4}', 'malformed JSON: duplicate key "position"'),
    ("a duplicate key deep down", _record()[:-1] + b', "x": {"a": 1, "a": 2}}', 'malformed JSON: duplicate key "a"'),
    ("malformed deep down", b'{"x": ' + b"[" * 10_000 + b"]" * 9_999 + b"}", "malformed JSON: Expecting ',' delimiter at character 20005"),
    ("NaN deep down", b'{"x": ' + b"[" * 10_000 + b"NaN" + b"]" * 10_000 + b"}", "malformed JSON: NaN is not a JSON value"),
    ("an array", b"[1, 2, 3]", "malformed JSON: the record is an array, not a JSON object"),
    ("a string", b'"imp-1"', "malformed JSON: the record is a string, not a JSON object"),
    ("a number", b"12", "malformed JSON: the record is a number, not a JSON object"),
    ("null", b"null", "malformed JSON: the record is null, not a JSON object"),
    ("missing field", json.dumps({k: v for k, v in VALID.items() if k != "device"}).encode(), "missing field: device"),
    ("missing before wrong", json.dumps({**{k: v for k, v in VALID.items() if k != "position"}, "user_id": 1}).encode(), "missing field: position"),
    ("a number for a string", _record(user_id=123), "bad value for user_id: expected a string, got 123"),
    ("an object for a string", _record(item_id={"id": 1}), "bad value for item_id: expected a string, got an object"),
    ("an array for a string", _record(item_id=[1]), "bad value for item_id: expected a string, got an array"),
    ("a deep array for a string", _record()[:-1].replace(b'"user_id": "u1"', b'"user_id": ' + DEEP) + b"}", "bad value for user_id: expected a string, got an array"),
    ("null for a string", _record(device=None), "bad value for device: expected a string, got null"),
    ("an empty string", _record(device=""), 'bad value for device: expected a non-blank string, got ""'),
    ("a blank string", _record(device=" \t"), 'bad value for device: expected a non-blank string, got " \\t"'),
    ("a long string", _record(user_id="u" * 257), "bad value for user_id: 257 characters, more than the limit of 256 (events.max_string_length)"),
    ("a long string is cut in the reason", _record(user_id=1.5e300), "bad value for user_id: expected a string, got 1.5e+300"),
    ("a long unicode string counts characters", _record(user_id="é" * 256), {**TYPED, "user_id": "é" * 256}),
    ("a lone surrogate", _record(user_id="a\udc80"), "bad value for user_id: a lone UTF-16 surrogate (\\udc80) is not a character"),
    ("a string for an integer", _record(position="2"), 'bad value for position: expected an integer, got "2"'),
    ("a float for an integer", _record(position=2.0), "bad value for position: expected an integer, got 2.0"),
    ("a fraction for an integer", _record(position=2.5), "bad value for position: expected an integer, got 2.5"),
    ("an exponent for an integer", _record()[:-2] + b"1e2}", "bad value for position: expected an integer, got 100.0"),
    ("a boolean for an integer", _record(position=True), "bad value for position: expected an integer, got true"),
    ("an integer beyond 32 bits", _record(position=2**31), "bad value for position: 2147483648 does not fit a 32-bit integer"),
    ("the smallest 32-bit integer", _record(position=-(2**31)), {**TYPED, "position": -(2**31)}),
    ("a number for a timestamp", _record(event_time=12345), "bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got 12345"),
    ("no time zone", _record(event_time="2026-11-20T11:59:00"), 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "2026-11-20T11:59:00"'),
    ("a date only", _record(event_time="2026-11-20"), 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "2026-11-20"'),
    ("a space for the T", _record(event_time="2026-11-20 11:59:00Z"), 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "2026-11-20 11:59:00Z"'),
    ("nanoseconds", _record(event_time="2026-11-20T11:59:00.123456789Z"), 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "2026-11-20T11:59:00.123456789Z"'),
    ("a day that does not exist", _record(event_time="2026-02-30T11:59:00Z"), 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "2026-02-30T11:59:00Z"'),
    ("words", _record(event_time="yesterday"), 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "yesterday"'),
    ("absurd", _record(event_time="1969-12-31T23:59:59Z"), "event_time before 1970-01-01: absurd timestamp"),
    ("valid, history from 1998", _record(event_time="1998-03-01T12:00:00Z"), {**TYPED, "event_time": datetime(1998, 3, 1, 12, tzinfo=UTC)}),
    ("10 h ahead", _record(event_time="2026-11-20T22:00:00Z"), "event_time 10:00:00 ahead of the Kafka record time (limit 5 minutes)"),
    ("5 min 0.25 s ahead", _record(event_time="2026-11-20T12:05:00.250Z"), "event_time 0:05:00.250 ahead of the Kafka record time (limit 5 minutes)"),
    ("years ahead", _record(event_time="9999-12-31T23:59:59+00:00"), f"event_time {datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC) - AT} ahead of the Kafka record time (limit 5 minutes)"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "record", "expected"), CASES, ids=[c[0] for c in CASES])
def test_the_validator_types_a_valid_event_or_gives_the_reason(case: str, record: bytes | None, expected: str | dict[str, Any]) -> None:
    assert validation.check_record(IMPRESSION, record, AT, RULES) == expected


def test_limits_and_the_future_bound_come_from_the_rules() -> None:
    rules = validation.EventRules(max_record_bytes=200, max_string_length=6, max_future_minutes=60, min_event_date=date(2026, 11, 20))
    assert validation.check_record(IMPRESSION, _record(user_id="u" * 7), AT, rules) == (
        "bad value for user_id: 7 characters, more than the limit of 6 (events.max_string_length)"
    )
    assert validation.check_record(IMPRESSION, _record(extra="x" * 100), AT, rules) == (
        f"record of {len(_record(extra='x' * 100))} bytes, more than the limit of 200 (events.max_record_bytes)"
    )
    assert validation.check_record(IMPRESSION, _record(event_time="2026-11-20T12:59:00Z"), AT, rules) == {
        **TYPED, "event_time": datetime(2026, 11, 20, 12, 59, tzinfo=UTC)
    }  # fmt: skip
    assert validation.check_record(IMPRESSION, _record(event_time="2026-11-19T23:59:59Z"), AT, rules) == (
        "event_time before 2026-11-20: absurd timestamp"
    )
    # Without a record time the bound is counted from now.
    ahead = (datetime.now(UTC) + timedelta(hours=2)).isoformat()
    assert validation.check_record(IMPRESSION, _record(event_time=ahead), None, RULES).startswith("event_time 1:59:5")


def test_avro_records_pass_the_same_checks() -> None:
    schema = avro.load_schema(avro.schema_path("conf/avro", "clicks"))
    click = {"event_id": "c1", "impression_id": "imp-1", "event_time": "2026-11-20T11:59:00.250Z"}
    encoded = avro.encode(click, schema)
    assert validation.check_record(CLICK, encoded, AT, RULES, schema) == {**click, "event_time": TYPED["event_time"]}
    assert validation.check_record(CLICK, avro.encode({**click, "event_time": "2026-11-20T22:00:00Z"}, schema), AT, RULES, schema) == (
        "event_time 10:00:00 ahead of the Kafka record time (limit 5 minutes)"
    )
    assert validation.check_record(CLICK, avro.encode({**click, "impression_id": "x" * 300}, schema), AT, RULES, schema) == (
        "bad value for impression_id: 300 characters, more than the limit of 256 (events.max_string_length)"
    )
    assert validation.check_record(CLICK, encoded[:-1], AT, RULES, schema) == (
        "malformed Avro: does not decode with clicks.avsc: field event_time: the record ends inside the value"
    )
    assert validation.check_record(CLICK, _record(), AT, RULES, schema).startswith("malformed Avro: does not decode with clicks.avsc: ")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=30,
)


@hypothesis.settings(max_examples=300, deadline=None, database=None)
@hypothesis.given(value=JSON_VALUES, indent=st.sampled_from([None, 1]), ascii_only=st.booleans())
def test_the_iterative_parser_reads_what_the_json_module_reads(value: Any, indent: int | None, ascii_only: bool) -> None:
    """The parser used for records too deep for the C parser gives json.loads's value."""
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    parsed, end = validation._decode_iteratively(text, 0)
    assert end == len(text)
    assert json.dumps(parsed, sort_keys=True) == json.dumps(json.loads(text), sort_keys=True)


@pytest.mark.parametrize(
    "text", ['{"a" 1}', '{"a": 1,}', "[1 2]", "[1,]", '{"a": tru}', "01", '"\\x"', '{"a": "\x01"}', "", '{"a": 1'],
)
def test_the_iterative_parser_refuses_what_the_json_module_refuses(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    try:
        parsed, end = validation._decode_iteratively(text, 0)
    except json.JSONDecodeError as exc:
        assert (exc.msg, exc.pos) == (expected.value.msg, expected.value.pos)
    else:
        assert end != len(text), parsed  # a value, then something json.loads refuses after it


# --------------------------------------------------------------------------- config


def test_the_future_bound_must_stay_below_the_watermark() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(DEFAULT_CONFIG, env={}, overrides={"speed.max_future_minutes": 15})
    assert str(refused.value) == (
        f"{DEFAULT_CONFIG}: speed: Value error, speed.max_future_minutes (15) must be less than speed.watermark_minutes (15): "
        "an event that far ahead of its Kafka record time would move the watermark past events arriving on time"
    )
    with pytest.raises(ConfigError, match=r"speed: Value error, speed.max_future_minutes \(2\) must be less than speed.watermark_minutes \(2\)"):
        load_config(DEFAULT_CONFIG, env={}, overrides={"speed.watermark_minutes": 2, "speed.max_future_minutes": 2})
    assert load_config(DEFAULT_CONFIG, env={}, overrides={"speed.max_future_minutes": 14.5}).speed.max_future_minutes == 14.5
    with pytest.raises(ConfigError, match=r"speed.max_future_minutes: Input should be greater than or equal to 0"):
        load_config(DEFAULT_CONFIG, env={}, overrides={"speed.max_future_minutes": -1})


def test_the_old_future_key_says_what_replaced_it_and_limits_are_typed() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(DEFAULT_CONFIG, env={}, overrides={"speed.max_future_days": 1})
    assert "speed.max_future_days was replaced by speed.max_future_minutes" in str(refused.value)
    with pytest.raises(ConfigError, match=r"events.max_string_length: Input should be greater than 0"):
        load_config(DEFAULT_CONFIG, env={}, overrides={"events.max_string_length": 0})
    with pytest.raises(ConfigError, match=r"events.max_record_bytes: unknown key|events.max_record_byte: unknown key"):
        load_config(DEFAULT_CONFIG, env={}, overrides={"events.max_record_byte": 10})
    cfg = load_config(DEFAULT_CONFIG, env={}, overrides={"events.max_record_bytes": 1000, "events.max_string_length": 9})
    assert validation.EventRules.from_config(cfg) == validation.EventRules(1000, 9, 5.0, date(1970, 1, 1))


# --------------------------------------------------------------------------- one validator, three consumers


def _unit_cfg(**overrides: Any) -> PlatformConfig:
    return load_config(DEFAULT_CONFIG, env={}, overrides={"serving.prediction_log.enabled": False, **overrides})


def _not_loaded() -> Any:
    from serving_layer.reloadable import NotReadyError

    raise NotReadyError("nothing loaded in this test: requests are refused before scoring")


# A bad value of an impression field and the reason every consumer gives for it.
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("position", "2", 'bad value for position: expected an integer, got "2"'),
    ("position", 2.5, "bad value for position: expected an integer, got 2.5"),
    ("position", 2.0, "bad value for position: expected an integer, got 2.0"),
    ("position", True, "bad value for position: expected an integer, got true"),
    ("position", 2**40, "bad value for position: 1099511627776 does not fit a 32-bit integer"),
    ("user_id", 123, "bad value for user_id: expected a string, got 123"),
    ("user_id", {"id": "u1"}, "bad value for user_id: expected a string, got an object"),
    ("item_id", ["i1"], "bad value for item_id: expected a string, got an array"),
    ("device", None, "bad value for device: expected a string, got null"),
    ("device", "  ", 'bad value for device: expected a non-blank string, got "  "'),
    ("user_id", "u" * 11, "bad value for user_id: 11 characters, more than the limit of 10 (events.max_string_length)"),
    ("event_id", "e" * 11, "bad value for event_id: 11 characters, more than the limit of 10 (events.max_string_length)"),
    ("user_id", "u\ud800", "bad value for user_id: a lone UTF-16 surrogate (\\ud800) is not a character"),
    ("event_time", 12345, "bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got 12345"),
    ("event_time", "2026-11-20T11:59:00", 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "2026-11-20T11:59:00"'),
    ("event_time", "yesterday", 'bad value for event_time: expected an ISO-8601 timestamp string with a time zone, got "yesterday"'),
]  # fmt: skip


def test_the_service_and_stream_scoring_refuse_the_same_values_with_the_same_reason() -> None:
    from serving_layer.app import create_app
    from serving_layer.reloadable import Reloadable
    from lambda_ml_apps.ctr.stream import StreamScorer

    cfg = _unit_cfg(**{"events.max_string_length": 10})
    models, views = Reloadable("models", _not_loaded), Reloadable("views", _not_loaded)
    scorer = StreamScorer(cfg, models=models, views=views, clock=lambda: AT)
    service: list[tuple[int, list[dict[str, str]]]] = []
    stream: list[str] = []
    with TestClient(create_app(cfg, models=models, views=views, clock=lambda: AT, poll=False), base_url="http://localhost") as client:
        for field, value, _ in BAD_VALUES:
            response = client.post("/predict", content=json.dumps({**VALID, field: value}), headers={"content-type": "application/json"})
            service.append((response.status_code, response.json()["detail"]))
            stream.append(str(scorer.parse(json.dumps({**VALID, field: value}).encode(), AT)))
    assert service == [(422, [{"field": field, "message": reason}]) for field, _, reason in BAD_VALUES]
    assert stream == [reason for _, _, reason in BAD_VALUES]
    # The speed layer's validator gives the same reasons (what the ingest quarantines with).
    rules = validation.EventRules.from_config(cfg)
    assert [validation.check_record(IMPRESSION, json.dumps({**VALID, f: v}).encode(), AT, rules) for f, v, _ in BAD_VALUES] == stream
    # A valid impression passes both; stream scoring also refuses what only a Kafka event can
    # get wrong (a time ahead of its record time), in the quarantine's words.
    assert scorer.parse(_record(), AT) == scorer.row_type.model_validate(TYPED)
    assert scorer.parse(_record(event_time="2026-11-20T22:00:00Z"), AT) == "event_time 10:00:00 ahead of the Kafka record time (limit 5 minutes)"
    assert scorer.parse(_record(position=0), AT) == "not a valid impression: position: Input should be greater than or equal to 1"
