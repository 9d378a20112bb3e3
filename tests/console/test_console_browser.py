"""The console in a real browser against a real ``conveyor run`` (one process for the module).

The application has a handler that succeeds (``ledger.record``), one that
fails until a flag file exists (``billing.charge``, one attempt, so a failure
is a dead letter at once), an hourly schedule and a saga whose step nobody answers. The process runs with a
console token, as in production, so the browser logs in through the form.

Screenshots of each page go to ``CONVEYOR_CONSOLE_SCREENSHOTS`` (default: the
test's temporary directory); with ``CONVEYOR_CONSOLE_DOCS=1`` the overview and
dead-letter ones are also copied to ``docs/console/`` for the README.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import chromium, require_browser
from selenium.common.exceptions import WebDriverException

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from cli import ROOT, Process, free_port

pytestmark = pytest.mark.slow

TOKEN = "console-e2e-token-0123456789"
APP = '''
import os
from datetime import timedelta
from pathlib import Path

from conveyor import Context, Reject, Saga, every, on
from pydantic import BaseModel


@on("orders.placed", name="ledger.record")
async def record(order: dict, ctx: Context) -> None:
    """Always succeeds."""


@on("payments.charge", name="billing.charge", max_attempts=1)
async def charge(payment: dict, ctx: Context) -> None:
    """Fails until the flag file exists; then records the payment."""
    if not Path(os.environ["CONSOLE_E2E_FLAG"]).exists():
        raise RuntimeError("payment gateway down")
    with open(os.environ["CONSOLE_E2E_DONE"], "a") as done:
        done.write(payment["payment_id"] + "\\n")


@on("refunds.issue", name="billing.refund", max_attempts=1)
async def refund(refund: dict, ctx: Context) -> None:
    """Always fails: its dead letters are chosen and replayed."""
    raise RuntimeError("refund gateway down")


@on("invoices.send", name="billing.invoice", max_attempts=1)
async def invoice(invoice: dict, ctx: Context) -> None:
    """Always fails: replaying every dead letter while it still fails."""
    raise RuntimeError("invoice printer down")


@on("credits.grant", name="billing.credit", max_attempts=1)
async def credit(credit: dict, ctx: Context) -> None:
    """Rejects or fails: dead letters of two error types to filter."""
    if credit.get("reject"):
        raise Reject("credit refused")
    raise ValueError("credit ledger down")


@on("reminders.set", name="reminders.set")
async def remind(reminder: dict, ctx: Context) -> None:
    """Schedules a reminder an hour ahead: an outbox row that is not due yet."""
    ctx.publish("reminders.due", reminder, delay=timedelta(hours=1))


@every(timedelta(hours=1), name="reports.hourly")
def hourly(ctx: Context) -> None:
    """A schedule to pause and resume."""


class Basket(BaseModel):
    basket_id: str


checkout = Saga("shop.checkout-basket", Basket, id=lambda basket: basket.basket_id, start_on="baskets.checked-out")


@checkout.step(send="stock.reserve-items", timeout=3600)
def reserve(basket: Basket) -> dict:
    """Nobody answers: the instance stays running."""
    return {"basket_id": basket.basket_id}
'''


class Console:
    """The running process and what the tests need to reach it."""

    def __init__(self, process: Process, port: int, workdir: Path) -> None:
        self.process = process
        self.base = f"http://127.0.0.1:{port}"
        self.flag = workdir / "fixed"
        self.done = workdir / "done.txt"

    def post(self, topic: str, data: dict[str, Any]) -> None:
        response = httpx.post(f"{self.base}/events/{topic}", json=data, timeout=5)
        assert response.status_code == 202, response.text


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    require_browser()
    workdir = tmp_path_factory.mktemp("console-e2e")
    (workdir / "console_e2e_app.py").write_text(APP)
    port = free_port()
    process = Process(
        ["run", "--port", str(port)], workdir / "run.log", cwd=ROOT,
        CONVEYOR_APP="console_e2e_app", CONVEYOR_APP_DIR=str(workdir), CONVEYOR_SERVICE="shop",
        CONVEYOR_DATABASE_URL=f"sqlite+aiosqlite:///{workdir}/conveyor.db", CONVEYOR_CONSOLE_TOKEN=TOKEN,
        CONSOLE_E2E_FLAG=str(workdir / "fixed"), CONSOLE_E2E_DONE=str(workdir / "done.txt"),
    )  # fmt: skip
    try:
        process.wait_ready(port, timeout=30)
        yield Console(process, port, workdir)
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("CONVEYOR_CONSOLE_SCREENSHOTS")
    directory = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def browser(console: Console) -> Iterator[Any]:
    driver: Any = chromium()
    try:
        driver.get(f"{console.base}/console/")
        driver.find_element("id", "name").send_keys("ada")
        driver.find_element("id", "token").send_keys(TOKEN + "\n")
        wait_until(lambda: driver.current_url.rstrip("/").endswith("/console"), "the login")
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except Exception:  # an element not there yet, a page still loading
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout}s")
        time.sleep(0.2)


def screenshot(driver: Any, shots: Path, name: str) -> None:
    driver.save_screenshot(str(shots / f"{name}.png"))
    if os.environ.get("CONVEYOR_CONSOLE_DOCS") and name in ("overview", "dead-letters"):
        docs = ROOT / "docs" / "console"
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / f"{name}.png", docs / f"{name}.png")


def letters_of(driver: Any, base: str, topic: str, count: int, query: str = "") -> list[Any]:
    """The rows of ``topic``'s dead-letter page once it lists at least ``count`` (reloading until then)."""

    def listed() -> Any:
        driver.get(f"{base}/console/dead-letters/{topic}{query}")
        rows = driver.find_elements("css selector", "#dead-letters tbody tr")
        return rows if len(rows) >= count else None

    return wait_until(listed, f"{count} dead letters of {topic}", timeout=30)


