"""``python -m serving_layer [--config FILE] [--host H] [--port P]``: run the prediction service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lambda_ml.config import load_command_config
from lambda_ml.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving_layer",
        description=(
            "Serve the application's answers over HTTP (app.type: POST /predict, POST /assign...), "
            "GET /features/{entity}/{key...}, /models, /health, /ready, /metrics; OpenAPI at /docs. Answers "
            "with the versions behind the registry aliases serving.model_alias and serving.candidate_aliases "
            "(polled and hot-swapped), on the batch views merged with the speed layer's increments."
        ),
    )
    parser.add_argument("--config", metavar="FILE", help="platform config (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    parser.add_argument("--host", help="address to bind (default: serving.host, loopback)")
    parser.add_argument("--port", type=int, help="port to bind (default: serving.port)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, load the config and serve until interrupted; 2 on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")
    setup_logging(args.verbose)
    cfg = load_command_config(args.config)
    if cfg is None:
        return 2
    from serving_layer.app import serve  # after logging is set up: it imports onnxruntime, deltalake

    serve(cfg, host=args.host, port=args.port, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
