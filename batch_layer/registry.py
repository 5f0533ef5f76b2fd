"""The batch layer's side of the MLflow model registry: register a run's two models as versions
of one registered model with their lineage, decide which alias the new version gets (the quality
gate), find a version already trained from the same inputs, and roll the champion back.

Aliases (all on ONNX versions, the flavor serving loads):

- ``champion``: what serving answers with. It moves only to a version whose holdout AUC beats
  the champion's AUC *on the same holdout rows* (the champion is re-scored on them).
- ``challenger``: the latest version that did not beat the champion.
- ``previous-champion``: the champion before the last move; ``rollback`` goes back to it.

A version's lineage is its horizon plus the SHA-256 of the training config (sections ``ctr``
and ``features``) and of the feature definitions: a second run with the same lineage finds the
first run's versions instead of registering new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlflow.spark
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pyspark.ml import PipelineModel

from lambda_ml import contract
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon

# The registration itself lives in the shared package (the speed layer registers its online
# model the same way).
from lambda_ml.model_registry import RegisteredVersions, _jvm_logger_off

log = logging.getLogger(__name__)

CHAMPION_ALIAS = contract.CHAMPION_ALIAS
CHALLENGER_ALIAS = "challenger"
PREVIOUS_CHAMPION_ALIAS = "previous-champion"

# Lineage: with the horizon tags, what a version was trained from.
TAG_CONFIG_HASH = "config_sha256"
TAG_FEATURES_HASH = "feature_definitions_sha256"
# The quality gate's verdict, on the run and on both versions.
TAG_DECISION = "gate.decision"  # "champion" | "challenger"
TAG_AUC = "gate.auc"  # the new version's holdout AUC
TAG_CHAMPION_VERSION = "gate.champion_version"  # the champion it was compared with, if any
TAG_CHAMPION_AUC = "gate.champion_auc"  # that champion's AUC on the same holdout rows
TAG_REASON = "gate.reason"
# On a version made champion (by the gate or a rollback): the champion it replaced.
TAG_PREVIOUS_CHAMPION = "previous_champion"

# Config sections a model is a function of; the others (ports, paths, URIs) are not hashed.
TRAINING_CONFIG_SECTIONS = ("ctr", "features")


class RollbackError(RuntimeError):
    """The champion cannot be moved where asked (no such version, not an ONNX version...)."""


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested mapping as MLflow params: dotted keys, lists and scalars as text.

    >>> flat_params({"model": "lr", "gbt": {"max_depth": 4}, "grid": [0.1, 1.0]}, "ctr")
    {'ctr.model': 'lr', 'ctr.gbt.max_depth': '4', 'ctr.grid': '[0.1, 1.0]'}
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flat_params(value, name))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def training_config_hash(cfg: PlatformConfig) -> str:
    """SHA-256 of the config sections a model depends on (``ctr`` and ``features``) as canonical
    JSON: a run on another machine, port or lake path hashes the same."""
    sections = cfg.model_dump(mode="json", include=set(TRAINING_CONFIG_SECTIONS))
    return hashlib.sha256(json.dumps(sections, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Lineage:
    """What a model is a function of. Two runs with the same lineage train the same model.

    >>> sorted(Lineage(Horizon.of(impressions=3, clicks=5), "c0ffee", "fea7").tags().items())  # doctest: +NORMALIZE_WHITESPACE
    [('config_sha256', 'c0ffee'), ('feature_definitions_sha256', 'fea7'),
     ('horizon.clicks', '5'), ('horizon.impressions', '3')]
    """

    horizon: Horizon
    config_sha256: str
    features_sha256: str

    def tags(self) -> dict[str, str]:
        return {**self.horizon.tags(), TAG_CONFIG_HASH: self.config_sha256, TAG_FEATURES_HASH: self.features_sha256}


@dataclass(frozen=True)
class ExistingVersions:
    """Versions a previous run registered for the same lineage, and what the gate made of them."""

    versions: RegisteredVersions
    run_id: str
    decision: str | None


def find_registered(client: MlflowClient, registered_model: str, lineage: Lineage) -> ExistingVersions | None:
    """The ONNX version (and its Spark twin) already registered with this lineage, if any; the
    oldest one if an earlier bug or race registered several."""
    if "'" in registered_model:
        raise ValueError(f"registered model names with quotes are not supported: {registered_model!r}")
    clauses = [f"name = '{registered_model}'", f"tags.`{contract.TAG_FLAVOR}` = 'onnx'"]
    clauses += [f"tags.`{key}` = '{value}'" for key, value in lineage.tags().items()]
    found = sorted(client.search_model_versions(" AND ".join(clauses)), key=lambda v: int(v.version))
    complete = [v for v in found if contract.TAG_SPARK_VERSION in v.tags and v.run_id]
    if not complete:
        return None
    first = complete[0]
    if len(complete) > 1:
        log.warning(
            "%s versions %s share one lineage; using the oldest", registered_model, ", ".join(v.version for v in complete)
        )
    versions = RegisteredVersions(spark=first.tags[contract.TAG_SPARK_VERSION], onnx=str(first.version))
    return ExistingVersions(versions, str(first.run_id), first.tags.get(TAG_DECISION))


def alias_versions(client: MlflowClient, registered_model: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model; empty if the model does not exist yet."""
    try:
        return dict(client.get_registered_model(registered_model).aliases)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