def handled(driver: Any, handler: str) -> int:
    return int(driver.find_element("css selector", f'tr[data-handler="{handler}"] td.handled').text)


def test_console_overview_shows_a_handlers_count_going_up(console: Console, browser: Any, shots: Path) -> None:
    browser.get(f"{console.base}/console/")
    before = handled(browser, "ledger.record")
    for number in range(5):
        console.post("orders.placed", {"order_id": f"o-{number}"})
    # No reload: the live part refreshes itself.
    wait_until(lambda: handled(browser, "ledger.record") >= before + 5, "count going up in the live overview")
    screenshot(browser, shots, "overview")


def test_console_dead_letter_is_listed_inspected_replayed_and_processed(
    console: Console, browser: Any, shots: Path
) -> None:
    console.post("payments.charge", {"payment_id": "p-42", "amount_cents": 1200})
    listing = f"{console.base}/console/dead-letters/payments.charge"

    def listed() -> Any:
        browser.get(listing)
        return browser.find_elements("css selector", "#dead-letters a.letter")

    link = wait_until(listed, "dead letter listed")[0]
    assert "payment gateway down" in browser.find_element("id", "dead-letters").text
    screenshot(browser, shots, "dead-letters")
    link.click()
    body = wait_until(lambda: browser.find_element("id", "body").text, "dead letter body")
    assert '"payment_id": "p-42"' in body
    assert "RuntimeError" in browser.find_element("id", "reason").text
    screenshot(browser, shots, "dead-letter")
    console.flag.touch()  # the handler is fixed
    browser.find_element("id", "replay-one").click()
    wait_until(lambda: "replayed 1 dead letter" in browser.find_element("css selector", ".flash").text, "replay")
    wait_until(lambda: console.done.exists() and "p-42" in console.done.read_text(), "the replayed payment processed")


