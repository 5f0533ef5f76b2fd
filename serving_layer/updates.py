"""Model updates from Kafka: a fast path for alias moves, and the way the speed layer's online
model reaches the service. Records on the compacted topic ``kafka.topics.model_updates`` follow
one format, defined in ``lambda_ml.contract`` (:class:`~lambda_ml.contract.ModelUpdate`): a
registry alias move (``{"registered_model", "alias", "version", "generation"}``) makes the
listener reload the model store at once instead of waiting for the next registry poll; an update
carrying a model as data (alias ``speed``: the CTR application's ``linear`` weights,
another application's ``data``) is handed to the store as it is, to be served from memory. An update older than one already applied for its alias (an older generation, or fewer
online updates in the same generation) is stale and ignored. Kafka down only means waiting for
the poll: the listener reconnects by itself and never touches requests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from lambda_ml.contract import Horizon, ModelUpdate, parse_model_update
from serving_layer.reloadable import BackgroundLoop

log = logging.getLogger(__name__)

__all__ = ["ModelUpdate", "ModelUpdateListener", "parse_model_update"]


class ModelUpdateListener(BackgroundLoop):
    """Reads the model-update topic from its start (compacted: the last update per alias) on a
    background thread and calls ``reload`` for each fresh update of one of ``aliases``: with no
    argument for a registry alias move, with the update for a model that travels as data
    (``ModelStore.reload`` accepts both)."""

    thread_name = "model-updates"

    def __init__(
        self, bootstrap_servers: str, topic: str, registered_model: str, aliases: Sequence[str], reload: Callable[..., object]
    ) -> None:
        super().__init__()
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.registered_model, self.aliases = registered_model, tuple(aliases)
        self._reload = reload
        self.latest: dict[str, ModelUpdate] = {}  # alias -> the last update applied
        self.applied = self.stale = self.invalid = 0
        self.problem: str | None = None  # why the topic cannot be read, while it cannot

    @property
    def generations(self) -> dict[str, Horizon]:
        """alias -> the generation of the last update applied."""
        return {alias: update.generation for alias, update in self.latest.items()}

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
        applied = self.latest.get(update.alias)
        if update.is_stale(applied):
            self.stale += 1
            log.info("ignored a stale update of %s@%s to version %d (%s%s; applied %s%s)", update.registered_model,
                     update.alias, update.version, update.generation, _steps(update), applied.generation if applied else None, _steps(applied))  # fmt: skip
            return False
        self.latest[update.alias] = update
        self.applied += 1
        try:
            if update.linear is not None or update.data is not None:
                self._reload(update)
            else:
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
                if self.problem is not None:
                    log.info("model updates: reading %s again", self.topic)
                    self.problem = None
                while not self._stop.is_set():
                    for records in consumer.poll(timeout_ms=500).values():
                        for record in records:
                            if record.value is not None:
                                self.handle(record.value)
            except Exception as exc:  # noqa: BLE001 - Kafka down: retry; serving goes on meanwhile
                # Once per reason: Kafka itself being down is reported by the service's probe.
                if str(exc) != self.problem:
                    log.warning("model updates from %s unavailable (%s); retrying every 5 s", self.topic, exc)
                self.problem = str(exc)
                self._stop.wait(5)
            finally:
                if consumer is not None:
                    consumer.close()


def _steps(update: ModelUpdate | None) -> str:
    return "" if update is None or update.updates is None else f", {update.updates} online updates"