# --------------------------------------------------------------------------- the quality gate


@dataclass(frozen=True)
class ChampionScore:
    """The current champion (its ONNX version) and its AUC on the new run's holdout rows, or
    why it could not be scored on them."""

    version: str
    auc: float | None
    unscorable_because: str = ""


@dataclass(frozen=True)
class GateDecision:
    """Which alias a new version gets, and why."""

    decision: str  # CHAMPION_ALIAS or CHALLENGER_ALIAS
    auc: float
    champion: ChampionScore | None
    reason: str

    @property
    def promoted(self) -> bool:
        return self.decision == CHAMPION_ALIAS

    def tags(self) -> dict[str, str]:
        """The verdict as tags; AUCs written with ``repr`` so that they read back exactly."""
        tags = {TAG_DECISION: self.decision, TAG_AUC: repr(self.auc), TAG_REASON: self.reason}
        if self.champion is not None:
            tags[TAG_CHAMPION_VERSION] = self.champion.version
            if self.champion.auc is not None:
                tags[TAG_CHAMPION_AUC] = repr(self.champion.auc)
        return tags


def decide(auc: float, champion: ChampionScore | None, min_gain: float = 0.0) -> GateDecision:
    """The gate: the new version becomes champion if there is none, if the champion cannot be
    scored on this holdout (it reads inputs the current features no longer produce), or if its
    AUC beats the champion's by more than ``min_gain``; challenger otherwise.

    >>> decide(0.70, None).decision
    'champion'
    >>> decide(0.70, ChampionScore("4", 0.72)).decision
    'challenger'
    >>> decide(0.73, ChampionScore("4", 0.72)).decision, decide(0.73, ChampionScore("4", 0.72), 0.02).decision
    ('champion', 'challenger')
    """
    if champion is None:
        return GateDecision(CHAMPION_ALIAS, auc, None, "there was no champion")
    if champion.auc is None:
        reason = f"champion v{champion.version} cannot be scored on this holdout ({champion.unscorable_because})"
        return GateDecision(CHAMPION_ALIAS, auc, champion, reason)
    margin = f" + {min_gain:g}" if min_gain else ""
    if auc > champion.auc + min_gain:
        reason = f"AUC {auc:.4f} beats champion v{champion.version}'s {champion.auc:.4f}{margin} on the same holdout rows"
        return GateDecision(CHAMPION_ALIAS, auc, champion, reason)
    reason = f"AUC {auc:.4f} does not beat champion v{champion.version}'s {champion.auc:.4f}{margin} on the same holdout rows"
    return GateDecision(CHALLENGER_ALIAS, auc, champion, reason)


def score_champion(
    client: MlflowClient, registered_model: str, columns: Sequence[str], auc_of: Callable[[PipelineModel], float]
) -> ChampionScore | None:
    """The champion's AUC on the new run's holdout, from its Spark twin; None without a champion.

    ``columns`` are the holdout's columns and ``auc_of`` scores a Spark model on its rows (the
    same function that measured the new model). A champion reading an input the holdout lacks
    is reported unscorable rather than failing the run.
    """
    version = alias_versions(client, registered_model).get(CHAMPION_ALIAS)
    if version is None:
        return None
    champion = client.get_model_version(registered_model, version)
    inputs = [name for name in champion.tags.get(contract.TAG_MODEL_INPUTS, "").split(",") if name]
    missing = [name for name in inputs if name not in columns]
    if not inputs or missing:
        why = f"it reads inputs the holdout lacks: {missing}" if missing else "it has no model_inputs tag"
        return ChampionScore(str(version), None, why)
    twin = version if champion.tags.get(contract.TAG_FLAVOR) == "spark" else champion.tags.get(contract.TAG_SPARK_VERSION)
    if twin is None:
        return ChampionScore(str(version), None, "it has no Spark twin to score with")
    with _jvm_logger_off("org.apache.spark.ml.util.Instrumentation"):
        model = mlflow.spark.load_model(f"models:/{registered_model}/{twin}")
    score = auc_of(model)
    log.info("champion %s v%s (Spark twin v%s) scores AUC %.4f on this holdout", registered_model, version, twin, score)
    return ChampionScore(str(version), score)


