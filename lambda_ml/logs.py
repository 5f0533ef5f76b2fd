"""Plain-words logging for every command."""

from __future__ import annotations

import logging

# Client libraries that narrate every connection at INFO.
_CHATTY = ("kafka", "py4j", "urllib3", "alembic", "httpx", "mlflow.store", "numexpr")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-5s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
