"""The console page in a real browser: headless Chromium driven by selenium.

Debian's chromium and chromium-driver, never a downloaded driver: the test
skips, with the reason, when either or selenium is missing. The browser's
processes inherit the session's tag, so the leak check sees them too; the
driver is quit in a finally.

Set RALPH_CONSOLE_SCREENSHOT=docs/console.png to rewrite the screenshot in
the docs (a longer run, so that the charts have something to show).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from test_console import CONFIG, Run, call

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

for _program in (CHROMIUM, CHROMEDRIVER):
    if not os.access(_program, os.X_OK):
        pytest.skip(
            f"{_program} is missing (apt-get install chromium chromium-driver)",
            allow_module_level=True,
        )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)

# Two throttled iterations open the breaker, which then stays open past the
# end of the test; the loop waits for it rather than giving up.
BROWSER_CONFIG = CONFIG.replace(
    "breaker:\n  storage: memory\n",
    "breaker:\n  storage: memory\n  fail_max: 2\n  reset_timeout: 120\n",
).replace(
    "loop:\n",
    "loop:\n  max_consecutive_failures: 50\n  max_open_wait: 900\n",
)

THROTTLE = "@sim:failure=throttled\n"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    started = Run(tmp_path, BROWSER_CONFIG)
    try:
        yield started
    finally:
        started.stop()


def text(driver: Any, selector: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0].text if found else ""


def wait_for(
    driver: Any, run: Run, what: str, predicate: Callable[[], Any], timeout: float = 15
) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda _: predicate())
    except TimeoutException:
        body = driver.find_element(By.TAG_NAME, "body").text
        pytest.fail(f"the page never showed {what} within {timeout} s:\n{body}\n{run.stderr()}")


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def iteration_shown(driver: Any) -> int:
    value = text(driver, '#loops [data-name="Iteration"] .value')
    head = value.split("/")[0].strip()
    return int(head) if head.isdigit() else -1


def inject_throttling(run: Run) -> None:
    """Put the simulator's failure directive at the top of the prompt.

    The simulator ticks the checklist by rewriting PROMPT.md, and may write
    over an edit made during its call: write again until it sticks.
    """
    prompt = run.workdir / "PROMPT.md"
    current = prompt.read_text()
    if not current.startswith(THROTTLE):
        prompt.write_text(THROTTLE + current)


def test_the_page_follows_a_run_and_stops_it(browser: Any, run: Run) -> None:
    browser.get(run.url + "/")

    # Healthy, two workers with their pids, the loop advancing.
    wait_for(browser, run, "the status", lambda: text(browser, "#status") == "HEALTHY")
    rows = wait_for(
        browser,
        run,
        "two workers",
        lambda: (
            len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")) == 2
            and browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
        ),
    )
    pids = {str(worker["pid"]) for worker in run.state()["workers"]}
    assert {row.find_elements(By.TAG_NAME, "td")[1].text for row in rows} == pids
    first = wait_for(browser, run, "an iteration", lambda: iteration_shown(browser) >= 1 or None)
    wait_for(browser, run, "the loop advancing", lambda: iteration_shown(browser) >= first + 2)
    assert "/ 100" in text(browser, '#loops [data-name="Iteration"]')
    assert "iteration" in text(browser, "#log")
    assert text(browser, "#agents tbody tr td:nth-child(2)") == "CLOSED"

    # The iterations chart: bars from history.jsonl, or a word that there is none.
    if run.loop()["history"]:
        wait_for(
            browser,
            run,
            "iteration bars",
            lambda: (
                len(browser.find_elements(By.CSS_SELECTOR, "#iterations-chart rect title")) >= 2
            ),
        )
    else:
        assert "no iteration history" in text(browser, "#iterations-chart")
    errors = console_errors(browser)
    assert not errors, errors

    # Throttled calls open the breaker: the page says so, with the next trial.
    def breaker_open() -> bool:
        inject_throttling(run)
        return text(browser, "#agents tbody tr td:nth-child(2)") == "OPEN"

    wait_for(browser, run, "the breaker open", breaker_open, timeout=20)
    # As /health says it: degraded or unhealthy, with the breaker as a reason.
    wait_for(browser, run, "not healthy", lambda: text(browser, "#status") != "HEALTHY")
    assert "breaker" in text(browser, "#reasons")
    assert text(browser, "#agents tbody tr td:nth-child(3)").startswith("in ")
    assert "throttled" in text(browser, "#agents tbody tr td:nth-child(6)")

    # An action asks for the token once; it is kept for the session.
    browser.find_element(By.CSS_SELECTOR, '[data-action="close_breaker"]').click()
    wait_for(
        browser, run, "the token bar", lambda: browser.find_element(By.ID, "token").is_displayed()
    )
    browser.find_element(By.ID, "token").send_keys("wrong-token")
    browser.find_element(By.CSS_SELECTOR, "#tokenform button").click()
    wait_for(browser, run, "the refusal", lambda: "refused" in text(browser, "#tokenerror"))
    browser.find_element(By.ID, "token").send_keys(run.token())
    browser.find_element(By.CSS_SELECTOR, "#tokenform button").click()
    wait_for(
        browser,
        run,
        "the breaker closed",
        lambda: "closed the breaker" in text(browser, "#notice"),
    )
    assert browser.execute_script("return sessionStorage.getItem('ralph-console-token')") == (
        run.token()
    )
    # 403s from the wrong token are the browser's console errors; none other.
    errors = [entry for entry in console_errors(browser) if "403" not in entry["message"]]
    assert not errors, errors

    # Stop: two clicks, then the drain, and the run ends with exit 0.
    stop = browser.find_element(By.ID, "stop")
    stop.click()
    assert stop.text == "Confirm stop"
    assert run.process.poll() is None
    stop.click()
    assert run.wait_exit(20) == 0, run.stderr()
    wait_for(browser, run, "the run stopped", lambda: text(browser, "#status") == "STOPPED")
    assert "stop requested" in run.stderr()


@pytest.mark.skipif(
    not os.environ.get("RALPH_CONSOLE_SCREENSHOT"),
    reason="set RALPH_CONSOLE_SCREENSHOT=docs/console.png to rewrite the docs' screenshot",
)
@pytest.mark.timeout(600)
def test_screenshot_for_the_docs(browser: Any, tmp_path: Path) -> None:
    """A two-minute run with varied latency and a git work tree, then a picture."""
    root = tmp_path / "shot"
    root.mkdir()
    config = CONFIG.replace("max_concurrent: 2", "max_concurrent: 3").replace(
        "loop:\n", "loop:\n  max_iterations: 1000\n"
    )
    run = Run(
        root,
        config,
        env={
            "QCHAT_SIM_LATENCY": "lognormal:1.2:0.35",
            "QCHAT_SIM_WORK_DIR": "src",
            # Now and then a throttled call: a red bar, an error by type.
            "QCHAT_SIM_THROTTLE_RATE": "0.04",
        },
        git=True,
    )
    try:
        # The page's viewport itself, not the window around it.
        browser.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        browser.get(run.url + "/")
        seconds = float(os.environ.get("RALPH_CONSOLE_SCREENSHOT_SECONDS", "150"))
        assert wait_until(lambda: run.process.poll() is not None, timeout=seconds) is False
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(2)
        target = Path(os.environ["RALPH_CONSOLE_SCREENSHOT"])
        browser.save_screenshot(str(target))
        status, _ = call(run.url + "/api/state")
        assert status == 200
    finally:
        run.stop()
