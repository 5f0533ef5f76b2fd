"""The batch layer's side of the MLflow model registry: a run's versions of one registered model
with their lineage, which alias the new version gets (the quality gate), a version already
trained from the same inputs, and rolling the champion back.

An application registers its model in one or more flavours (e.g. a Spark pipeline and its
ONNX export); one of them is *served* (tagged ``served=true``), the
others point at it (``served_version``). Aliases are on served versions:

- ``champion``: what serving answers with. It moves only to a version whose holdout quality
  (the application's metric, e.g. AUC) beats the champion's *on the same holdout rows* (the
  candidate re-scores the champion on them).
- ``challenger``: the latest version that did not beat the champion.
- ``previous-champion``: the champion before the last move; ``rollback`` goes back to it.

A version's lineage is its horizon plus the SHA-256 of the training config (the application's
section and ``features``) and of the feature definitions: a second run with the same lineage finds the
first run's versions instead of registering new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lambda_ml import contract
from lambda_ml.apps import Quality, Registered
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import Horizon

log = logging.getLogger(__name__)

CHAMPION_ALIAS = contract.CHAMPION_ALIAS
CHALLENGER_ALIAS = "challenger"
PREVIOUS_CHAMPION_ALIAS = "previous-champion"

# Lineage: with the horizon tags, what a version was trained from.
TAG_CONFIG_HASH = "config_sha256"
TAG_FEATURES_HASH = "feature_definitions_sha256"
# The served flavour of a run's versions, and the others pointing at it.
TAG_SERVED = "served"  # "true" on the version aliases point at
TAG_SERVED_VERSION = "served_version"  # on the other flavours: the served version
# The quality gate's verdict, on the run and on every version: gate.<metric> (the new
# version's holdout quality) and gate.champion_<metric> (the champion's on the same rows).
TAG_DECISION = "gate.decision"  # "champion" | "challenger"
TAG_METRIC = "gate.metric"  # the quality's metric, e.g. "auc"
TAG_HIGHER_IS_BETTER = "gate.higher_is_better"  # "true" | "false"
TAG_CHAMPION_VERSION = "gate.champion_version"  # the champion it was compared with, if any
TAG_REASON = "gate.reason"
# On a version made champion (by the gate or a rollback): the champion it replaced.
TAG_PREVIOUS_CHAMPION = "previous_champion"

# Config sections every model is a function of, besides its application's own section; the
# others (ports, paths, URIs) are not hashed.
TRAINING_CONFIG_SECTIONS = ("app", "events", "features")


class RollbackError(RuntimeError):
    """The champion cannot be moved where asked (no such version, not an ONNX version...)."""


def training_config_hash(cfg: PlatformConfig) -> str:
    """SHA-256 of the config sections a model depends on (the application's section, e.g.
    ``ctr``, and the events and features) as canonical JSON: a run on another machine, port or
    lake path hashes the same."""
    sections = cfg.model_dump(mode="json", include={*TRAINING_CONFIG_SECTIONS, cfg.app.type})
    return hashlib.sha256(json.dumps(sections, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Lineage:
    """What a model is a function of. Two runs with the same lineage train the same model.

    >>> sorted(Lineage(Horizon.of(views=3, orders=5), "c0ffee", "fea7").tags().items())  # doctest: +NORMALIZE_WHITESPACE
    [('config_sha256', 'c0ffee'), ('feature_definitions_sha256', 'fea7'),
     ('horizon.orders', '5'), ('horizon.views', '3')]
    """

    horizon: Horizon
    config_sha256: str
    features_sha256: str

    def tags(self) -> dict[str, str]:
        return {**self.horizon.tags(), TAG_CONFIG_HASH: self.config_sha256, TAG_FEATURES_HASH: self.features_sha256}


@dataclass(frozen=True)
class ExistingVersions:
    """Versions a previous run registered for the same lineage, and what the gate made of them."""

    versions: Registered
    run_id: str
    decision: str | None


def find_registered(client: MlflowClient, registered_model: str, lineage: Lineage) -> ExistingVersions | None:
    """The served version (and the other flavours of its run) already registered with this
    lineage, if any; the oldest one if an earlier bug or race registered several."""
    if "'" in registered_model:
        raise ValueError(f"registered model names with quotes are not supported: {registered_model!r}")
    clauses = [f"name = '{registered_model}'", f"tags.`{TAG_SERVED}` = 'true'"]
    clauses += [f"tags.`{key}` = '{value}'" for key, value in lineage.tags().items()]
    found = sorted(client.search_model_versions(" AND ".join(clauses)), key=lambda v: int(v.version))
    complete = [v for v in found if v.run_id]
    if not complete:
        return None
    first = complete[0]
    if len(complete) > 1:
        log.warning(
            "%s versions %s share one lineage; using the oldest", registered_model, ", ".join(v.version for v in complete)
        )
    twins = client.search_model_versions(f"name = '{registered_model}' AND tags.`{TAG_SERVED_VERSION}` = '{first.version}'")
    others = {v.tags.get(contract.TAG_FLAVOR, f"v{v.version}"): str(v.version) for v in twins}
    return ExistingVersions(Registered(str(first.version), others), str(first.run_id), first.tags.get(TAG_DECISION))


def mark_served(client: MlflowClient, registered_model: str, versions: Registered) -> None:
    """Tag the served version, and point the other flavours at it (what :func:`find_registered`
    and :func:`rollback` read)."""
    client.set_model_version_tag(registered_model, versions.served, TAG_SERVED, "true")
    for version in versions.others.values():
        client.set_model_version_tag(registered_model, version, TAG_SERVED_VERSION, versions.served)


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
    """The current champion and its quality on the new run's holdout rows, or why it could not
    be scored on them."""

    version: str
    value: float | None
    unscorable_because: str = ""


@dataclass(frozen=True)
class GateDecision:
    """Which alias a new version gets, and why."""

    decision: str  # CHAMPION_ALIAS or CHALLENGER_ALIAS
    quality: Quality
    champion: ChampionScore | None
    reason: str

    @property
    def promoted(self) -> bool:
        return self.decision == CHAMPION_ALIAS

    def tags(self) -> dict[str, str]:
        """The verdict as tags; values written with ``repr`` so that they read back exactly."""
        metric = self.quality.metric
        tags = {
            TAG_DECISION: self.decision,
            TAG_METRIC: metric,
            TAG_HIGHER_IS_BETTER: str(self.quality.higher_is_better).lower(),
            f"gate.{metric}": repr(self.quality.value),
            TAG_REASON: self.reason,
        }
        if self.champion is not None:
            tags[TAG_CHAMPION_VERSION] = self.champion.version
            if self.champion.value is not None:
                tags[f"gate.champion_{metric}"] = repr(self.champion.value)
        return tags


def recorded_quality(tags: Mapping[str, str]) -> Quality:
    """The candidate quality a run's gate tags record (NaN when the run has none).

    >>> recorded_quality(GateDecision("champion", Quality("auc", 0.7, True), None, "first").tags())
    Quality(metric='auc', value=0.7, higher_is_better=True, margin=0.0)
    """
    metric = tags.get(TAG_METRIC, "")
    return Quality(metric, float(tags.get(f"gate.{metric}", "nan")), tags.get(TAG_HIGHER_IS_BETTER, "true") == "true")


def decide(quality: Quality, champion: ChampionScore | None, margin: float | None = None) -> GateDecision:
    """The gate: the new version becomes champion if there is none, if the champion cannot be
    scored on this holdout (it reads inputs the current features no longer produce), or if its
    quality beats the champion's by more than ``margin`` (default: the quality's own, from the
    application's config); challenger otherwise.

    >>> auc = lambda value: Quality("auc", value, higher_is_better=True)
    >>> decide(auc(0.70), None).decision
    'champion'
    >>> decide(auc(0.70), ChampionScore("4", 0.72)).decision
    'challenger'
    >>> decide(auc(0.73), ChampionScore("4", 0.72)).decision, decide(auc(0.73), ChampionScore("4", 0.72), 0.02).decision
    ('champion', 'challenger')
    >>> decide(Quality("inertia", 9.0, higher_is_better=False), ChampionScore("4", 10.0)).reason
    "inertia 9.0000 beats champion v4's 10.0000 on the same holdout rows"
    """
    if champion is None:
        return GateDecision(CHAMPION_ALIAS, quality, None, "there was no champion")
    if champion.value is None:
        reason = f"champion v{champion.version} cannot be scored on this holdout ({champion.unscorable_because})"
        return GateDecision(CHAMPION_ALIAS, quality, champion, reason)
    margin = quality.margin if margin is None else margin
    shown = quality.metric.upper() if quality.metric in ("auc", "rmse", "mae") else quality.metric
    margin_text = f" + {margin:g}" if margin else ""
    versus = f"champion v{champion.version}'s {champion.value:.4f}{margin_text} on the same holdout rows"
    if quality.beats(champion.value, margin):
        return GateDecision(CHAMPION_ALIAS, quality, champion, f"{shown} {quality.value:.4f} beats {versus}")
    return GateDecision(CHALLENGER_ALIAS, quality, champion, f"{shown} {quality.value:.4f} does not beat {versus}")


def score_champion(
    client: MlflowClient, registered_model: str, score: Callable[[ModelVersion], tuple[float | None, str]]
) -> ChampionScore | None:
    """The champion's quality on the new run's holdout, as the candidate's ``score`` measures it
    (None and why when it cannot); None without a champion."""
    version = alias_versions(client, registered_model).get(CHAMPION_ALIAS)
    if version is None:
        return None
    value, why = score(client.get_model_version(registered_model, version))
    if value is not None:
        log.info("champion %s v%s scores %.4f on this holdout", registered_model, version, value)
    return ChampionScore(str(version), value, why)


def apply_decision(client: MlflowClient, registered_model: str, versions: Registered, gate: GateDecision) -> None:
    """Move the aliases as the gate decided: crown the served version (remembering the champion
    it replaces as ``previous-champion``), or make it ``challenger``."""
    if gate.promoted:
        _crown(client, registered_model, versions.served, None if gate.champion is None else gate.champion.version)
    else:
        client.set_registered_model_alias(registered_model, CHALLENGER_ALIAS, versions.served)
        log.info("alias %s of %s now points at version %s (%s)", CHALLENGER_ALIAS, registered_model, versions.served, gate.reason)


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
    """Point ``champion`` at ``to`` (a served version), by default at ``previous-champion``.

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
    if target.tags.get(TAG_SERVED) != "true":
        flavor = target.tags.get(contract.TAG_FLAVOR)
        served = target.tags.get(TAG_SERVED_VERSION)
        hint = f"; the version served in its place is {served}" if served else ""
        raise RollbackError(
            f"version {target.version} of {registered_model} is a {flavor or 'untagged'} model serving does not load{hint}"
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
