"""The page in a real browser (headless Chromium, driven by Playwright): set the arms, run, pause, toggle the
baseline, and type what a reader might get wrong. The page's Content Security Policy forbids evaluating strings, so
the waits poll from Python.

`python tests/playground/test_playground_browser.py` writes docs/playground.png, the README's screenshot."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke  # the real server and page, end to end


def wait_until(condition, timeout: float = 30.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Page:
    """One tab of the playground, with what went wrong on its way: responses >= 500 and script errors."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 1300})
        self.failures: list[str] = []
        self.page.on("response", lambda r: r.status >= 500 and self.failures.append(f"{r.status} {r.url}"))
        self.page.on("pageerror", lambda error: self.failures.append(f"script error: {error}"))
        self.page.on("console", self._console)
        self.page.goto(url)
        wait_until(lambda: self.page.get_attribute("body", "data-ready") == "true", what="the first state")

    def _console(self, message) -> None:
        # Chromium logs every 4xx as an error; here those are the validation answers the tests ask for
        if message.type == "error" and "responded with a status of 4" not in message.text:
            self.failures.append(f"console: {message.text}")

    def steps(self) -> int:
        return int(self.page.inner_text("#step-count"))

    def probs(self) -> list[float]:
        return [
            float(p) for p in self.page.eval_on_selector_all("#probs li", "items => items.map(i => i.dataset.prob)")
        ]

    def message(self) -> str:
        box = self.page.locator("#message")
        return box.inner_text() if box.is_visible() else ""

    def set_arms(self, means: list[str]) -> None:
        while self.page.locator("#arms tbody tr").count() > len(means):
            self.page.click("#arms tbody tr:last-child button")
        while self.page.locator("#arms tbody tr").count() < len(means):
            self.page.click("#add-arm")
        for k, mean in enumerate(means):
            self.page.fill(f"#mean-{k}", mean)
        self.settle()

    def settle(self) -> None:
        """Let the debounced settings reach the server and come back."""
        self.page.locator("#noise").dispatch_event("change")
        time.sleep(0.6)

    def run(self, steps: int) -> None:
        self.page.click("#run")
        wait_until(lambda: self.steps() >= steps, what=f"{steps} steps")
        self.page.click("#pause")
        time.sleep(0.3)

    def close(self) -> list[str]:
        self.page.close()
        return self.failures


@pytest.fixture
def tab(browser, live_server):
    page = Page(browser, live_server)
    yield page
    assert page.close() == []  # no server error and no script error, whatever the test typed


def test_the_policy_moves_to_the_best_arm_and_the_baseline_cuts_the_variance(tab):
    page = tab.page
    tab.set_arms(["5", "4", "7", "4.5"])
    page.fill("#noise", "0.5")
    page.fill("#lr", "0.5")
    page.select_option("#rate", "100")
    tab.settle()
    assert tab.steps() == 0 and tab.probs() == pytest.approx([0.25] * 4)  # a new number of arms: a reset
    tab.run(50)
    after = tab.steps()
    probs = tab.probs()
    assert after >= 50 and max(probs) == probs[2] and probs[2] > 0.6, probs
    time.sleep(0.5)
    assert tab.steps() == after  # paused
    assert page.inner_text("#best") == "7.0000"

    page.select_option("#baseline", "none")
    tab.settle()
    assert "No baseline chosen" in page.inner_text("#variance-ratio")
    assert page.locator("#estimators tr.chosen").get_attribute("data-name") == "none"
    page.click("#reset")
    wait_until(lambda: tab.steps() == 0, what="the reset")
    page.select_option("#baseline", "loo")
    tab.settle()
    ratio = float(page.get_attribute("#variance-ratio", "data-ratio"))
    assert 0 < ratio < 0.5, ratio  # rewards around 5: a baseline removes most of the variance
    assert "divides the variance" in page.inner_text("#variance-ratio")
    assert page.locator("#estimators tr.chosen").get_attribute("data-name") == "loo"
    page.click("#step")
    wait_until(lambda: tab.steps() == 1, what="one step")
    assert "leave-one-out (RLOO) (used)" in page.inner_text("#gradient-legend")
    assert not page.locator("#terminal").evaluate("d => d.open")  # the command is folded away until asked
    assert page.text_content("#command").startswith("policygrad bandit --means 5.0 4.0 7.0 4.5 --noise 0.5")


def test_a_mistake_is_a_visible_message_and_no_server_error(tab):
    page = tab.page
    page.fill("#lr", "abc")
    wait_until(tab.message, what="a message")
    assert tab.message() == "lr: must be a number, got 'abc'"
    assert page.get_attribute("#lr", "aria-invalid") == "true"
    page.click("#step")  # learning goes on with the last good settings
    wait_until(lambda: tab.steps() == 1, what="one step")

    page.fill("#lr", "0.3")
    page.fill("#noise", "-1")
    wait_until(lambda: tab.message().startswith("noise"), what="the noise message")
    assert tab.message() == "noise: must be a finite number >= 0, got -1.0"
    page.fill("#noise", "0.5")
    tab.settle()
    wait_until(lambda: tab.message() == "", what="the message to go")
    assert page.get_attribute("#noise", "aria-invalid") is None

    page.fill("#mean-1", "4x")
    wait_until(tab.message, what="the arm's message")
    assert tab.message() == "means[1]: must be a number, got '4x'"
    assert page.get_attribute("#mean-1", "aria-invalid") == "true"
    page.fill("#mean-1", "4")
    while page.locator("#arms tbody tr").count():
        page.click("#arms tbody tr:last-child button")
    wait_until(lambda: tab.message().endswith("(got 0)"), what="the no-arms message")
    assert tab.message() == "means: give at least two arms, e.g. --means 1 0 0.5 (got 0)"
    page.click("#add-arm")
    wait_until(lambda: tab.message().endswith("(got 1)"), what="the one-arm message")  # nothing to learn
    page.click("#add-arm")
    wait_until(lambda: tab.message() == "", what="the message to go")
    assert tab.probs() == [0.5, 0.5] and tab.steps() == 0


def test_reusing_the_batch_shows_the_kl_and_the_clip(tab):
    page = tab.page
    page.fill("#epochs", "4")
    page.fill("#clip_eps", "0.1")
    page.fill("#lr", "2")
    tab.settle()
    page.click("#step")
    wait_until(lambda: tab.steps() == 1, what="one step")
    note = page.inner_text("#reuse-note")
    assert note.startswith("Last step: 4 updates on one batch, KL to the sampling policy"), note
    assert "--epochs 4 --clip-eps 0.1" in page.text_content("#command")


def screenshot(path: Path) -> None:
    """The README's picture: the default bandit (leave-one-out baseline), two updates per batch, after 40 steps."""
    from playground_helpers import CHROMIUM, CHROMIUM_ARGS, serving
    from playwright.sync_api import sync_playwright

    with serving() as url, sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = Page(chromium, url)
        page.page.select_option("#rate", "60")
        page.page.fill("#epochs", "2")
        page.settle()
        page.run(40)
        page.page.screenshot(path=str(path), full_page=True)
        chromium.close()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    screenshot(Path(__file__).resolve().parents[2] / "docs" / "playground.png")
