"""Benchmark: our ``POST /predict`` (features merged from the batch views and the speed
increments, then ONNX Runtime) against ``mlflow models serve`` on the same registered ONNX
champion, at concurrency 1, 8 and 32: requests/s, p50, p99 latency and the server's memory.

The benchmark starts everything itself on loopback, in a temporary directory: an MLflow server
(by PID, stopped at the end), view and increment Delta tables for 500 users x 100 items (written
with ``deltalake``, no Spark), and one ONNX logistic regression over the 38 declared model inputs,
registered with the tags the batch layer puts on its ONNX versions and aliased ``champion``.
Both servers load that same version from the registry; both run one worker process. Ours is sent
one impression (ids, device, position) and computes its 38 features; the peer, which knows no
features, is sent the 38 feature values precomputed (dict of [1, 1] tensors, the input MLflow's
ONNX pyfunc takes). The client is one asyncio process with one keep-alive connection per
concurrent client, so that it is not the bottleneck of either server.

    python bench/serving.py --quick        # 5 s per level (about a minute)
    python bench/serving.py                # 20 s per level
    python bench/serving.py --levels 1,4 --seconds 3 --out /tmp/serving.json
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.common import (  # noqa: E402
    bench_parser,
    default_out,
    free_port,
    local_paths,
    load_average,
    machine_info,
    process_tree,
    tree_memory_bytes,
    write_result,
)
from bench.report import serving_table  # noqa: E402
from lambda_ml import contract  # noqa: E402
from lambda_ml.config import PlatformConfig, load_config, write_config  # noqa: E402
from lambda_ml.logs import setup_logging  # noqa: E402

log = logging.getLogger("bench.serving")

NAME = "serving"
LEVELS = (1, 8, 32)
SECONDS, QUICK_SECONDS = 20.0, 5.0
USERS, ITEMS, DEVICES = 500, 100, ("mobile", "desktop", "tablet")
MODEL = "bench-ctr"
HORIZON = contract.Horizon.of(impressions=4, clicks=4)
PACKAGES = ("fastapi", "uvicorn", "mlflow", "onnxruntime", "deltalake")
TARGET_RATIO = 3.0
TARGET_P99_MS = 10.0


def bench_config(root: Path) -> PlatformConfig:
    mlflow_port = free_port()
    return load_config(
        env={},
        overrides={
            **local_paths(root),
            "mlflow.port": mlflow_port,
            "mlflow.tracking_uri": f"http://127.0.0.1:{mlflow_port}",
            "mlflow.registered_model": MODEL,
            "mlflow.experiment": f"{MODEL}-experiment",
            "serving.port": free_port(),
            "serving.candidate_aliases": [],
            # No Kafka here: both servers are measured scoring only (the log costs a queue append).
            "serving.prediction_log.enabled": False,
        },
    )


def write_views(cfg: PlatformConfig, now: datetime, seed: int = 5) -> int:
    """Batch views at HORIZON and speed increments after it, for every declared entity; returns
    the bucket rows written."""
    import pyarrow as pa  # before deltalake (see serving_layer.views)
    from deltalake import write_deltalake

    rng = random.Random(seed)
    hour = now.replace(minute=0, second=0, microsecond=0)
    keys_of = {
        "user": [(f"u{n}",) for n in range(USERS)],
        "item": [(f"i{n}",) for n in range(ITEMS)],
        "user_device": [(f"u{n}", d) for n in range(USERS) for d in DEVICES],
    }
    written = 0
    for entity, declared in cfg.features.entities.items():
        for table, hours, stamp in (
            (contract.view_table(entity), range(1, 24 * 7, 3), {contract.view_horizon_column(e): v for e, v in HORIZON.versions}),
            (contract.increments_table(entity), range(0, 2), {**{contract.increment_version_column(e): v + 1 for e, v in HORIZON.parts.items() if v is not None},
                                                               "speed_batch_id": 0}),
        ):  # fmt: skip
            rows: dict[str, list[Any]] = {k: [] for k in [*declared.keys, contract.VIEW_BUCKET_COLUMN, *cfg.features.aggregates, *stamp]}
            for key in keys_of[entity]:
                for h in hours:
                    if rng.random() < 0.3:
                        shown = rng.randint(1, 20)
                        for name, value in zip(declared.keys, key, strict=True):
                            rows[name].append(value)
                        rows[contract.VIEW_BUCKET_COLUMN].append(hour - timedelta(hours=h))
                        rows["impressions"].append(shown)
                        rows["clicks"].append(rng.randint(0, shown // 3))
                        rows["top_position"].append(float(rng.randint(1, 5)))
                        for name, value in stamp.items():
                            rows[name].append(value)
            schema = pa.schema(
                [(k, pa.string()) for k in declared.keys]
                + [(contract.VIEW_BUCKET_COLUMN, pa.timestamp("us", tz="UTC")), ("impressions", pa.int64()),
                   ("clicks", pa.int64()), ("top_position", pa.float64())]
                + [(k, pa.int64()) for k in stamp]
            )  # fmt: skip
            write_deltalake(cfg.lake.table(*table), pa.table(rows, schema=schema), mode="overwrite")
            written += len(rows[contract.VIEW_BUCKET_COLUMN])
    return written


def lr_onnx_bytes(inputs: contract.ModelInputs, seed: int = 3) -> bytes:
    """A logistic regression over every declared input: float features through one MatMul,
    the device through a LabelEncoder, P(click) as ``probability`` [n, 2]."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = (rng.normal(0, 0.05, size=(len(inputs.numeric), 1))).astype(np.float32)
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 1]) for n in inputs.numeric]
    graph_inputs += [helper.make_tensor_value_info(n, TensorProto.STRING, [None, 1]) for n in inputs.categorical]
    nodes = [helper.make_node("Concat", list(inputs.numeric), ["x"], axis=1), helper.make_node("MatMul", ["x", "w"], ["z0"])]
    last = "z0"
    for n, name in enumerate(inputs.categorical):
        nodes.append(helper.make_node("LabelEncoder", [name], [f"{name}_w"], domain="ai.onnx.ml", keys_strings=list(DEVICES),
                                      values_floats=[0.3, -0.2, 0.1], default_float=-0.5))  # fmt: skip
        nodes.append(helper.make_node("Add", [last, f"{name}_w"], [f"z{n + 1}"]))
        last = f"z{n + 1}"
    nodes += [
        helper.make_node("Add", [last, "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], [contract.ONNX_PROBABILITY_OUTPUT], axis=1),
    ]
    initializers = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array([[-2.0]], np.float32), "b"),
        numpy_helper.from_array(np.array([[1.0]], np.float32), "one"),
    ]
    output = helper.make_tensor_value_info(contract.ONNX_PROBABILITY_OUTPUT, TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph(nodes, "bench_lr", graph_inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def register_champion(cfg: PlatformConfig) -> int:
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.tracking import MlflowClient
    from mlflow.types import Schema, TensorSpec
    import numpy as np

    inputs = contract.model_inputs(cfg.features)
    specs = [TensorSpec(np.dtype(np.float32), (-1, 1), n) for n in inputs.numeric]
    specs += [TensorSpec(np.dtype(object), (-1, 1), n) for n in inputs.categorical]
    signature = ModelSignature(
        inputs=Schema(specs), outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 2), contract.ONNX_PROBABILITY_OUTPUT)])
    )
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment(cfg.mlflow.experiment)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(onnx.load_from_string(lr_onnx_bytes(inputs)), name="onnx", signature=signature,
                                     registered_model_name=MODEL)  # fmt: skip
    version = str(info.registered_model_version)
    client = MlflowClient(cfg.mlflow.tracking_uri)
    for key, value in {contract.TAG_FLAVOR: "onnx", contract.TAG_MODEL_INPUTS: inputs.tag(), **HORIZON.tags()}.items():
        client.set_model_version_tag(MODEL, version, key, value)
    client.set_registered_model_alias(MODEL, contract.CHAMPION_ALIAS, version)
    return int(version)


