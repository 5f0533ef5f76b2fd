"""Model updates from Kafka: a fast path for alias moves. The batch layer (or an operator)
publishes ``{"registered_model", "alias", "version", "generation"}`` on the compacted topic
``kafka.topics.model_updates`` (see ``lambda_ml.contract``); the listener reloads the model store
at once instead of waiting for the next registry poll. An update from an older generation (an
older bronze horizon) than one already applied for its alias is stale and ignored. Kafka down
only means waiting for the poll: the listener reconnects by itself and never touches requests.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lambda_ml import contract
from lambda_ml.contract import Horizon
from serving_layer.reloadable import BackgroundLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelUpdate:
    registered_model: str
    alias: str
    version: int
    generation: Horizon


def parse_model_update(value: bytes) -> ModelUpdate:
    """One update record's value; ValueError naming what is wrong.

    >>> parse_model_update(b'{"registered_model": "ctr", "alias": "champion", "version": 7, '
    ...                    b'"generation": {"impressions": 12, "clicks": 11}}')
    ModelUpdate(registered_model='ctr', alias='champion', version=7, generation=Horizon(impressions=12, clicks=11))
    >>> parse_model_update(b'{"alias": "champion"}')
    Traceback (most recent call last):
    ...
    ValueError: model update lacks registered_model, version, generation
    """
    try:
        body = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"model update is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("model update is not a JSON object")
    missing = [f for f in contract.MODEL_UPDATE_FIELDS if f not in body]
    if missing:
        raise ValueError(f"model update lacks {', '.join(missing)}")
    generation = body["generation"] if isinstance(body["generation"], dict) else {}
    parts = (generation.get("impressions"), generation.get("clicks"))
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in parts) or not isinstance(body["version"], int):
        raise ValueError("model update needs an integer version and generation {impressions, clicks}")
    return ModelUpdate(str(body["registered_model"]), str(body["alias"]), body["version"], Horizon(*parts))


def is_stale(generation: Horizon, applied: Horizon | None) -> bool:
    """True when ``generation`` is older than the one applied: either bronze version went back.

    >>> is_stale(Horizon(5, 4), Horizon(6, 4)), is_stale(Horizon(6, 4), Horizon(6, 4)), is_stale(Horizon(7, 5), None)
    (True, False, False)
    """
    if applied is None:
        return False
    return (generation.impressions or 0) < (applied.impressions or 0) or (generation.clicks or 0) < (applied.clicks or 0)


class ModelUpdateListener(BackgroundLoop):
    """Reads the model-update topic from its start (compacted: the last update per alias) on a
    background thread and calls ``reload`` for each fresh update of one of ``aliases``."""

    thread_name = "model-updates"

    def __init__(
        self, bootstrap_servers: str, topic: str, registered_model: str, aliases: Sequence[str], reload: Callable[[], object]
    ) -> None:
        super().__init__()
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.registered_model, self.aliases = registered_model, tuple(aliases)
        self._reload = reload
        self.generations: dict[str, Horizon] = {}
        self.applied = self.stale = self.invalid = 0

    def handle(self, value: bytes) -> bool:
        """Apply one record; True if it triggered a reload."""
        try:
            update = parse_model_update(value)
        except ValueError as exc:
            self.invalid += 1
            log.warning("ignored a record on %s: %s", self.topic, exc)
            return False
        if update.registered_model != self.registered_model or update.alias not in self.aliases:
            return False
        if is_stale(update.generation, self.generations.get(update.alias)):
            self.stale += 1
            log.info("ignored a stale update of %s@%s to version %d (%s; applied %s)", update.registered_model,
                     update.alias, update.version, update.generation, self.generations[update.alias])  # fmt: skip
            return False
        self.generations[update.alias] = update.generation
        self.applied += 1
        try:
            self._reload()
        except Exception as exc:  # noqa: BLE001 - logged by the store; the poll retries
            log.warning("reload after the update of %s@%s failed: %s", update.registered_model, update.alias, exc)
        return True

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        while not self._stop.is_set():
            consumer = None
            try:
                consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, group_id=None, enable_auto_commit=False)
                partitions = consumer.partitions_for_topic(self.topic) or set()
                if not partitions:
                    raise RuntimeError(f"topic {self.topic} does not exist yet")
                assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
                consumer.assign(assigned)
                consumer.seek_to_beginning(*assigned)
                while not self._stop.is_set():
                    for records in consumer.poll(timeout_ms=500).values():
                        for record in records:
                            if record.value is not None:
                                self.handle(record.value)
            except Exception as exc:  # noqa: BLE001 - Kafka down: retry; serving goes on meanwhile
                log.warning("model updates from %s unavailable (%s); retrying", self.topic, exc)
                self._stop.wait(5)
            finally:
                if consumer is not None:
                    consumer.close()
