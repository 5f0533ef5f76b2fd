"""A click-through event generator with a known ground truth.

Each impression is clicked with probability ``sigmoid(bias + user affinity + item quality +
device effect + position effect)``. Clicks follow their impression after a random delay (most
within minutes, some after the attribution window), some are sent out of order (late), some
twice (duplicates), and a share of extra malformed records is mixed in. The same seed gives the
same users and items; each run that sends them draws new events of theirs (``generate``'s
``draw``). :class:`GroundTruth` says exactly what the lake must end up holding.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from lambda_ml.config import GeneratorConfig, PlatformConfig
from lambda_ml.producer import Record, iso, produce

log = logging.getLogger(__name__)

# Devices the generator emits; the model one-hot encodes them and treats others as unknown.
DEVICES = ("mobile", "desktop", "tablet")
BIAS = -2.2
DEVICE_EFFECT = {"mobile": 0.3, "desktop": 0.0, "tablet": -0.3}
POSITION_EFFECT = -0.35  # per slot below the first
MAX_POSITION = 5
# Most clicks come minutes after the impression; a tail comes after the attribution window.
LATE_CLICK_SHARE = 0.08
MALFORMED_KINDS = ("not_json", "not_object", "missing_field", "wrong_type", "bad_time", "absurd_time", "empty")


@dataclass
class GroundTruth:
    """What the generator sent, counted independently of the platform."""

    impressions: int = 0
    clicks_sent: int = 0  # valid click records, duplicates included
    distinct_clicks: int = 0
    positives: int = 0  # impressions clicked within the attribution window
    malformed: Counter[str] = field(default_factory=Counter)

    @property
    def valid_records(self) -> int:
        return self.impressions + self.clicks_sent

    @property
    def malformed_total(self) -> int:
        return sum(self.malformed.values())


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _encode(payload: dict[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _malformed(kind: str, rng: random.Random, now: datetime) -> Record:
    """A record the ingest must quarantine, of the given kind."""
    good = {
        "event_id": f"bad-{rng.getrandbits(48):012x}",
        "event_time": iso(now),
        "user_id": "u0",
        "item_id": "i0",
        "device": "mobile",
        "position": 1,
    }
    if kind == "not_json":
        value = b'{"event_id": "broken", "event_time": '
    elif kind == "not_object":
        value = b"[1, 2, 3]"
    elif kind == "missing_field":
        value = _encode({k: v for k, v in good.items() if k != "user_id"})
    elif kind == "wrong_type":
        value = _encode({**good, "position": "top"})
    elif kind == "bad_time":
        value = _encode({**good, "event_time": "yesterday"})
    elif kind == "absurd_time":
        value = _encode({**good, "event_time": "1900-01-01T00:00:00.000Z"})
    else:  # empty
        value = b""
    return Record("impressions", b"bad", value)


def generate(
    gen: GeneratorConfig, attribution_window: timedelta, now: datetime | None = None, draw: str = ""
) -> tuple[list[Record], GroundTruth]:
    """Generate the records to send, in send order, and the ground truth they imply.

    The users and items (each one's affinity or quality) come from ``gen.seed``; the events from
    the seed and ``draw``: the same seed and draw give the same events (ending at ``now``),
    another draw other events of the same users and items (no draw: the draw of the seed alone).

    >>> from lambda_ml.config import GeneratorConfig
    >>> records, truth = generate(GeneratorConfig(impressions=200, seed=1), timedelta(minutes=30),
    ...                           now=datetime(2026, 1, 1, tzinfo=UTC))
    >>> truth.impressions, len(records) == truth.valid_records + truth.malformed_total
    (200, True)
    """
    now = now or datetime.now(UTC)
    start = now - timedelta(hours=gen.span_hours)
    rng = random.Random(gen.seed)
    user_affinity = [rng.gauss(0, 0.6) for _ in range(gen.users)]
    item_quality = [rng.gauss(0, 0.8) for _ in range(gen.items)]
    truth = GroundTruth()
    timed: list[tuple[datetime, int, Record]] = []  # (send-order time, tie-breaker, record)
    span_s = gen.span_hours * 3600
    # Ids are unique per (seed, generation time), so a second run adds new events.
    run_tag = f"{gen.seed}-{int(now.timestamp())}"
    if draw:
        rng = random.Random(f"{gen.seed}/{draw}")

    for n in range(gen.impressions):
        ts = start + timedelta(seconds=rng.random() * span_s)
        user, item = rng.randrange(gen.users), rng.randrange(gen.items)
        device = rng.choices(DEVICES, weights=(0.6, 0.3, 0.1))[0]
        position = rng.randint(1, MAX_POSITION)
        event_id = f"imp-{run_tag}-{n}"
        impression = {
            "event_id": event_id,
            "event_time": iso(ts),
            "user_id": f"u{user}",
            "item_id": f"i{item}",
            "device": device,
            "position": position,
        }
        timed.append((ts, len(timed), Record("impressions", f"u{user}".encode(), _encode(impression))))
        truth.impressions += 1
        logit = BIAS + user_affinity[user] + item_quality[item] + DEVICE_EFFECT[device] + POSITION_EFFECT * (position - 1)
        if rng.random() >= sigmoid(logit):
            continue
        if rng.random() < LATE_CLICK_SHARE:
            delay = attribution_window + timedelta(seconds=rng.uniform(1, 3600))
        else:
            delay = timedelta(seconds=min(rng.expovariate(1 / 120), attribution_window.total_seconds()))
        click_ts = ts + delay
        if click_ts > now:
            continue  # has not happened yet
        click = {"event_id": f"clk-{run_tag}-{n}", "impression_id": event_id, "event_time": iso(click_ts)}
        record = Record("clicks", event_id.encode(), _encode(click))
        # Out-of-order clicks are sent up to 10 minutes after their event time.
        send_ts = click_ts + timedelta(minutes=rng.uniform(1, 10)) if rng.random() < gen.late_fraction else click_ts
        copies = 2 if rng.random() < gen.duplicate_fraction else 1
        for _ in range(copies):
            timed.append((send_ts, len(timed), record))
        truth.clicks_sent += copies
        truth.distinct_clicks += 1
        truth.positives += int(delay <= attribution_window)

    n_bad = round(gen.impressions * gen.malformed_fraction)
    for i in range(n_bad):
        kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
        timed.append((start + timedelta(seconds=rng.random() * span_s), len(timed), _malformed(kind, rng, now)))
        truth.malformed[kind] += 1
    timed.sort(key=lambda t: (t[0], t[1]))
    return [record for _, _, record in timed], truth


def run(cfg: PlatformConfig, now: datetime | None = None) -> GroundTruth:
    """Generate the configured stream, send it to Kafka and return its ground truth. Each run
    draws new events of the same users and items (the draw is the generation time): a copy of
    an earlier run's events shifted by a few minutes would let every impression's features count
    its twin's click."""
    window = timedelta(minutes=cfg.ctr.attribution_window_minutes)
    now = now or datetime.now(UTC)
    records, truth = generate(cfg.generator, window, now, draw=now.isoformat())
    log.info(
        "sending %d impressions, %d clicks (%d distinct) and %d malformed records to %s",
        truth.impressions, truth.clicks_sent, truth.distinct_clicks, truth.malformed_total, cfg.kafka.bootstrap_servers,
    )  # fmt: skip
    produce(cfg, records)
    return truth
