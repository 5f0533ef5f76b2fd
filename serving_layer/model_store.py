"""The models the service answers with: the versions behind the registry aliases the service
follows (``serving.aliases``), loaded by the application (``ServingModels.load``) from the
artefacts downloaded here, and the models that travel as data on the model-update topic (the
speed layer's), applied by the application (``ServingModels.apply``).

The ``ModelStore`` swaps a ``ServedModels`` (alias -> model) whole; the service's poller calls
``ModelStore.reload()`` every ``serving.poll_interval_s``, so an alias moved in the registry (a
new champion, a rollback) is served without a restart and without a failed request.
"""

from __future__ import annotations

import logging
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

from lambda_ml.apps import ServingModel, ServingModels, VersionInfo
from lambda_ml.config import PlatformConfig
from lambda_ml.contract import ModelUpdate
from serving_layer.dependencies import Dependency, DependencyStatus
from serving_layer.reloadable import Reloadable

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The alias resolves to nothing usable; the message says what and where."""


def no_version_yet(registered_model: str, alias: str) -> str:
    """Why nothing can be served before the first batch run registers a champion.

    >>> no_version_yet("ctr", "champion")
    "no version of registered model 'ctr' has alias 'champion' yet: run the batch layer first"
    """
    return f"no version of registered model {registered_model!r} has alias {alias!r} yet: run the batch layer first"


class RegistryUnavailable(ModelLoadError):
    """The registry itself could not be read (down, or failing): every alias would fail alike.
    ``reason`` says it without naming the registry (the dependency's line names it)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_registry_reachable(tracking_uri: str, timeout_s: float = 3.0) -> None:
    """Fail fast when an HTTP tracking server does not answer (the MLflow client would retry
    for minutes); other URIs (sqlite, file) are left to the client."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answers; the client will report what is wrong
    except OSError as exc:
        raise RegistryUnavailable(
            f"the MLflow tracking server at {tracking_uri} does not answer ({exc})", f"unreachable ({exc})"
        ) from exc


class Registry(Protocol):
    """Where model versions come from: the MLflow registry in the service (``MlflowRegistry``)."""

    name: str  # the registered model

    def resolve(self, alias: str) -> VersionInfo | None:
        """The version behind ``alias``, None if no version has it; raises if unreachable."""
        ...

    def load(self, info: VersionInfo, alias: str) -> ServingModel:
        """Download and open one version (slow: called off the request path)."""
        ...


class MlflowRegistry:
    """The versions of ``mlflow.registered_model`` in the MLflow registry at ``mlflow.tracking_uri``,
    opened by the application's ``ServingModels``."""

    def __init__(self, cfg: PlatformConfig, models: ServingModels) -> None:
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.models = models
        self.name = cfg.mlflow.registered_model
        self.uri = cfg.mlflow.tracking_uri
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def resolve(self, alias: str) -> VersionInfo | None:
        from mlflow.exceptions import MlflowException

        check_registry_reachable(self.uri)
        try:
            version = self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as exc:
            # A missing model is RESOURCE_DOES_NOT_EXIST; a missing alias on an existing model
            # is INVALID_PARAMETER_VALUE "Registered model alias ... not found." (MLflow 3.17).
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc.message):
                return None
            raise RegistryUnavailable(
                f"could not resolve models:/{self.name}@{alias} in {self.uri}: {exc.message}", f"failing ({exc.message})"
            ) from exc
        return VersionInfo(int(version.version), version.run_id, dict(version.tags or {}))

    def load(self, info: VersionInfo, alias: str) -> ServingModel:
        what = f"models:/{self.name}/{info.version}"
        check_registry_reachable(self.uri)
        with tempfile.TemporaryDirectory(prefix="lambda-ml-model-") as tmp:
            import mlflow.artifacts

            started = time.monotonic()
            local = mlflow.artifacts.download_artifacts(artifact_uri=what, dst_path=tmp, tracking_uri=self.uri, registry_uri=self.uri)
            log.debug("downloaded %s in %.1f s", what, time.monotonic() - started)
            # The application keeps what it needs in memory; the downloaded files can go.
            return self.models.load(self.cfg, info, alias, Path(local))


def load_registered_model(cfg: PlatformConfig, alias: str | None = None) -> ServingModel:
    """Resolve ``models:/<registered_model>@<alias>`` (default ``serving.model_alias``),
    download it and open it with the application's ``ServingModels``."""
    from lambda_ml.apps import load_application

    alias = alias or cfg.serving.model_alias
    app = load_application(cfg)
    assert app.serving is not None, f"the {app.name} application has no serving side"
    registry = MlflowRegistry(cfg, app.serving)
    info = registry.resolve(alias)
    if info is None:
        raise ModelLoadError(
            f"no version of registered model {registry.name!r} has alias {alias!r} in {registry.uri} yet: "
            "run the batch layer first"
        )
    return registry.load(info, alias)


@dataclass(frozen=True)
class ServedModels:
    """Every loaded alias -> its version, swapped in as one object: a request reads it once
    and scores with the versions it names, whatever moves meanwhile."""

    primary: str
    by_alias: Mapping[str, ServingModel]
    problems: tuple[str, ...] = ()

    @property
    def champion(self) -> ServingModel:
        """The version behind the primary alias (``serving.model_alias``)."""
        return self.by_alias[self.primary]

    def distinct(self) -> list[ServingModel]:
        """One model per loaded version, the primary alias's first, then by alias order."""
        seen: dict[tuple[int, str], ServingModel] = {}
        for model in (self.champion, *self.by_alias.values()):
            seen.setdefault(model.identity, model)
        return list(seen.values())

    def versions(self) -> dict[str, int]:
        return {alias: model.version for alias, model in self.by_alias.items()}


