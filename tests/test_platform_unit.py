"""Unit tests of the shared package's pure functions: config, JVM set-up, stack, generator."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lambda_ml import avro
from lambda_ml_apps.ctr import generator
from lambda_ml_cli.cli import build_parser
from lambda_ml.config import DEFAULT_CONFIG, ConfigError, GeneratorConfig, load_config
from lambda_ml.jvm import artifact_name
from lambda_ml_cli.stack import broker_properties, new_cluster_id


def test_default_config_loads_with_every_section() -> None:
    cfg = load_config(DEFAULT_CONFIG, env={})
    assert cfg.kafka.topics.model_updates.compacted is True
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert cfg.lake.root.startswith("/")  # relative paths resolve under the project root


def test_env_var_references_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(
        DEFAULT_CONFIG,
        env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1234", "LAMBDA_ML__KAFKA__PORT": "1234", "LAMBDA_ML__CTR__REG_PARAM": "0.5"},
    )
    assert cfg.kafka.bootstrap_servers == "127.0.0.1:1234"
    assert cfg.kafka.port == 1234
    assert cfg.ctr.reg_param == 0.5


def test_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_CONFIG.read_text().replace("  heap: 512m", "  heap: 512m\n  hepa: 1"))
    with pytest.raises(ConfigError) as error:
        load_config(bad, env={})
    assert str(error.value) == f"{bad}: kafka.hepa: unknown key"


def test_wrong_type_is_named_with_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DEFAULT_CONFIG.read_text().replace("  port: 8000", "  port: eighty"))
    with pytest.raises(ConfigError) as error:
        load_config(bad, env={})
    assert str(error.value).startswith(f"{bad}: serving.port: Input should be a valid integer")


def test_a_bad_environment_override_is_named_by_its_variable_not_the_file() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__SERVING__PORT": "eighty"})
    assert str(error.value).startswith("environment variable LAMBDA_ML__SERVING__PORT: serving.port: Input should be a valid integer")
    with pytest.raises(ConfigError) as error:
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__SPEED__MIN_EVENT_DATE": "the nineties"})
    assert str(error.value).startswith("environment variable LAMBDA_ML__SPEED__MIN_EVENT_DATE: speed.min_event_date: Input should be a valid date")
    with pytest.raises(ConfigError) as error:
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__SPEED__MIN_EVENT_DAT": "1990-01-01"})
    assert str(error.value) == "environment variable LAMBDA_ML__SPEED__MIN_EVENT_DAT: speed.min_event_dat: unknown key"
    # A whole section replaced by a variable is named by that variable too.
    with pytest.raises(ConfigError) as error:
        load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__SPEED": "{trigger_seconds: -1}"})
    assert str(error.value).startswith("environment variable LAMBDA_ML__SPEED: speed.trigger_seconds: Input should be greater than 0")


def test_environment_overrides_are_typed_like_the_file(tmp_path: Path) -> None:
    """A date given unquoted in the file or through the environment is the same date; lists
    and numbers are read as YAML reads them."""
    from datetime import date

    by_env = load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__SPEED__MIN_EVENT_DATE": "1990-01-01", "LAMBDA_ML__SPEED__QUERIES": "[ingest, labels]"})
    assert by_env.speed.min_event_date == date(1990, 1, 1)
    assert by_env.speed.queries == ("ingest", "labels")
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text(DEFAULT_CONFIG.read_text().replace('min_event_date: "1970-01-01"', "min_event_date: 1990-01-01"))
    assert load_config(unquoted, env={}).speed.min_event_date == date(1990, 1, 1)
    assert load_config(DEFAULT_CONFIG, env={}).speed.min_event_date == date(1970, 1, 1)
    # A string field keeps a date-like value as the text it was given.
    assert load_config(DEFAULT_CONFIG, env={"LAMBDA_ML__MLFLOW__EXPERIMENT": "2026-12-05"}).mlflow.experiment == "2026-12-05"


def test_missing_env_var_without_default_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "c.yaml"
    conf.write_text("kafka:\n  bootstrap_servers: ${NO_SUCH_VAR}\n  topics: {}\n")
    with pytest.raises(ConfigError, match=f"{conf}: environment variable NO_SUCH_VAR is not set"):
        load_config(conf, env={})


def test_artifact_name_strips_versions() -> None:
    names = ["kafka-clients-3.9.2.jar", "spark-sql-kafka-0-10_2.13-4.2.0.jar", "log4j-slf4j2-impl-2.24.3.jar"]
    assert [artifact_name(n) for n in names] == ["kafka-clients", "spark-sql-kafka-0-10_2.13", "log4j-slf4j2-impl"]


def test_broker_properties_bind_loopback_ports() -> None:
    cfg = load_config(DEFAULT_CONFIG, env={}, overrides={"kafka.port": 1111, "kafka.controller_port": 2222})
    props = dict(line.split("=", 1) for line in broker_properties(cfg, Path("/d")).splitlines() if line)
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:2222"
    assert props["log.dirs"] == "/d"


def test_generator_is_deterministic_and_its_ground_truth_matches_the_records() -> None:
    gen = GeneratorConfig(impressions=2000, seed=3, duplicate_fraction=0.1, malformed_fraction=0.02)
    window = timedelta(minutes=30)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    records, truth = generator.generate(gen, window, now)
    again, _ = generator.generate(gen, window, now)
    assert records == again

    # Recount everything from the records themselves.
    impressions, clicks, bad = {}, [], 0
    for record in records:
        try:
            event = json.loads(record.value)
        except ValueError:
            bad += 1
            continue
        if not isinstance(event, dict) or str(event.get("event_id", "")).startswith("bad-"):
            bad += 1
        elif record.event_type == "impressions":
            impressions[event["event_id"]] = event
        else:
            clicks.append(event)
    assert len(impressions) == truth.impressions == 2000
    assert len(clicks) == truth.clicks_sent
    assert len({c["event_id"] for c in clicks}) == truth.distinct_clicks
    assert bad == truth.malformed_total == 40
    assert truth.clicks_sent > truth.distinct_clicks  # some duplicates were sent

    def parse(text: str) -> datetime:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")

    positives = {
        c["impression_id"]
        for c in clicks
        if timedelta(0) <= parse(c["event_time"]) - parse(impressions[c["impression_id"]]["event_time"]) <= window
    }
    assert len(positives) == truth.positives
    assert 0.03 < truth.positives / truth.impressions < 0.3  # a realistic click-through rate
    # Some clicks are sent out of event-time order.
    times = [parse(json.loads(r.value)["event_time"]) for r in records if r.event_type == "clicks"]
    assert any(later < earlier for earlier, later in zip(times, times[1:]))
    assert Counter(truth.malformed) == Counter({kind: 40 // 7 + (i < 40 % 7) for i, kind in enumerate(generator.MALFORMED_KINDS)})


def test_a_second_generator_run_sends_other_events_of_the_same_world() -> None:
    """A run a few minutes after another (the demo run twice: each ``run`` draws anew) sends new events, not a shifted copy
    of the first run's (whose twins would leak each click into the other's features), drawn from
    the same users and items: per-user click-through rates agree across runs of one seed, and
    not across seeds."""
    gen = GeneratorConfig(impressions=20_000, users=20, items=50, seed=5, duplicate_fraction=0.0, malformed_fraction=0.0)
    window, now = timedelta(minutes=30), datetime(2026, 1, 1, tzinfo=UTC)

    def per_user(records: list[Any]) -> tuple[list[tuple[str, str, str, int]], list[float]]:
        shown: dict[str, dict[str, Any]] = {}
        clicked: set[str] = set()
        for record in records:
            event = json.loads(record.value)
            if record.event_type == "impressions":
                shown[event["event_id"]] = event
            else:
                clicked.add(event["impression_id"])
        sequence = [(e["user_id"], e["item_id"], e["device"], e["position"]) for e in shown.values()]
        users = sorted({e["user_id"] for e in shown.values()}, key=lambda u: int(u[1:]))
        rates = [
            sum(i in clicked for i, e in shown.items() if e["user_id"] == u) / sum(e["user_id"] == u for e in shown.values())
            for u in users
        ]
        return sequence, rates

    first, first_rates = per_user(generator.generate(gen, window, now, draw="1")[0])
    second, second_rates = per_user(generator.generate(gen, window, now + timedelta(minutes=5), draw="2")[0])
    _, other_rates = per_user(generator.generate(gen.model_copy(update={"seed": 6}), window, now, draw="1")[0])
    assert sum(a == b for a, b in zip(first, second)) < 0.05 * len(first)  # not the same events
    assert statistics.correlation(first_rates, second_rates) > 0.8  # the same users
    assert statistics.correlation(first_rates, other_rates) < 0.5  # another seed: other users


def test_every_cli_verb_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in (["setup"], ["stack"], ["generate"], ["speed", "ingest"], ["speed", "run"], ["speed", "reprocess-quarantine"], ["batch", "train"], ["batch", "evaluate"], ["serve"], ["serve", "stream"], ["submit"], ["demo"], []):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([*verb, "--help"])
        assert done.value.code == 0
        assert "usage: lambda-ml" in capsys.readouterr().out


def test_kafka_cluster_ids_never_start_with_a_dash() -> None:
    # One id in 64 drawn plainly starts with "-", which the storage tool reads as an option.
    ids = [new_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
    assert len(set(ids)) == 2000


def test_avro_impressions_decode_to_what_was_encoded_and_bad_bytes_name_the_field() -> None:
    schema = avro.load_schema(avro.schema_path(load_config(DEFAULT_CONFIG, env={}).kafka.avro_schemas, "impressions"))
    impression = {"event_id": "imp-7", "event_time": "2026-11-22T10:00:00.250+00:00", "user_id": "Zoë 🚲",
                  "item_id": "", "device": "mobile", "position": -3}  # fmt: skip
    data = avro.encode(impression, schema)
    # By hand: zig-zag varints, strings as length + UTF-8, the time in milliseconds since 1970.
    millis = 1_795_341_600_250
    assert data.startswith(b"\x0aimp-7") and data.endswith(b"\x0cmobile\x05")
    assert avro.decode(data, schema) == {
        **impression, "event_time": datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=millis),
    }  # fmt: skip
    assert avro.decode(data, schema)["event_time"] == datetime(2026, 11, 22, 10, 0, 0, 250_000, tzinfo=UTC)

    for cut in range(len(data)):  # every record cut short
        with pytest.raises(avro.AvroDecodeError, match="field "):
            avro.decode(data[:cut], schema)
    with pytest.raises(avro.AvroDecodeError, match=r"1 byte\(s\) left after the last field \(position\)"):
        avro.decode(data + b"\x00", schema)
    as_long = {**schema, "fields": [{**f, "type": "long"} if f["name"] == "position" else f for f in schema["fields"]]}
    with pytest.raises(avro.AvroDecodeError, match="field position: 2147483648 does not fit an int"):
        avro.decode(avro.encode({**impression, "position": 2**31}, as_long), schema)
    bad_utf8 = data.replace(b"\x0cmobile", b"\x0cmob\xffle")
    with pytest.raises(avro.AvroDecodeError, match="field device: not UTF-8"):
        avro.decode(bad_utf8, schema)
    with pytest.raises(avro.AvroDecodeError, match="field event_id: a variable-length integer of more than 10 bytes"):
        avro.decode(b"\xff" * 11, schema)
    with pytest.raises(ValueError, match="field tags: Avro type"):
        avro.check_schema({**schema, "fields": [*schema["fields"], {"name": "tags", "type": ["null", "string"]}]})
    avro.check_schema(schema)


def test_avro_decoding_is_as_strict_as_the_format_and_no_stricter() -> None:
    """fastavro reads some bytes leniently; the decoder still refuses them, and still takes an
    integer padded past its shortest form, which Avro allows."""
    schema = {"type": "record", "name": "R", "fields": [{"name": "n", "type": "long"}, {"name": "ok", "type": "boolean"}]}
    # By hand: 5 zig-zags to 10; 0x8a 0x80 0x00 is 10 in three bytes instead of one.
    assert avro.decode(b"\x0a\x01", schema) == {"n": 5, "ok": True}
    assert avro.decode(b"\x8a\x80\x00\x00", schema) == {"n": 5, "ok": False}
    with pytest.raises(avro.AvroDecodeError, match="field ok: boolean byte 2, not 0 or 1"):
        avro.decode(b"\x0a\x02", schema)
    # A schema without a boolean, whose records are written back only when they could hide a
    # long variable-length integer.
    long_only = {**schema, "fields": schema["fields"][:1]}
    assert avro.decode(b"\x8a" + b"\x80" * 8 + b"\x00", long_only) == {"n": 5}
    for checked in (schema, long_only):
        with pytest.raises(avro.AvroDecodeError, match="field n: a variable-length integer of more than 10 bytes"):
            avro.decode(b"\x8a" + b"\x80" * 10 + b"\x00\x01"[: len(checked["fields"])], checked)
        with pytest.raises(avro.AvroDecodeError, match="field n: a variable-length integer that does not fit a long"):
            avro.decode(b"\xff" * 9 + b"\x02\x01"[: len(checked["fields"])], checked)  # bit 64 set: 2**64 - 1 + 2**64
    with pytest.raises(avro.AvroDecodeError, match=r"2 byte\(s\) left after the last field \(ok\)"):
        avro.decode(b"\x0a\x01\x00\x00", schema)
    with pytest.raises(avro.AvroEncodeError, match="field n: expected long, got True"):
        avro.encode({"n": True, "ok": True}, schema)


# --------------------------------------------------------------------------- the layering

PROJECT = Path(__file__).resolve().parent.parent
LAYERS = ("batch_layer", "speed_layer", "serving_layer")
# What each package may import of the project's own packages (besides itself): the core
# imports nothing of the project, a layer only the core, an application the core and the
# layers' public machinery, and only the command line (and tests, benchmarks) sees it.
ALLOWED = {
    "lambda_ml": set(),
    **{layer: {"lambda_ml"} for layer in LAYERS},
    "lambda_ml_apps": {"lambda_ml", *LAYERS},
    "lambda_ml_cli": {"lambda_ml", "lambda_ml_apps", *LAYERS},
}


def _project_imports(path: Path) -> set[str]:
    """The top-level project packages ``path`` imports (anywhere in it, lazily too)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in ALLOWED}
    return found


def _app_package(path: Path) -> str | None:
    parts = path.relative_to(PROJECT).parts
    return parts[1] if parts[0] == "lambda_ml_apps" and len(parts) > 2 else None


def test_no_package_imports_above_its_place() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((PROJECT / package).rglob("*.py")):
            for imported in _project_imports(path) - {package} - allowed:
                wrong.append(f"{path.relative_to(PROJECT)} imports {imported}")
    assert wrong == []


def test_no_application_imports_another() -> None:
    import ast

    wrong = []
    for path in sorted((PROJECT / "lambda_ml_apps").rglob("*.py")):
        own = _app_package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lambda_ml_apps."):
                other = (node.module or "").split(".")[1]
                if own is not None and other != own:
                    wrong.append(f"{path.relative_to(PROJECT)} imports lambda_ml_apps.{other}")
    assert wrong == []