def test_console_schedule_is_paused_and_resumed(console: Console, browser: Any, shots: Path) -> None:
    browser.get(f"{console.base}/console/schedules")
    section = "#schedule-reports\\.hourly"
    browser.find_element("css selector", f"{section} button.pause").click()
    wait_until(lambda: browser.find_element("css selector", f"{section} .state").text == "paused", "paused")
    screenshot(browser, shots, "schedules")
    browser.find_element("css selector", f"{section} button.resume").click()
    wait_until(lambda: browser.find_element("css selector", f"{section} .state").text == "active", "resumed")


def test_console_other_pages_render(console: Console, browser: Any, shots: Path) -> None:
    for name in ("outbox", "sagas"):
        browser.get(f"{console.base}/console/{name}")
        assert browser.find_element("css selector", "h1").text.lower().startswith(name)
        screenshot(browser, shots, name)


def test_console_outbox_shows_a_delayed_message_as_scheduled_not_due(console: Console, browser: Any) -> None:
    console.post("reminders.set", {"reminder_id": "r-1"})

    def scheduled() -> str:
        browser.get(f"{console.base}/console/outbox")
        return str(browser.find_element("id", "outbox-scheduled").text == "1")

    wait_until(lambda: scheduled() == "True", "the delayed message counted as scheduled")
    assert browser.find_element("id", "outbox-due").text == "0"
    assert browser.find_element("id", "outbox-oldest").text == "-"
    assert "scheduled" in browser.find_element("id", "outbox").text


def test_console_action_without_the_credential_is_refused(console: Console) -> None:
    response = httpx.post(
        f"{console.base}/console/schedules/reports.hourly/pause", headers={"accept": "application/json"}, timeout=5
    )
    forged = httpx.post(
        f"{console.base}/console/schedules/reports.hourly/pause",
        headers={"authorization": "Bearer not-the-token-at-all", "accept": "application/json"},
        timeout=5,
    )
    assert (response.status_code, forged.status_code) == (401, 401)
    assert response.json()["error"]["code"] == "unauthorized"
    assert "console action schedules.pause by unknown from 127.0.0.1 refused" in console.process.text()


def test_console_replay_selected_replays_the_letter_chosen_behind_another(console: Console, browser: Any) -> None:
    for number in range(2):
        console.post("refunds.issue", {"refund_id": f"r-{number}"})
    rows = letters_of(browser, console.base, "refunds.issue", 2)
    rows[-1].find_element("css selector", "input[type=checkbox]").click()
    browser.find_element("id", "replay-selected").click()
    flash = wait_until(lambda: browser.find_element("css selector", ".flash").text, "the replay's message")
    assert flash.startswith("replayed 1 dead letter(s) of refunds.issue")


def test_console_replay_all_while_the_handler_fails_replays_each_letter_once(console: Console, browser: Any) -> None:
    for number in range(3):
        console.post("invoices.send", {"invoice_id": f"i-{number}"})
    letters_of(browser, console.base, "invoices.send", 3)
    browser.find_element("id", "replay-all").click()
    flash = wait_until(lambda: browser.find_element("css selector", ".flash").text, "the replay's message")
    assert flash.startswith("replayed 3 dead letter(s) of invoices.send")


def test_console_dead_letters_are_filtered_by_error_type(console: Console, browser: Any) -> None:
    console.post("credits.grant", {"credit_id": "c-1", "reject": True})
    console.post("credits.grant", {"credit_id": "c-2"})
    letters_of(browser, console.base, "credits.grant", 2)
    browser.find_element("id", "error_type").send_keys("Rejected\n")
    wait_until(lambda: "error_type=Rejected" in browser.current_url, "the filtered page")
    kinds = [
        row.find_element("css selector", "td.error-type").text
        for row in letters_of(browser, console.base, "credits.grant", 1, "?error_type=Rejected")
    ]
    assert kinds and set(kinds) == {"Rejected"}


