"""What a person sees, in a real browser: Debian's Chromium (headless), driven by Playwright.

- After one real batch run (generated events through Kafka and the speed layer into bronze,
  then ``batch_layer.train.run`` against the session's MLflow server), the MLflow UI shows the
  experiment, the run's metrics with the values the run returned, its calibration plot among
  the artifacts and the registered model with its ``champion`` alias.
- The service's ``/docs`` (Swagger UI) and ``/redoc`` render its operations with every request
  outside loopback refused, so they work on a machine without Internet access.

Every checked page is saved as a PNG under ``.data/test-artifacts/browser/`` (printed at the
end). Chromium comes from ``make test`` (Debian's package); without it these tests fail.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from lambda_ml.config import PROJECT_ROOT, PlatformConfig
from serving_layer.app import is_loopback
from serving_layer.routes.docs import ASSETS_URL, mount_docs

SCREENSHOTS = PROJECT_ROOT / ".data" / "test-artifacts" / "browser"
TIMEOUT_MS = 60_000


# --------------------------------------------------------------------------- pure: the pages' HTML


def test_docs_pages_load_their_scripts_and_styles_from_the_service_itself() -> None:
    app = FastAPI(title="t", docs_url=None, redoc_url=None)
    mount_docs(app)
    with TestClient(app) as http:
        for page in ("/docs", "/redoc"):
            html = http.get(page).text
            linked = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert linked and all(url.startswith(f"{ASSETS_URL}/") for url in linked), (page, linked)
            assert "http://" not in html and "https://" not in html, page
            for url in linked:
                asset = http.get(url)
                assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert "/openapi.json" in http.get("/docs").text
    with pytest.raises(ValueError, match="docs_url=None"):
        mount_docs(FastAPI())


# --------------------------------------------------------------------------- the browser


def chromium_path() -> str:
    """Debian's chromium, which ``make test`` installs; a clear failure without it."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: run `make test` (as root it installs Debian's chromium) or `apt-get install -y chromium`")
    return path


@dataclass
class Requests:
    """What a page asked for: on loopback (let through), and elsewhere (refused)."""

    loopback: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[tuple[Any, Requests]]:
    """A fresh page whose requests to any host but loopback are refused, all of them recorded."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    requests = Requests()

    def only_loopback(route: Any) -> None:
        url = route.request.url
        if is_loopback(urlsplit(url).hostname or ""):
            requests.loopback.append(url)
            route.continue_()
        else:
            requests.outside.append(url)
            route.abort("blockedbyclient")

    context.route("**/*", only_loopback)
    page = context.new_page()
    # Expectations wait for the single page apps to render; the machine may be busy.
    page.set_default_timeout(TIMEOUT_MS)
    try:
        yield page, requests
    finally:
        context.close()


def screenshot(page: Any, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\nscreenshot: {path}")
    return path




# --------------------------------------------------------------------------- one batch run


@dataclass(frozen=True)
class BatchRun:
    """The batch run's outcome and what the UI should show of it (read back by the client)."""

    cfg: PlatformConfig
    result: Any  # batch_layer.train.TrainResult
    experiment_id: str
    run_name: str
    spark_version: str  # the Spark twin of the served (ONNX) version
    calibration_size: tuple[int, int]  # width, height of the logged calibration.png


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", path
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


@pytest.fixture(scope="module")
def batch_run(running_stack: PlatformConfig, spark: Any, tmp_path_factory: pytest.TempPathFactory) -> BatchRun:
    """Generated events through Kafka and the speed layer's ingest into bronze, then one batch
    run: trained, logged, gated and registered in the session's MLflow server."""
    import mlflow
    from mlflow import MlflowClient

    from batch_layer import train
    from lambda_ml.config import LrGridConfig
    from lambda_ml_apps.ctr import generator
    from lambda_ml_cli import stack
    from speed_layer import app as speed_app
    from support import isolated

    root = tmp_path_factory.mktemp("browser")
    cfg = isolated(running_stack, "ctr-browser", lake_root=root / "lake", topic_prefix="browser")
    # A few hours of events and no hyper-parameter search: one model fitted, as little to wait
    # for as the pages need.
    small = {"impressions": 3000, "span_hours": 4, "users": 60, "items": 20, "seed": 5}
    no_search = cfg.ctr.search.model_copy(update={"lr": LrGridConfig(reg_param=(), elastic_net_param=())})
    cfg = cfg.model_copy(update={
        "generator": cfg.generator.model_copy(update=small),
        "ctr": cfg.ctr.model_copy(update={"search": no_search}),
    })  # fmt: skip
    stack.create_topics(cfg)
    generator.run(cfg)
    speed_app.run(cfg, ["ingest"], available_now=True)
    result = train.run(spark, cfg)
    assert result.decision == "champion", result.summary()

    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(result.run_id)
    served = client.get_model_version(cfg.mlflow.registered_model, result.versions.served)
    plot = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="calibration.png", dst_path=str(root), tracking_uri=cfg.mlflow.tracking_uri
    )
    return BatchRun(
        cfg, result, run.info.experiment_id, str(run.info.run_name), served.tags["spark_model_version"], png_size(Path(plot))
    )