class ModelStore(Reloadable[ServedModels]):
    """The versions behind ``serving.aliases``; ``reload()`` (called by the poller every
    ``serving.poll_interval_s``) re-resolves every alias and swaps in a new ``ServedModels``
    when one moved. A version loaded before is reused at once (a rollback costs no download);
    one that fails to load leaves its alias on the version it had.

    A model that travels as data (the speed layer's online model) is given to ``reload(update)``
    and served under its alias from then on, in place of what the registry holds for that alias.
    """

    def __init__(
        self, name: str, registry: Registry, aliases: Sequence[str], keep_versions: int = 8,
        models: ServingModels | None = None, cfg: PlatformConfig | None = None, dependency: Dependency | None = None,
    ) -> None:
        super().__init__(name, self._refresh)
        self.registry = registry
        # The registry's status: failed while it cannot be read (the versions loaded stay).
        self.dependency = dependency or DependencyStatus().declare("registry", f"the registry of {registry.name}")
        self.aliases = tuple(aliases)
        self.keep_versions = keep_versions
        self.models, self.cfg = models, cfg
        self._loaded: dict[int, ServingModel] = {}  # version -> model, most recently used last
        self._inline: dict[str, ServingModel] = {}  # alias -> model received as data
        self._kept_last_good = False  # the last refresh kept a version it could not refresh
        self.swaps = 0

    @classmethod
    def from_config(cls, cfg: PlatformConfig, models: ServingModels, dependencies: DependencyStatus | None = None) -> ModelStore:
        """The store of ``cfg``'s registered model, its versions opened by ``models`` (the
        application's serving side), reporting the registry's state to ``dependencies``."""
        dependency = (dependencies or DependencyStatus()).declare("registry", f"MLflow registry at {cfg.mlflow.tracking_uri}")
        return cls(
            f"models:/{cfg.mlflow.registered_model}@{cfg.serving.model_alias}", MlflowRegistry(cfg, models), cfg.serving.aliases,
            models=models, cfg=cfg, dependency=dependency,
        )  # fmt: skip

    def reload(self, update: ModelUpdate | None = None) -> ServedModels:
        """Re-resolve every alias and swap in what moved; with an ``update`` carrying a model as
        data, serve that model under its alias first. Raises if the update cannot be served
        (the alias keeps its model) or if no champion can be served."""
        if update is not None:
            if self.models is None or self.cfg is None:
                raise ModelLoadError("this store was built without the application's serving side: it cannot apply an update")
            model = self.models.apply(self.cfg, update)
            if model is None:
                raise ValueError(f"the update of {update.alias} carries no model; reload() without it")
            with self._lock:
                self._inline[update.alias] = model
            log.info("model as data for %s: %s", update.alias, model.describe())
        return super().reload()

    def _is_partial(self, value: ServedModels) -> bool:
        return self._kept_last_good

    def _on_failure(self, error: str, exc: Exception) -> None:
        if not isinstance(exc, RegistryUnavailable):  # that one is the registry's, reported by _refresh
            super()._on_failure(error, exc)

    def _model_for(self, info: VersionInfo, alias: str) -> ServingModel:
        model = self._loaded.pop(info.version, None)
        if model is None:
            model = self.registry.load(info, alias)
            log.info("loaded %s", model.describe())
        self._loaded[info.version] = model
        while len(self._loaded) > self.keep_versions:
            self._loaded.pop(next(iter(self._loaded)))
        # Tags (the quality score) may change on a version without a new artefact.
        return model.relabel(alias, info.tags)

    def _refresh(self) -> ServedModels:
        previous = self.current
        old = dict(previous.by_alias) if previous is not None else {}
        found: dict[str, ServingModel] = {}
        problems: list[str] = []
        primary = self.aliases[0]
        unavailable: RegistryUnavailable | None = None
        for alias in self.aliases:
            try:
                info = self.registry.resolve(alias)
                if info is None:
                    continue  # not (or no longer) assigned: nothing to serve for it
                found[alias] = self._model_for(info, alias)
            except RegistryUnavailable as exc:
                unavailable = exc  # every other alias would wait and fail alike
                break
            except Exception as exc:  # noqa: BLE001 - the alias keeps its version; the reason is reported
                if alias == primary and primary not in old:
                    raise
                problems.append(f"models:/{self.registry.name}@{alias} could not be refreshed: {exc}")
                if alias in old:
                    found[alias] = old[alias]
        if unavailable is not None:
            for alias in self.aliases:
                if alias not in found and alias in old:
                    found[alias] = old[alias]
            kept = ", ".join(f"{alias} v{model.version}" for alias, model in found.items())
            self.dependency.failed(
                unavailable.reason,
                f"serving the loaded versions ({kept})" if kept else "no model to serve: the application's routes answer 503",
            )
            if primary not in found:
                raise unavailable
        else:
            self.dependency.ok()
        self._kept_last_good = unavailable is not None or bool(problems)
        for alias, model in self._inline.items():
            if alias in self.aliases:
                found[alias] = model
        if primary not in found:
            # Never assigned, or removed: a champion served before keeps serving (slot keeps it).
            raise ModelLoadError(no_version_yet(self.registry.name, primary))
        served = ServedModels(primary, MappingProxyType(found), tuple(problems))
        for problem in problems:
            if previous is None or problem not in previous.problems:
                log.warning("%s; the alias keeps the version it had", problem)  # once, not at every poll
        if previous is not None and (served.versions(), served.problems) == (previous.versions(), previous.problems):
            same_inline = all(found[a] is old[a] for a in self._inline if a in found)
            if same_inline and all(found[a].quality == old[a].quality for a in found):
                return previous  # nothing moved: keep the very same object
        if previous is None or served.versions() != previous.versions():
            self.swaps += previous is not None
            log.info("serving versions %s", served.versions())
        return served