def test_console_dead_letter_is_found_by_its_event_id(console: Console, browser: Any) -> None:
    event = {
        "specversion": "1.0",
        "id": "credit-e-7",
        "source": "shop",
        "type": "credits.grant",
        "data": {"credit_id": "c-7"},
    }
    response = httpx.post(
        f"{console.base}/events/credits.grant",
        json=event,
        headers={"content-type": "application/cloudevents+json"},
        timeout=5,
    )
    assert response.status_code == 202, response.text
    console.post("credits.grant", {"credit_id": "c-8"})
    letters_of(browser, console.base, "credits.grant", 2)
    browser.find_element("id", "event_id").send_keys("credit-e-7\n")
    wait_until(lambda: "event_id=credit-e-7" in browser.current_url, "the search")
    cells = [
        row.find_element("css selector", "td.event-id").text
        for row in browser.find_elements("css selector", "#dead-letters tbody tr")
    ]
    assert cells == ["credit-e-7"]


def test_console_dead_letter_time_shows_in_one_format(console: Console, browser: Any) -> None:
    console.post("credits.grant", {"credit_id": "c-9"})
    (row, *_) = letters_of(browser, console.base, "credits.grant", 1)
    when = row.find_elements("css selector", "td")[-1].text
    assert len(re.findall(r"\d\d:\d\d:\d\d", when)) == 1, when


def test_docs_page_reads_without_internet(console: Console) -> None:
    driver: Any = chromium(offline=True)
    try:
        with pytest.raises(WebDriverException, match="ERR_NAME_NOT_RESOLVED"):
            driver.get("https://unpkg.com/")  # the rule holds: no site but this machine answers
        driver.get(f"{console.base}/docs")
        text = wait_until(lambda: driver.find_element("tag name", "body").text, "the docs page")
    finally:
        driver.quit()
    assert "receive.ledger.record" in text
    assert "send" in text.lower()


def box(driver: Any, css: str) -> dict[str, float]:
    found: dict[str, float] = driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {left: r.left, right: r.right, width: r.width};",
        css,
    )
    return found


def test_console_overview_sagas_card_is_whole_at_1440_px(console: Console, browser: Any, shots: Path) -> None:
    console.post("baskets.checked-out", {"basket_id": "b-1"})
    browser.set_window_size(1440, 900)
    try:
        browser.get(f"{console.base}/console/")
        card = "section[aria-labelledby=h-sagas]"
        wait_until(lambda: browser.find_elements("css selector", f"{card} table"), "the saga counts")
        viewport = browser.execute_script("return document.documentElement.clientWidth")
        screenshot(browser, shots, "overview-1440")
        outer, table = box(browser, card), box(browser, f"{card} table")
    finally:
        browser.set_window_size(1366, 900)
    assert viewport >= 1400
    assert outer["right"] <= viewport
    assert table["right"] <= outer["right"]


def test_console_times_show_one_format_per_cell_with_utc_on_hover(console: Console, browser: Any) -> None:
    browser.get(f"{console.base}/console/schedules")
    times = wait_until(lambda: browser.find_elements("css selector", "time[datetime]"), "times on the page")
    shown = [(element.text, element.get_attribute("title")) for element in times]
    assert [text for text, _ in shown if len(re.findall(r"\d{1,2}:\d{2}:\d{2}", text)) != 1] == []
    assert all(title.endswith("UTC") for _, title in shown)


def test_console_workers_page_lists_this_process(console: Console, browser: Any, shots: Path) -> None:
    pid = str(console.process.popen.pid)

    def listed() -> Any:
        browser.get(f"{console.base}/console/workers")
        return browser.find_elements("css selector", f'#workers tr[data-pid="{pid}"]')

    row = wait_until(listed, "this process in the workers list")[0]
    screenshot(browser, shots, "workers")
    assert "ledger.record" in row.text
    assert "alive" in row.text
