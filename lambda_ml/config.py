"""Typed platform configuration loaded from ``conf/*.yaml``.

Values may reference environment variables as ``${VAR}`` or ``${VAR:-default}``, and any key
can be overridden by ``LAMBDA_ML__<SECTION>__<KEY>=value``. Unknown keys are rejected, and every
error names the file and the key, e.g. ``conf/platform.yaml: kafka.port: Input should be a
valid integer``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "conf" / "platform.yaml"
ENV_PREFIX = "LAMBDA_ML__"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration file is unreadable or invalid; the message names the file and key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JvmConfig(_Model):
    dir: Path = Path(".jvm")


class SparkConfig(_Model):
    master: str = "local[2]"
    app_name: str = "lambda-ml"
    shuffle_partitions: int = Field(4, gt=0)
    driver_memory: str = "2g"
    ui_enabled: bool = False
    extra: dict[str, str] = {}


class TopicConfig(_Model):
    name: str = Field(min_length=1)
    partitions: int = Field(1, gt=0)
    retention_ms: int = -1
    compacted: bool = False


class TopicsConfig(_Model):
    impressions: TopicConfig
    clicks: TopicConfig
    model_updates: TopicConfig

    def event_topics(self) -> dict[str, TopicConfig]:
        """The topics carrying raw events, keyed by event type."""
        return {"impressions": self.impressions, "clicks": self.clicks}


class KafkaConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(9092, gt=0, lt=65536)
    controller_port: int = Field(9093, gt=0, lt=65536)
    heap: str = "512m"
    bootstrap_servers: str = "127.0.0.1:9092"
    start_timeout_s: float = Field(60, gt=0)
    topics: TopicsConfig


class MlflowConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(5000, gt=0, lt=65536)
    tracking_uri: str = "http://127.0.0.1:5000"
    experiment: str = "ctr"
    registered_model: str = "ctr"
    start_timeout_s: float = Field(120, gt=0)


class LakeConfig(_Model):
    root: str = ".data/lake"
    checkpoints: str = ".data/checkpoints"

    def table(self, *parts: str) -> str:
        """Path of a Delta table under the lake root, e.g. ``table("bronze", "clicks")``."""
        return "/".join([self.root.rstrip("/"), *parts])


class CtrConfig(_Model):
    attribution_window_minutes: int = Field(30, gt=0)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    reg_param: float = Field(0.01, ge=0)
    max_iter: int = Field(50, gt=0)
    parity_atol: float = Field(1e-5, gt=0)


class SpeedConfig(_Model):
    trigger_seconds: float = Field(5, gt=0)
    max_future_days: float = Field(1, gt=0)
    min_event_date: str = "2000-01-01"
    max_offsets_per_trigger: int = Field(200000, gt=0)


class ServingConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    model_alias: str = "champion"
    max_rows: int = Field(1000, gt=0)


class GeneratorConfig(_Model):
    seed: int = 7
    users: int = Field(500, gt=0)
    items: int = Field(100, gt=0)
    impressions: int = Field(20000, ge=0)
    span_hours: float = Field(48, gt=0)
    late_fraction: float = Field(0.05, ge=0, le=1)
    duplicate_fraction: float = Field(0.02, ge=0, le=1)
    malformed_fraction: float = Field(0.01, ge=0, le=1)
    compression: Literal["none", "gzip", "lz4", "zstd"] = "zstd"


class PlatformConfig(_Model):
    data_dir: Path = Path(".data")
    jvm: JvmConfig = JvmConfig()
    spark: SparkConfig = SparkConfig()
    kafka: KafkaConfig
    mlflow: MlflowConfig = MlflowConfig()
    lake: LakeConfig = LakeConfig()
    ctr: CtrConfig = CtrConfig()
    speed: SpeedConfig = SpeedConfig()
    serving: ServingConfig = ServingConfig()
    generator: GeneratorConfig = GeneratorConfig()
    source: str = Field("<defaults>", exclude=True)

    @property
    def jvm_dir(self) -> Path:
        return _absolute(self.jvm.dir)

    @property
    def data_path(self) -> Path:
        return _absolute(self.data_dir)


def _absolute(path: Path) -> Path:
    return path if path.is_absolute() else PROJECT_ROOT / path


def _absolute_uri(value: str) -> str:
    """A relative lake path becomes absolute under the project root; URIs stay as they are."""
    if "://" in value or value.startswith("/"):
        return value
    return str(PROJECT_ROOT / value)


def expand_env(value: Any, env: dict[str, str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree.

    >>> expand_env({"a": "${X:-1}", "b": ["${Y}"]}, {"Y": "2"})
    {'a': '1', 'b': ['2']}
    """
    if isinstance(value, dict):
        return {k: expand_env(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env) for v in value]
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise KeyError(name)

        return _ENV_REF.sub(replace, value)
    return value


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``"kafka.port"``) in a nested dict, creating sections as needed.

    >>> apply_overrides({"kafka": {"port": 1}}, {"kafka.port": 2, "a.b": 3})
    {'kafka': {'port': 2}, 'a': {'b': 3}}
    """
    result = _deep_copy(tree)
    for dotted, value in overrides.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[leaf] = value
    return result


def env_overrides(env: dict[str, str]) -> dict[str, Any]:
    """``LAMBDA_ML__KAFKA__PORT=19092`` becomes ``{"kafka.port": 19092}`` (YAML-typed value).

    >>> env_overrides({"LAMBDA_ML__KAFKA__PORT": "19092", "HOME": "/root"})
    {'kafka.port': 19092}
    """
    found: dict[str, Any] = {}
    for name, raw in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = ".".join(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
            found[key] = yaml.safe_load(raw) if raw != "" else ""
    return found


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def _format_error(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> PlatformConfig:
    """Load, expand and validate the platform config.

    ``path`` defaults to ``$LAMBDA_ML_CONFIG`` or ``conf/platform.yaml``; ``overrides`` are
    dotted keys applied after the environment overrides (tests use them for free ports).
    """
    env = dict(os.environ if env is None else env)
    config_path = Path(path or env.get("LAMBDA_ML_CONFIG") or DEFAULT_CONFIG)
    source = str(config_path)
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of sections")
    try:
        tree = expand_env(raw, env)
    except KeyError as exc:
        raise ConfigError(f"{source}: environment variable {exc.args[0]} is not set") from exc
    tree = apply_overrides(tree, {**env_overrides(env), **(overrides or {})})
    try:
        config = PlatformConfig.model_validate({**tree, "source": source})
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None
    lake = config.lake.model_copy(
        update={"root": _absolute_uri(config.lake.root), "checkpoints": _absolute_uri(config.lake.checkpoints)}
    )
    return config.model_copy(update={"lake": lake})


def write_config(cfg: PlatformConfig, path: str | Path) -> Path:
    """Write a resolved config as YAML, for child processes (spark-submit jobs, the service)."""
    target = Path(path)
    target.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return target
