"""The README's picture of the search page, made with the browser-test tooling.

Serves a model and a catalogue index on a loopback port (``LiveServer``), opens the page in
Debian's Chromium with every request fenced to that server (``GuardedPage``), types a query and
saves the reranked results as a PNG (reduced to a 256-colour palette, so it stays small in git):

    python -m tests.serve.screenshot --model runs/default/model --index runs/default/index \\
        --out docs/search-page.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image
from playwright.sync_api import expect, sync_playwright

from esci_reranker.reranker import Reranker
from esci_reranker.serve import create_app, load_settings
from tests.serve.browser import BROWSER_TIMEOUT_MS, CHROMIUM_ARGS, CHROMIUM_PATH, GuardedPage, LiveServer

QUERY = "wireless earbuds for running"


def screenshot(model: Path, index: Path, out: Path, query: str = QUERY) -> int:
    """Save the page's answer to ``query`` to ``out``; returns the PNG's size in bytes."""
    if not Path(CHROMIUM_PATH).is_file():
        raise SystemExit(f"no Chromium at {CHROMIUM_PATH}: apt-get install chromium, or set CHROMIUM")
    reranker = Reranker.from_pretrained(model)
    app = create_app(load_settings(index_path=str(index), cache_size=0), reranker)
    with LiveServer(app) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM_PATH, args=list(CHROMIUM_ARGS))
        try:
            context = browser.new_context(viewport={"width": 1000, "height": 760}, device_scale_factor=1)
            context.set_default_timeout(BROWSER_TIMEOUT_MS)
            guarded = GuardedPage(context, server.url)
            page = guarded.page
            page.goto(f"{server.url}/")
            page.locator("#q").fill(query)
            page.locator("#q").press("Enter")
            expect(page.locator("#results li.hit").first).to_be_visible()
            expect(page.locator("#status")).to_contain_text("reranked")
            png = page.screenshot(full_page=False)
            if guarded.blocked:
                raise SystemExit(f"the page reached off its server: {guarded.blocked}")
        finally:
            browser.close()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    return out.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained model folder")
    parser.add_argument("--index", type=Path, required=True, help="a catalogue index folder")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--query", default=QUERY)
    args = parser.parse_args()
    size = screenshot(args.model, args.index, args.out, args.query)
    print(f"{args.out}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