# --------------------------------------------------------------------------- the MLflow UI


@pytest.mark.integration
def test_the_mlflow_ui_shows_the_run_its_metrics_plot_and_champion(
    batch_run: BatchRun, page: tuple[Any, Requests], capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    tab, _ = page
    cfg, result = batch_run.cfg, batch_run.result
    ui = cfg.mlflow.tracking_uri
    experiment = f"{ui}/#/experiments/{batch_run.experiment_id}"
    run = f"{experiment}/runs/{result.run_id}"

    # The experiment's training runs list the run.
    tab.goto(f"{experiment}/runs")
    expect(tab.get_by_text(cfg.mlflow.experiment, exact=True).first).to_be_visible()
    expect(tab.get_by_text(batch_run.run_name, exact=True).first).to_be_visible()
    screenshot(tab, "mlflow-experiment-runs", capsys)

    # The run's overview: its metrics, each with the value the batch run returned.
    tab.goto(run)
    for name in ("auc", "log_loss", "ece"):
        row = tab.get_by_role("row").filter(has=tab.get_by_role("link", name=name, exact=True))
        expect(row).to_have_count(1)
        value = row.get_by_role("cell").nth(1)
        expect(value).to_have_text(re.compile(r"^\s*-?\d"))
        assert float(value.inner_text()) == pytest.approx(result.metrics[name], rel=1e-9), name
    screenshot(tab, "mlflow-run-overview", capsys)

    # Its artifacts: the calibration plot, picked in the tree and shown whole.
    tab.goto(f"{run}/artifacts")
    tab.get_by_text("calibration.png", exact=True).first.click()
    plot = tab.locator("img[alt='calibration.png']")
    expect(plot).to_be_visible()
    shown = plot.evaluate("i => i.decode().then(() => [i.naturalWidth, i.naturalHeight])")
    assert tuple(shown) == batch_run.calibration_size
    screenshot(tab, "mlflow-run-calibration", capsys)

    # The registered model: the champion alias on the served version, not on its Spark twin.
    tab.goto(f"{ui}/#/models/{cfg.mlflow.registered_model}")

    def version_row(version: str) -> Any:
        return tab.get_by_role("row").filter(has=tab.get_by_role("link", name=f"Version {version}", exact=True))

    alias = re.compile(r"^@\s*champion$")
    expect(version_row(result.versions.served).get_by_text(alias)).to_be_visible()
    expect(version_row(batch_run.spark_version)).to_have_count(1)
    expect(version_row(batch_run.spark_version).get_by_text(alias)).to_have_count(0)
    screenshot(tab, "mlflow-model-versions", capsys)


# --------------------------------------------------------------------------- the service's docs


@pytest.fixture(scope="module")
def service_url(batch_run: BatchRun) -> Iterator[str]:
    """``create_app`` under uvicorn on a free loopback port, in this process."""
    import uvicorn

    from conftest import free_port
    from serving_layer.app import create_app

    port = free_port()
    config = uvicorn.Config(create_app(batch_run.cfg, poll=False), host="127.0.0.1", port=port, log_config=None)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="docs-service", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("the service did not start within 60 s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


NAMED = {("POST", "/predict"), ("GET", "/features/{entity}/{key}"), ("GET", "/health"), ("GET", "/models")}
METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.mark.integration
def test_the_api_docs_render_every_operation_without_leaving_loopback(
    service_url: str, page: tuple[Any, Requests], capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    with urllib.request.urlopen(f"{service_url}/openapi.json", timeout=30) as answer:
        document = json.load(answer)
    operations = sorted((m.upper(), path) for path, item in document["paths"].items() for m in item if m in METHODS)
    assert NAMED <= set(operations)
    tab, requests = page

    # Swagger UI: one block per operation, its method and path.
    tab.goto(f"{service_url}/docs")
    expect(tab.locator(".swagger-ui .info .title")).to_contain_text(document["info"]["title"])
    blocks = tab.locator(".opblock-summary")
    expect(blocks).to_have_count(len(operations))
    shown = blocks.evaluate_all(
        "els => els.map(e => [e.querySelector('.opblock-summary-method').textContent,"
        " e.querySelector('.opblock-summary-path').dataset.path])"
    )
    assert sorted(map(tuple, shown)) == operations
    screenshot(tab, "service-docs", capsys)

    # ReDoc: one endpoint panel per operation (lower-case method, path).
    tab.goto(f"{service_url}/redoc")
    expect(tab.locator("h1").first).to_contain_text(document["info"]["title"])
    panels = tab.locator("button:has(> .http-verb)")
    expect(panels).to_have_count(len(operations))
    shown = panels.evaluate_all("els => els.map(e => [e.children[0].textContent, e.children[1].textContent])")
    assert sorted((method.upper(), path) for method, path in shown) == operations
    screenshot(tab, "service-redoc", capsys)

    assert requests.outside == []
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        assert f"{service_url}{ASSETS_URL}/{asset}" in requests.loopback, asset