def apply_decision(client: MlflowClient, registered_model: str, versions: RegisteredVersions, gate: GateDecision) -> None:
    """Move the aliases as the gate decided: crown the ONNX version (remembering the champion it
    replaces as ``previous-champion``), or make it ``challenger``."""
    if gate.promoted:
        _crown(client, registered_model, versions.onnx, None if gate.champion is None else gate.champion.version)
    else:
        client.set_registered_model_alias(registered_model, CHALLENGER_ALIAS, versions.onnx)
        log.info("alias %s of %s now points at version %s (%s)", CHALLENGER_ALIAS, registered_model, versions.onnx, gate.reason)


def _crown(client: MlflowClient, registered_model: str, version: str, previous: str | None) -> None:
    # previous-champion first: a crash in between leaves the champion where it was.
    if previous is not None and previous != version:
        client.set_registered_model_alias(registered_model, PREVIOUS_CHAMPION_ALIAS, previous)
        client.set_model_version_tag(registered_model, version, TAG_PREVIOUS_CHAMPION, previous)
    client.set_registered_model_alias(registered_model, CHAMPION_ALIAS, version)
    log.info(
        "alias %s of %s now points at version %s (was %s)",
        CHAMPION_ALIAS,
        registered_model,
        version,
        "unset" if previous is None else f"version {previous}",
    )


# --------------------------------------------------------------------------- rollback


@dataclass(frozen=True)
class Rollback:
    """Where a rollback moved the champion."""

    registered_model: str
    previous: str | None  # the champion before (now previous-champion)
    champion: str

    def summary(self) -> str:
        if self.previous == self.champion:
            return f"version {self.champion} of {self.registered_model} already is the champion: nothing moved"
        return (
            f"champion of {self.registered_model}: version {self.previous or '(none)'} -> version {self.champion}"
            + (f" ({PREVIOUS_CHAMPION_ALIAS} is now version {self.previous})" if self.previous else "")
        )


def rollback(client: MlflowClient, registered_model: str, to: str | None = None) -> Rollback:
    """Point ``champion`` at ``to`` (an ONNX version), by default at ``previous-champion``.

    The champion it replaces becomes ``previous-champion``, so a second rollback undoes the
    first. Serving picks the move up on its next reload.
    """
    aliases = alias_versions(client, registered_model)
    current = aliases.get(CHAMPION_ALIAS)
    if to is None:
        to = aliases.get(PREVIOUS_CHAMPION_ALIAS)
        if to is None:
            raise RollbackError(
                f"{registered_model} has no {PREVIOUS_CHAMPION_ALIAS!r} alias (the champion never moved): "
                "name the version to roll back to with --to VERSION"
            )
    target = _model_version(client, registered_model, str(to))
    flavor = target.tags.get(contract.TAG_FLAVOR)
    if flavor != "onnx":
        twins = client.search_model_versions(
            f"name = '{registered_model}' AND tags.`{contract.TAG_SPARK_VERSION}` = '{target.version}'"
        )
        hint = f"; its ONNX twin is version {twins[0].version}" if twins else ""
        raise RollbackError(
            f"version {target.version} of {registered_model} is a {flavor or 'untagged'} model, "
            f"but serving loads ONNX versions{hint}"
        )
    if current == str(target.version):
        return Rollback(registered_model, current, current)
    _crown(client, registered_model, str(target.version), current)
    return Rollback(registered_model, current, str(target.version))


def _model_version(client: MlflowClient, registered_model: str, version: str) -> ModelVersion:
    if not version.isdigit():
        raise RollbackError(f"a model version is a whole number, not {version!r}")
    try:
        return client.get_model_version(registered_model, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RollbackError(f"{registered_model} has no version {version}") from None
        raise
