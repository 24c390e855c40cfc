"""The side-by-side page in a real headless browser: Playwright driving Debian's Chromium (never a downloaded one).

Skipped, with the reason, only when no Chromium can be found (scripts/setup.sh installs it where apt-get works).
"""

from __future__ import annotations

import os
import re
import shutil

import httpx
import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SETTINGS = {"max_tokens": 12, "temperature": 1.0, "seed": 4}


def find_chromium() -> str | None:
    """$LLM_MODULES_CHROMIUM, else a chromium on PATH (Debian's package installs /usr/bin/chromium)."""
    named = os.environ.get("LLM_MODULES_CHROMIUM")
    if named:
        return named if os.path.exists(named) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set LLM_MODULES_CHROMIUM=/path/to/chromium)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


def test_one_prompt_streams_into_all_three_columns_with_metrics_and_gates(browser, serving, tmp_path):
    screenshot_dir = tmp_path
    url, models = serving
    prompt = "Tell me about the fox."
    expected = {}
    for served in models:  # what each model answers alone, through the API, with the page's settings
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": served.id, "messages": [{"role": "user", "content": prompt}], **SETTINGS}).json()
        expected[served.role] = reply["choices"][0]["message"]["content"]
    assert all(expected.values()), expected  # seed 4 gives every tiny model some text to show

    page = browser.new_page()
    streamed: list[str] = []
    page.on("response", lambda r: streamed.append(r.headers.get("content-type", ""))
            if r.url.endswith("/v1/chat/completions") else None)
    page.goto(url)
    page.wait_for_selector("section[data-role=target]:not(.off)")
    page.fill("#prompt", prompt)
    for name, value in SETTINGS.items():
        page.fill(f"input[name={name}]", str(value))
    page.evaluate("""() => {  // count the text updates each answer receives
        window.updates = {};
        for (const answer of document.querySelectorAll('.answer')) {
            window.updates[answer.dataset.testid] = 0;
            new MutationObserver((changes) => window.updates[answer.dataset.testid] += changes.length)
                .observe(answer, {childList: true, characterData: true, subtree: true});
        }
    }""")
    page.click("#send")
    for role in ("composed", "source", "target"):
        page.wait_for_selector(f"section[data-role={role}][data-state=done]", timeout=60_000)
    assert page.locator("#send").is_enabled()
    for role, text in expected.items():
        assert page.locator(f"[data-testid=answer-{role}]").text_content() == text, role
        metrics = page.locator(f"[data-testid=metrics-{role}]").inner_text()
        assert re.search(r"time to first token \d+\.\d\d s", metrics), metrics
        assert re.search(r"tokens/s (\d+\.\d|…)", metrics) and "finish" in metrics, metrics
    assert streamed == ["text/event-stream; charset=utf-8"] * 3  # three streamed requests, sent at once
    updates = page.evaluate("window.updates")
    assert all(updates[f"answer-{role}"] > 2 for role in expected), updates  # piece by piece, not in one block
    page.screenshot(path=str(screenshot_dir / "side-by-side.png"), full_page=True)
    gates = page.locator("[data-testid=gate]")
    assert gates.count() == 2  # one bar per cross-attention layer of the composed model
    assert all(re.fullmatch(r"layer \d+\s*0\.\d{3}", gates.nth(i).inner_text().replace("\n", " ").strip())
               for i in range(2))
    page.close()


def test_the_page_shows_a_column_that_is_not_served(browser, serving):
    url, _ = serving
    page = browser.new_page()
    page.route("**/v1/models", lambda route: route.fulfill(json={"object": "list", "data": [
        {"id": "composed", "role": "composed", "object": "model", "created": 0, "owned_by": "llm-modules"}]}))
    page.goto(url)
    page.wait_for_selector("section[data-role=source].off")
    assert "not served" in page.locator("section[data-role=target]").inner_text()
    page.close()
