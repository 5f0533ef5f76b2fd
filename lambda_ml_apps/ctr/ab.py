"""The ``ab`` policy's split: each user goes to the champion or the challenger arm by a stable
hash of the user id, so a user sees one model for as long as the split's settings stay the same
and the arms can be compared on live traffic (``lambda-ml batch evaluate``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

CHAMPION_ARM = "champion"
CHALLENGER_ARM = "challenger"


def user_bucket(user_id: str, salt: str) -> float:
    """A number in [0, 1) fixed by ``salt`` and the user id (SHA-256, first 8 bytes).

    >>> user_bucket("u42", "ab") == user_bucket("u42", "ab"), 0 <= user_bucket("u42", "ab") < 1
    (True, True)
    """
    digest = hashlib.sha256(f"{salt}\x00{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arm_of(user_id: str, challenger_fraction: float, salt: str) -> str:
    """``challenger`` for the users whose bucket is below ``challenger_fraction``, else ``champion``.

    >>> arm_of("u42", 0.0, "ab"), arm_of("u42", 1.0, "ab")
    ('champion', 'challenger')
    """
    return CHALLENGER_ARM if user_bucket(user_id, salt) < challenger_fraction else CHAMPION_ARM


def split_rows(user_ids: Sequence[str], challenger_fraction: float, salt: str) -> dict[str, list[int]]:
    """Row indexes per arm, in request order.

    >>> split_rows(["a", "b", "a"], 0.0, "ab")
    {'champion': [0, 1, 2], 'challenger': []}
    """
    arms: dict[str, list[int]] = {CHAMPION_ARM: [], CHALLENGER_ARM: []}
    for n, user in enumerate(user_ids):
        arms[arm_of(user, challenger_fraction, salt)].append(n)
    return arms
