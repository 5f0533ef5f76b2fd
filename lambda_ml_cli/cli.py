"""``lambda-ml``: one command line for every part of the platform.

    lambda-ml setup                      resolve the JVM jars from Maven Central
    lambda-ml stack up|down|status       the embedded Kafka broker, MLflow server (and the demo's service and speed layer)
    lambda-ml cluster up|down|status     a local Spark standalone cluster (master + one worker)
    lambda-ml generate                   send the application's generated events to Kafka
    lambda-ml speed ingest               Kafka -> bronze Delta tables (streaming)
    lambda-ml speed run                  the whole speed layer: ingest, feature increments, the application's queries
    lambda-ml speed reprocess-quarantine land quarantined records that pass the current config (once each)
    lambda-ml batch train                train, register and gate a model from bronze
    lambda-ml batch rollback [--to V]    move the champion alias back (default: previous champion)
    lambda-ml batch maintenance          OPTIMIZE and VACUUM the lake, keeping pinned horizons
    lambda-ml batch evaluate             CTR: live AUC per model version, prediction log joined with clicks
    lambda-ml serve                      the service (the application's routes, features, models, metrics)
    lambda-ml serve stream               CTR: score impressions from Kafka into the predictions topic
    lambda-ml submit SCRIPT [ARGS]       run a job with spark-submit and the platform's jars
    lambda-ml verify [--json]            check the lake and the stack: lambda identity, exactly once, lineage, point in time
    lambda-ml demo                       all of the above, end to end, with a summary

Layers are imported only inside the verbs that need them, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from lambda_ml.config import PlatformConfig, load_command_config
from lambda_ml.jvm import SetupError
from lambda_ml.logs import setup_logging
from lambda_ml_cli.errors import run_verb
from lambda_ml_cli.stack import StackError

log = logging.getLogger("lambda_ml")


def _setup(cfg: PlatformConfig, _args: argparse.Namespace) -> int:
    from lambda_ml import jvm

    for name, jars in jvm.resolve_all(cfg).items():
        print(f"{name}: {len(jars)} jars in {jvm.jar_dir(cfg, next(s for s in jvm.JAR_SETS if s.name == name))}")
    return 0


def _stack(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    from lambda_ml import jvm
    from lambda_ml_cli import stack

    if args.action == "up":
        jvm.resolve_all(cfg)
        stack.up(cfg)
        print(f"Kafka broker: {cfg.kafka.bootstrap_servers}\nMLflow UI:    {cfg.mlflow.tracking_uri}")
    elif args.action == "down":
        stopped = stack.down(cfg)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        print(json.dumps(stack.status(cfg), indent=2))
    return 0


def _generate(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    from lambda_ml.apps import load_application

    application = load_application(cfg)
    if application.demo is None:
        print(f"the {application.name} application has no generator", file=sys.stderr)
        return 2
    if args.seed is not None:
        cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"seed": args.seed})})
    print(f"sent {application.demo.send_events(cfg, args.events)}")
    return 0


def _speed(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    if args.job == "reprocess-quarantine":
        from speed_layer import reprocess

        return reprocess.run_from_args(cfg, args)
    from speed_layer import app

    queries = ["ingest"] if args.job == "ingest" else args.queries
    try:
        app.run(cfg, queries, available_now=args.available_now)
    except app.CheckpointInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except app.NothingLanded as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


def _cluster(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    from lambda_ml_cli import cluster

    running = cluster.StandaloneCluster.for_config(cfg)
    if args.action == "up" and running.master.pid() is None:
        spec = cluster.ClusterSpec(
            port=args.port, webui_port=args.webui_port, worker_port=args.port + 1, worker_webui_port=args.webui_port + 1,
            cores=args.cores or cluster.default_cores(), memory=args.memory,
        )  # fmt: skip
        started = cluster.StandaloneCluster.for_config(cfg, spec)
        started.start()
        print(f"Spark master: {started.master_url}\nSpark UI:     {spec.webui_url}")
        print(f"run a job on it: lambda-ml submit --master {started.master_url} batch_layer/train.py")
    elif args.action == "down":
        stopped = running.stop()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        if args.action == "up":
            print(f"already running at {running.master_url}; `lambda-ml cluster down` stops it")
        print(json.dumps(running.status(), indent=2))
    return 0


def _ctr_only(cfg: PlatformConfig, what: str) -> bool:
    """False, after saying why, when ``cfg`` runs another application than click-through prediction."""
    if cfg.app.type == "ctr":
        return True
    print(f"{what} belongs to the ctr application; {cfg.source} runs app.type {cfg.app.type}", file=sys.stderr)
    return False


def _batch(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    if args.job == "evaluate":
        from lambda_ml_apps.ctr import online_eval

        if not _ctr_only(cfg, "lambda-ml batch evaluate"):
            return 2

        return online_eval.main([*(["--config", cfg.source] if cfg.source != "<defaults>" else []), *args.job_args])
    if args.job == "maintenance":
        from batch_layer import maintenance

        return maintenance.main([*(["--config", cfg.source] if cfg.source != "<defaults>" else []), *args.job_args])
    if args.job == "rollback":
        from mlflow import MlflowClient

        from batch_layer import registry

        try:
            moved = registry.rollback(MlflowClient(cfg.mlflow.tracking_uri), cfg.mlflow.registered_model, args.to)
        except registry.RollbackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(moved.summary())
        return 0
    from batch_layer import train

    train.main([*(["--config", cfg.source] if cfg.source != "<defaults>" else []), *args.job_args])
    return 0


def _serve(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    if args.mode == "stream":
        from lambda_ml_apps.ctr import stream

        if not _ctr_only(cfg, "lambda-ml serve stream"):
            return 2

        return stream.run_from_args(cfg, args)
    from serving_layer.app import serve

    serve(cfg)
    return 0


def _submit(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    from lambda_ml_cli import submit

    command = submit.submit_command(cfg, args.script, args.job_args, args.master)
    if args.print:
        print(submit.printable(command))
        return 0
    return submit.run_submit(cfg, args.script, args.job_args, args.master)


def _verify(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    from lambda_ml_cli import verify

    return verify.run_from_args(cfg, args)


def _demo(cfg: PlatformConfig, args: argparse.Namespace) -> int:
    from lambda_ml_cli import demo

    return demo.run(cfg, events=args.events)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lambda-ml", description="Lambda-architecture ML platform on Spark, Delta, Kafka and MLflow.")
    parser.add_argument("--config", help="platform config file (default: $LAMBDA_ML_CONFIG or conf/platform.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, handler: Callable[[PlatformConfig, argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    verb("setup", _setup, "Resolve the Delta, Kafka-connector, Avro and Kafka-broker jars from Maven Central (idempotent).")
    sub = verb("stack", _stack, "Start, stop or inspect the embedded Kafka broker and MLflow server (down and status also cover the demo's service and speed layer).")
    sub.add_argument("action", choices=("up", "down", "status"))
    sub = verb("generate", _generate, "Send the application's generated events (with a known ground truth) to Kafka.")
    sub.add_argument("--events", "--impressions", dest="events", type=int, help="events to generate (default: the config's generator setting)")
    sub.add_argument("--seed", type=int, help="random seed (default: generator.seed)")
    sub = verb("speed", _speed, "Run the speed layer.")
    speed = sub.add_subparsers(dest="job", required=True, metavar="JOB")
    ingest = speed.add_parser("ingest", help="Kafka -> bronze Delta tables, exactly once; bad records -> quarantine.")
    ingest.add_argument("--available-now", action="store_true", help="ingest what Kafka holds now, then stop")
    run_app = speed.add_parser(
        "run",
        help="The whole speed layer (ingest, feature increments and the application's queries) as one streaming "
        "application; stops cleanly on SIGTERM.",
    )
    run_app.add_argument(
        "--query", action="append", dest="queries", metavar="QUERY",
        help="run only this query (repeatable; default: speed.queries): ingest, increments or one of the application's",
    )  # fmt: skip
    run_app.add_argument("--available-now", action="store_true", help="process what the sources hold now, then stop")
    from speed_layer.reprocess import DESCRIPTION as REPROCESS, add_arguments as add_reprocess_arguments

    add_reprocess_arguments(speed.add_parser("reprocess-quarantine", help=REPROCESS, description=REPROCESS))
    sub = verb("cluster", _cluster, "Start, stop or inspect a local Spark standalone cluster (one master, one worker).")
    sub.add_argument("action", choices=("up", "down", "status"))
    sub.add_argument("--port", type=int, default=7077, help="master port; the worker takes the next one (default: 7077)")
    sub.add_argument("--webui-port", type=int, default=8080, help="master web UI port; the worker's is the next one (default: 8080)")
    sub.add_argument("--cores", type=int, help="cores the worker offers (default: all of this machine's)")
    sub.add_argument("--memory", default="2g", help="memory the worker offers to executors (default: 2g)")
    sub = verb("batch", _batch, "Run a batch-layer job.")
    batch = sub.add_subparsers(dest="job", required=True, metavar="JOB")
    train = batch.add_parser("train", help="Train, check and register a model from a pinned bronze snapshot.")
    train.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments passed to the job (see `... train -- --help`)")
    rollback = batch.add_parser(
        "rollback", help="Point the champion alias back at the previous champion (or at --to VERSION)."
    )
    rollback.add_argument("--to", metavar="VERSION", help="ONNX model version to make champion (default: previous-champion)")
    maintain = batch.add_parser("maintenance", help="OPTIMIZE and VACUUM the lake's tables, keeping every horizon a model in use pins.")
    maintain.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments passed to the job (see `... maintenance -- --help`)")
    evaluate = batch.add_parser(
        "evaluate", help="Join the prediction log with later clicks; log live AUC, log loss and counts per version to MLflow."
    )
    evaluate.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments passed to the job (see `... evaluate -- --help`)")
    sub = verb(
        "serve", _serve,
        "Run the prediction service in the foreground (http), or score impressions from Kafka into the "
        "predictions topic with the same models and features (stream; at least once, SIGTERM-safe).",
    )  # fmt: skip
    sub.add_argument("mode", nargs="?", choices=("http", "stream"), default="http", help="http (default) or stream")
    from lambda_ml_apps.ctr.stream import add_arguments as add_stream_arguments

    stream_options = sub.add_argument_group("stream options (serve stream)")
    add_stream_arguments(stream_options)  # type: ignore[arg-type]
    sub = verb("submit", _submit, "Run a job script with spark-submit and the platform's jars and settings.")
    sub.add_argument("--master", help="Spark master (default: spark.master from config)")
    sub.add_argument("--print", action="store_true", help="print the spark-submit command instead of running it")
    sub.add_argument("script", help="job script, e.g. batch_layer/train.py or speed_layer/ingest.py")
    sub.add_argument("job_args", nargs=argparse.REMAINDER, help="arguments passed to the job")
    from lambda_ml_cli.verify import DESCRIPTION as VERIFY, add_arguments as add_verify_arguments

    add_verify_arguments(verb("verify", _verify, VERIFY))
    sub = verb("demo", _demo, "Stack up, generate, speed layer, train, the speed model, serve, and print a summary, for the "
               "application app.type names (e.g. lambda-ml --config conf/kmeans.yaml demo); the stack stays up.")  # fmt: skip
    sub.add_argument("--events", "--impressions", dest="events", type=int,
                     help="events to generate (default: the config's generator setting)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if getattr(args, "job_args", None) and args.job_args[0] == "--":
        args.job_args = args.job_args[1:]
    cfg = load_command_config(args.config)
    if cfg is None:
        return 2
    try:
        return run_verb(args.handler, cfg, args)  # a Spark JVM that dies: one line, not py4j's tracebacks
    except (SetupError, StackError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