def request_rows(n: int, seed: int = 9) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"user_id": f"u{rng.randrange(USERS)}", "item_id": f"i{rng.randrange(ITEMS)}", "device": rng.choice(DEVICES),
         "position": rng.randint(1, 5)}
        for _ in range(n)
    ]  # fmt: skip


def peer_bodies(cfg: PlatformConfig, rows: list[dict[str, Any]], now: datetime) -> list[bytes]:
    """The same rows' 38 model inputs, as the peer's /invocations takes them."""
    from lambda_ml_apps.ctr.model_inputs import lookup_features
    from serving_layer.views import load_batch_views

    class Row:
        def __init__(self, values: dict[str, Any]) -> None:
            self.__dict__.update(values, event_time=None)

    views = load_batch_views(cfg)
    names = contract.model_inputs(cfg.features).names
    features = lookup_features([Row(r) for r in rows], views, cfg.features, now)  # type: ignore[arg-type]
    return [json.dumps({"inputs": {n: [[f[n]]] for n in names}}).encode() for f in features]


# --------------------------------------------------------------------------- servers


def start_process(command: list[str], log_file: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log_file.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})})  # fmt: skip


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group of the server we started (by its PID), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_ready(url: str, process: subprocess.Popen[bytes], log_file: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {process.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready in {timeout_s} s:\n{log_file.read_text()[-3000:]}")


# --------------------------------------------------------------------------- the client


async def _client(
    port: int, path: str, bodies: Sequence[bytes], concurrency: int, seconds: float, rate: float | None = None
) -> dict[str, Any]:
    """Closed loop (each connection sends its next request when the last one is answered), or
    with ``rate``, open loop: requests are due at a fixed pace spread over the connections, and
    a latency counts from when its request was due, so time spent queued behind a slow answer is
    measured too (no coordinated omission)."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    first = time.perf_counter()

    async def one(offset: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = offset
        try:
            while time.perf_counter() < deadline:
                body = bodies[n % len(bodies)]
                due = first + n / rate if rate else None
                n += concurrency
                head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
                if due is not None:
                    if due >= deadline:
                        break
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                started = time.perf_counter() if due is None else due
                writer.write(head + body)
                await writer.drain()
                header = await reader.readuntil(b"\r\n\r\n")
                lines = header.decode("latin-1").split("\r\n")
                length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = int(lines[0].split()[1])
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "requests": len(latencies),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(0.50), 3),
        "p99_ms": round(percentile(0.99), 3),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def run_client(
    port: int, path: str, bodies: Sequence[bytes], concurrency: int, seconds: float, rate: float | None = None
) -> dict[str, Any]:
    """One load level, in the client process."""
    return asyncio.run(_client(port, path, bodies, concurrency, seconds, rate))


def tree_cpu_s(pid: int) -> float:
    return sum(s.cpu_s for s in process_tree(pid))


def cpu_per_request(pid: int, cpu_before: float, requests: int) -> float | None:
    """The server's CPU time (user + system, whole process tree) per request answered: unlike
    requests/s, it hardly moves when other processes share the cores."""
    return round((tree_cpu_s(pid) - cpu_before) * 1000 / requests, 3) if requests else None


# Connections the paced (open-loop) level spreads its requests over.
PACED_CONNECTIONS = 8


def measure_paced(pool: cf.Executor, name: str, port: int, path: str, bodies: list[bytes], pid: int,
                  rate: float, seconds: float) -> dict[str, Any]:  # fmt: skip
    """Latency at a fixed request rate (half of the server's saturation)."""
    cpu_before = tree_cpu_s(pid)
    future = pool.submit(run_client, port, path, bodies, PACED_CONNECTIONS, seconds, rate)
    peak = 0
    while not future.done():
        peak = max(peak, tree_memory_bytes(process_tree(pid)))
        time.sleep(0.2)
    result = future.result()
    result["server_cpu_ms_per_request"] = cpu_per_request(pid, cpu_before, result["requests"])
    result.update(target_rate=round(rate, 1), memory_mib=round(peak / 2**20, 1), load_average=load_average())
    log.info("%s at %.0f requests/s: %s", name, rate, result)
    return result


def measure(pool: cf.Executor, name: str, port: int, path: str, bodies: list[bytes], pid: int,
            levels: Sequence[int], seconds: float) -> dict[str, Any]:  # fmt: skip
    """Every level against one server, its memory (summed RSS of its process tree) sampled meanwhile."""
    results: dict[str, Any] = {}
    pool.submit(run_client, port, path, bodies, 2, 1.0).result()  # warm-up
    for level in levels:
        cpu_before = tree_cpu_s(pid)
        future = pool.submit(run_client, port, path, bodies, level, seconds)
        peak = 0
        while not future.done():
            peak = max(peak, tree_memory_bytes(process_tree(pid)))
            time.sleep(0.2)
        result = future.result()
        result["memory_mib"] = round(peak / 2**20, 1)
        result["server_cpu_ms_per_request"] = cpu_per_request(pid, cpu_before, result["requests"])
        result["load_average"] = load_average()
        results[str(level)] = result
        log.info("%s at concurrency %d: %s", name, level, result)
    return results


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(NAME, "Our /predict (with the feature merge) vs `mlflow models serve` on the same ONNX champion.")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrency levels, comma-separated (default 1,8,32)")
    parser.add_argument("--seconds", type=float, help=f"seconds per level (default {SECONDS:g}, {QUICK_SECONDS:g} with --quick)")
    args = parser.parse_args(argv)
    try:
        levels = [int(v) for v in args.levels.split(",")]
    except ValueError:
        parser.error(f"--levels takes whole numbers separated by commas, not {args.levels!r}")
    if not levels or min(levels) < 1:
        parser.error("--levels must be positive")
    seconds = args.seconds or (QUICK_SECONDS if args.quick else SECONDS)
    if seconds <= 0:
        parser.error("--seconds must be positive")
    setup_logging()
    out = args.out or default_out(NAME, args.quick)

    from lambda_ml_cli.stack import MlflowServer

    started_at = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        root = Path(tmp)
        cfg = bench_config(root)
        server = MlflowServer(cfg)
        processes: list[subprocess.Popen[bytes]] = []
        try:
            server.start()
            bucket_rows = write_views(cfg, started_at)
            version = register_champion(cfg)
            config_file = write_config(cfg, root / "platform.yaml")
            ours_log, peer_log = root / "service.log", root / "peer.log"
            ours = start_process([sys.executable, "-m", "serving_layer", "--config", str(config_file)], ours_log)
            processes.append(ours)
            peer_port = free_port()
            bin_dir = str(Path(sys.executable).parent)
            peer = start_process(
                [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@{contract.CHAMPION_ALIAS}",
                 "--env-manager", "local", "--host", "127.0.0.1", "--port", str(peer_port)],
                peer_log, env={"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
            )  # fmt: skip
            processes.append(peer)
            wait_ready(f"http://127.0.0.1:{cfg.serving.port}/ready", ours, ours_log)
            wait_ready(f"http://127.0.0.1:{peer_port}/ping", peer, peer_log)

            rows = request_rows(2000)
            ours_bodies = [json.dumps(r).encode() for r in rows]
            theirs_bodies = peer_bodies(cfg, rows, started_at)
            # Both answer the same rows with the same probabilities before anything is timed.
            check = [json.loads(urllib.request.urlopen(urllib.request.Request(url, data=b, headers={"content-type": "application/json"}),
                                                       timeout=30).read())  # fmt: skip
                     for url, b in ((f"http://127.0.0.1:{cfg.serving.port}/predict", ours_bodies[0]),
                                    (f"http://127.0.0.1:{peer_port}/invocations", theirs_bodies[0]))]  # fmt: skip
            ours_p = check[0]["predictions"][0]["probability"]
            peer_p = check[1]["predictions"][contract.ONNX_PROBABILITY_OUTPUT][0][1]
            if abs(ours_p - peer_p) > 1e-6:
                raise RuntimeError(f"the two servers disagree on the same row: {ours_p} vs {peer_p}")

            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                results = measure(pool, "lambda-ml", cfg.serving.port, "/predict", ours_bodies, ours.pid, levels, seconds)
                peer_results = measure(pool, "mlflow models serve", peer_port, "/invocations", theirs_bodies, peer.pid, levels, seconds)
                # p99 at half of saturation: each server at half of its best closed-loop rate.
                half = max(r["requests_per_s"] for r in results.values()) / 2
                peer_half = max(r["requests_per_s"] for r in peer_results.values()) / 2
                paced = measure_paced(pool, "lambda-ml", cfg.serving.port, "/predict", ours_bodies, ours.pid, half, seconds)
                peer_paced = measure_paced(pool, "mlflow models serve", peer_port, "/invocations", theirs_bodies, peer.pid,
                                           peer_half, seconds)  # fmt: skip
        finally:
            for process in processes:
                stop_process(process)
            server.stop()

    ratios = {
        level: round(results[level]["requests_per_s"] / peer_results[level]["requests_per_s"], 2)
        if peer_results[level]["requests_per_s"] else None
        for level in results
    }
    result = {
        "name": NAME,
        "machine": machine_info(PACKAGES),
        "params": {
            "quick": args.quick, "levels": levels, "seconds_per_level": seconds, "users": USERS, "items": ITEMS,
            "bucket_rows": bucket_rows, "model": f"models:/{MODEL}/{version}: ONNX logistic regression over "
            f"{len(contract.model_inputs(cfg.features).names)} inputs", "workers": 1,
            "ours": "POST /predict, one impression, features merged from views and increments",
            "peer": "mlflow models serve --env-manager local, POST /invocations with the precomputed inputs",
            "started_at": started_at.isoformat(),
        },  # fmt: skip
        "results": {**results, "half_saturation": paced},
        "peer": {**peer_results, "half_saturation": peer_paced},
        "ratios": {"requests_per_s": ratios},
        "targets": {"requests_per_s_ratio": TARGET_RATIO, "p99_ms_at_half_saturation": TARGET_P99_MS},
    }
    write_result(result, out)
    print(serving_table(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
