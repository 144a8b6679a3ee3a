"""Fixtures for the HTTP service tests: the tiny reranker, clients of apps built from settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")

from fastapi.testclient import TestClient

from esci_reranker.reranker import Reranker
from esci_reranker.serve import create_app, load_settings
from esci_reranker.serve.settings import Settings
from tests.serve.helpers import CountingRunner
from tests.serve.search_fixtures import other_tiny_retriever, tiny_index  # noqa: F401 (fixtures)

SETTINGS_ENV = [name.upper() for name in Settings.model_fields]


@pytest.fixture(autouse=True)
def _clean_service_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read the environment: keep the developer's API_KEY, RATE_LIMIT, ... out of tests."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_reranker(tiny_checkpoint: Path) -> Reranker:
    """The tiny multi-task model, loaded once (scoring does not change it)."""
    return Reranker.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def tiny_single_reranker(tiny_single_task_checkpoint: Path) -> Reranker:
    return Reranker.from_pretrained(tiny_single_task_checkpoint, device="cpu")


Wrapper = TypeVar("Wrapper")


@pytest.fixture
def wrap_runner(monkeypatch: pytest.MonkeyPatch) -> Callable[[Reranker, Callable[[Any], Wrapper]], Wrapper]:
    """``wrap_runner(reranker, Wrapper)`` puts ``Wrapper(reranker.runner)`` (the model's forward
    pass, a dependency of the service) in its place for this test only, and returns it."""

    def wrap(reranker: Reranker, wrapper: Callable[[Any], Wrapper]) -> Wrapper:
        wrapped = wrapper(reranker.runner)
        monkeypatch.setattr(reranker, "runner", wrapped)
        return wrapped

    return wrap


@pytest.fixture
def count_calls(wrap_runner) -> Callable[[Reranker], CountingRunner]:
    """``count_calls(reranker)`` counts its forward passes (wraps ``reranker.runner``) for this test only."""
    return lambda reranker: wrap_runner(reranker, CountingRunner)


MakeClient = Callable[..., TestClient]


@pytest.fixture
def make_client(tiny_reranker: Reranker) -> Iterator[MakeClient]:
    """``make_client(reranker=None, loader=None, **settings)``: a started TestClient (lifespan run)."""
    with ExitStack() as stack:

        def make(reranker: Reranker | None = None, loader: Any = None, **settings: Any) -> TestClient:
            model = reranker if reranker is not None or loader is not None else tiny_reranker
            app = create_app(load_settings(**settings), model, loader=loader)
            return stack.enter_context(TestClient(app))

        yield make


@pytest.fixture
def client(make_client: MakeClient) -> TestClient:
    """A client of the default app (cache on, no key, no rate limit) serving the tiny model."""
    return make_client()


# --- Live server and real browser (Playwright + Debian's Chromium); see tests/serve/browser.py. ---


@pytest.fixture
def live_server() -> Iterator[Callable[[Any], str]]:
    """``live_server(app) -> base_url``: serve an app with uvicorn on a free loopback port for this test."""
    from tests.serve.browser import LiveServer

    with ExitStack() as stack:
        yield lambda app: stack.enter_context(LiveServer(app)).url


@pytest.fixture
def live_url(live_server: Callable[[Any], str], tiny_reranker: Reranker) -> str:
    """Base URL of the default app (no key, no rate limit) serving the tiny model over real HTTP."""
    return live_server(create_app(load_settings(), tiny_reranker))


def _chromium_missing() -> str | None:
    """Why the browser tests cannot run here (no Chromium binary), or None when they can."""
    from tests.serve.browser import CHROMIUM_PATH

    return None if Path(CHROMIUM_PATH).is_file() else f"no Chromium at {CHROMIUM_PATH}"


ENABLE_BROWSER_TESTS = "`apt-get install chromium`, or set CHROMIUM to a Chromium/Chrome binary"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip the tests that need Chromium when it is missing, except under ``CI=true``.

    The skip is raised here rather than in the fixture so that every browser test shares one
    location and one reason, which ``-ra`` folds into one summary line saying how to enable them.
    CI must run them (its .ci/run installs Chromium), so there the ``chromium`` fixture fails instead.
    """
    if "chromium" not in getattr(item, "fixturenames", ()) or os.environ.get("CI", "").lower() == "true":
        return
    missing = _chromium_missing()
    if missing:
        browser_tests = [i for i in item.session.items if "chromium" in getattr(i, "fixturenames", ())]
        files = ", ".join(sorted({i.path.name for i in browser_tests}))
        pytest.skip(
            f"{len(browser_tests)} browser tests ({files}) skipped, {missing}; "
            f"to run them: {ENABLE_BROWSER_TESTS}"
        )


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's Chromium under Playwright, headless; one per test module (a launch takes ~1 s).

    Outside CI a missing browser skips its tests (``pytest_runtest_setup`` above); under
    ``CI=true`` it fails here.
    """
    from playwright.sync_api import sync_playwright

    from tests.serve.browser import CHROMIUM_ARGS, CHROMIUM_PATH

    missing = _chromium_missing()
    if missing:
        pytest.fail(f"{missing} (CI=true needs the browser tests): install it with {ENABLE_BROWSER_TESTS}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM_PATH, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def open_page(chromium: Any) -> Iterator[Callable[[str], Any]]:
    """``open_page(base_url) -> GuardedPage``: a fresh browser context whose requests may reach
    ``base_url``'s origin only (anything else is aborted and listed in ``.blocked``)."""
    from tests.serve.browser import BROWSER_TIMEOUT_MS, GuardedPage

    contexts: list[Any] = []

    def open_(base_url: str) -> GuardedPage:
        context = chromium.new_context(service_workers="block", viewport={"width": 1280, "height": 900})
        # Generous: a wait ends as soon as its condition holds, and a loaded 2-core machine can take
        # tens of seconds to parse a 1.5 MB bundle (Playwright's default is 30 s).
        context.set_default_timeout(BROWSER_TIMEOUT_MS)
        context.set_default_navigation_timeout(BROWSER_TIMEOUT_MS)
        contexts.append(context)
        return GuardedPage(context, base_url)

    yield open_
    for context in contexts:
        context.close()
