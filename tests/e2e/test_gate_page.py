"""The gate page (docs/GATES.md) in a real headless browser: Debian's chromium driven by Selenium through the
system chromedriver, against a `cellstream serve` process on the shipped model.

At desktop and at phone size: chat through the keyboard, see the reply stream in (the page shows it chunk by
chunk) and equal the reply the JSON API gives the same conversation, see the heatmap drawn for every byte fed
(its columns are the UTF-8 bytes of the prompts and replies, and the session's position), switch layer, hover
(or tap) a cell and read values that agree with the session's state, see the remembered-fact view, all without
one error in the browser's console. A token-protected server's page asks for the token and then chats.

GATE_PAGE_SCREENSHOT=docs/images/gate-page.png writes the desktop run's screenshot there (docs/GATES.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from cellstream.bench.server import free_ports

pytestmark = pytest.mark.timeout(120)

ARTIFACTS = Path(__file__).resolve().parents[2] / "model" / "artifacts"
MODEL = "cellstream-chat"
MESSAGES = ["my name is alice.", "what is my name?"]
TOKEN = "gate-page-token-0123456789abcdef"
WAIT_SECONDS = 30


@dataclass(frozen=True)
class Window:
    name: str
    width: int
    height: int
    phone: bool  # emulated: a touch screen at 3 device pixels per CSS pixel


DESKTOP = Window("desktop", 1280, 1000, phone=False)
PHONE = Window("phone", 390, 844, phone=True)


@dataclass(frozen=True)
class Served:
    url: str
    process: object  # tests/e2e/conftest.py's ServerProcess


def _serve(server_process_class, directory: Path, model_dir: Path = ARTIFACTS, **flags: object) -> Iterator[Served]:
    [http_port] = free_ports(1)
    process = server_process_class(model_dir, directory / "server.log", default_model=MODEL, http_port=http_port,
                                   **flags)
    try:
        asyncio.run(process.wait_serving())
        yield Served(f"http://127.0.0.1:{http_port}/", process)
        assert "Traceback" not in process.log(), process.log()
    finally:
        process.kill()


@pytest.fixture(scope="module")
def served(server_process_class, tmp_path_factory) -> Iterator[Served]:
    yield from _serve(server_process_class, tmp_path_factory.mktemp("gate-page"))


@pytest.fixture(scope="module")
def served_without_gates(server_process_class, tmp_path_factory) -> Iterator[Served]:
    """The shipped model without its glass-box graph beside it."""
    directory = tmp_path_factory.mktemp("gate-page-no-gates")
    (directory / "models").mkdir()
    (directory / "models" / f"{MODEL}.onnx").symlink_to(ARTIFACTS / f"{MODEL}.onnx")
    yield from _serve(server_process_class, directory, model_dir=directory / "models")


@pytest.fixture(scope="module")
def served_with_token(server_process_class, tmp_path_factory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("gate-page-token")
    (directory / "tokens").write_text(f"alice {TOKEN}\n")
    yield from _serve(server_process_class, directory, auth_token_file=directory / "tokens")


def start_browser(window: Window, log: Path) -> webdriver.Chrome:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail("the gate page's test needs Debian's chromium and chromedriver: "
                    "`apt-get install -y chromium chromium-driver` (.ci/run does it)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update",
                     f"--window-size={DESKTOP.width},{DESKTOP.height}"):
        options.add_argument(argument)
    if window.phone:
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": {
            "width": window.width, "height": window.height, "pixelRatio": 3.0, "touch": True}})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver, log_output=str(log)))


@pytest.fixture
def chrome(monkeypatch, tmp_path) -> Iterator:
    """chrome(window) -> a headless chromium at that size; quit after the test."""
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download a browser or a driver
    started: list[webdriver.Chrome] = []

    def _start(window: Window) -> webdriver.Chrome:
        started.append(start_browser(window, tmp_path / f"chromedriver-{len(started)}.log"))
        return started[-1]

    yield _start
    for driver in started:
        driver.quit()


def wait(driver: webdriver.Chrome, condition, what: str):
    return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.05).until(lambda d: condition(d), what)


def severe(driver: webdriver.Chrome) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def reference_replies(served: Served) -> tuple[list[str], int]:
    """The same conversation through the JSON API (greedy, like the page): the replies and the end position."""
    with httpx.Client(base_url=served.url, timeout=30) as http:
        sid = http.post("v1/sessions", json={"model": MODEL}).json()["session_id"]
        replies = []
        for message in MESSAGES:
            body = {"prompt": f"user: {message}\nbot: ", "stop": ["\n"], "max_tokens": 120}
            response = http.post(f"v1/sessions/{sid}/generate", json=body)
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
            replies.append("".join(chunk["text"] for chunk in chunks))
        position = int(http.get(f"v1/sessions/{sid}/state").json()["position"])
        http.delete(f"v1/sessions/{sid}")
    return replies, position


def session_state(served: Served, sid: str) -> dict:
    with urllib.request.urlopen(f"{served.url}v1/sessions/{sid}/state", timeout=10) as response:
        return json.load(response)


# The text of the reply as the page showed it, each time it changed: the page sets it once per chunk.
WATCH_REPLIES = """
window.shownReplies = [];
new MutationObserver((records) => {
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (node.nodeType === Node.TEXT_NODE && node.parentElement.matches("li.bot .text")) {
        window.shownReplies.push(node.data);
      }
    }
  }
}).observe(document.getElementById("messages"), { childList: true, subtree: true });
"""

# The columns in view whose cells are painted (opaque) at the middle unit of every panel.
PAINTED_COLUMNS = """
const canvas = document.getElementById("heatmap");
const scroller = document.getElementById("heatmap-scroller");
const d = canvas.dataset;
const context = canvas.getContext("2d");
const ratio = canvas.width / canvas.clientWidth;
const painted = [];
for (let t = Number(d.drawnFrom); t < Number(d.drawnTo); t++) {
  const x = t * Number(d.columnPx) - scroller.scrollLeft + Number(d.columnPx) / 2;
  if (x < 0 || x >= canvas.clientWidth) continue;
  let opaque = true;
  for (let p = 0; p < 5; p++) {
    const y = Number(d.cellsTop) + p * Number(d.panelPx) + (Number(d.panelPx) - 15) / 2;
    opaque &&= context.getImageData(Math.floor(x * ratio), Math.floor(y * ratio), 1, 1).data[3] === 255;
  }
  if (opaque) painted.push(t);
}
return painted;
"""


def heatmap(driver: webdriver.Chrome) -> dict[str, str]:
    return driver.find_element(By.ID, "heatmap").get_property("dataset")


def scroll_heatmap(driver: webdriver.Chrome, left: int) -> None:
    """Scroll the heatmap sideways and wait for the redraw that follows."""
    before = heatmap(driver)
    moved = driver.execute_script("const s = document.getElementById('heatmap-scroller'); const was = s.scrollLeft;"
                                  "s.scrollLeft = arguments[0]; return s.scrollLeft !== was;", left)
    if moved:
        wait(driver, lambda d: heatmap(d)["draws"] != before["draws"], "a redraw after scrolling")


def painted_columns(driver: webdriver.Chrome) -> set[int]:
    """Every column painted, the heatmap scrolled from its start to its end a view at a time."""
    width, view = driver.execute_script("const s = document.getElementById('heatmap-scroller');"
                                        "return [s.scrollWidth, s.clientWidth];")
    painted: set[int] = set()
    for left in [*range(0, width, view), width]:
        scroll_heatmap(driver, left)
        painted |= set(driver.execute_script(PAINTED_COLUMNS))
    return painted


def chat(driver: webdriver.Chrome, message: str) -> WebElement:
    """Type a message, press Enter, wait for the whole reply; its list item."""
    count = len(driver.find_elements(By.CSS_SELECTOR, "li.bot"))
    driver.find_element(By.ID, "message").send_keys(message + "\n")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.bot[data-done]")) > count,
         f"the reply to {message!r}")
    reply = driver.find_elements(By.CSS_SELECTOR, "li.bot")[count]
    assert "error" not in reply.get_attribute("class"), reply.text
    return reply


def point_at(driver: webdriver.Chrome, canvas: WebElement, x: float, y: float, tap: bool) -> None:
    """Hover (or tap, on a touch screen) the canvas at (x, y) CSS pixels from its top left corner."""
    width, height = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];",
                                          canvas)
    actions = ActionChains(driver).move_to_element_with_offset(canvas, round(x - width / 2), round(y - height / 2))
    (actions.click() if tap else actions).perform()


TOOLTIP = re.compile(r"(?P<byte>.+?)  step (?P<step>\d+)  unit (?P<unit>\d+)  layer (?P<layer>\d+)\n"
                     r"f (?P<f>\S+)  i (?P<i>\S+)  o (?P<o>\S+)\nC̃ (?P<candidate>\S+)  C (?P<c>\S+)  h (?P<h>\S+)")


def shown(value: str, expected: float) -> bool:
    """The tooltip's rounding of `expected`: 3 decimals, or 1 from 10 on."""
    return abs(float(value) - expected) <= (0.051 if abs(expected) >= 10 else 0.00051)


@pytest.mark.parametrize("window", [DESKTOP, PHONE], ids=lambda w: w.name)
def test_chat_and_gates_in_a_real_browser(served, chrome, window, tmp_path):
    replies, position = reference_replies(served)
    driver = chrome(window)
    driver.get(served.url)
    wait(driver, lambda d: d.find_element(By.ID, "send").is_enabled(), "the page ready to chat")
    assert "2 layers × 128 units, gates on" in driver.find_element(By.ID, "status").text
    assert driver.execute_script("return innerWidth") == window.width
    driver.execute_script(WATCH_REPLIES)

    items = [chat(driver, MESSAGES[0])]
    streamed = driver.execute_script("return window.shownReplies")
    items.append(chat(driver, MESSAGES[1]))
    assert [item.text.split("\n", 1)[1] for item in items] == [reply.rstrip("\n") for reply in replies]
    assert items[0].get_attribute("data-finish") == "stop"
    # Shown a chunk at a time: a growing text, each a beginning of the whole reply.
    assert len(streamed) > 1 and streamed[-1] == replies[0].rstrip("\n"), streamed
    assert streamed == sorted(streamed, key=len) and all(replies[0].startswith(text) for text in streamed), streamed

    # One column per byte fed: the UTF-8 bytes of every prompt and reply, the session's position.
    fed = "".join(f"user: {message}\nbot: {reply}" for message, reply in zip(MESSAGES, replies, strict=True))
    assert len(fed.encode()) == position
    wait(driver, lambda d: heatmap(d)["columns"] == str(position), f"{position} columns")
    sid = driver.find_element(By.ID, "chat").get_attribute("data-session-id")
    assert int(session_state(served, sid)["position"]) == position
    assert painted_columns(driver) == set(range(position)), "a byte's column was not drawn"

    layer0 = driver.execute_script("return document.getElementById('heatmap').toDataURL()")
    draws = heatmap(driver)["draws"]
    Select(driver.find_element(By.ID, "layer")).select_by_value("1")
    wait(driver, lambda d: heatmap(d)["layer"] == "1" and heatmap(d)["draws"] != draws, "a redraw for layer 1")
    assert driver.execute_script("return document.getElementById('heatmap').toDataURL()") != layer0
    assert painted_columns(driver) == set(range(position))

    # The last byte's cell, near the canvas' middle: its C and h are the session's state now.
    scroll_heatmap(driver, 10**6)
    canvas = driver.find_element(By.ID, "heatmap")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    data = heatmap(driver)
    row_px, panel_px, top = float(data["rowPx"]), float(data["panelPx"]), float(data["cellsTop"])
    middle = driver.execute_script("return arguments[0].clientHeight / 2", canvas)
    unit = int((middle - top - 2 * panel_px) / row_px)  # in the third panel, o_t
    left = driver.execute_script("return document.getElementById('heatmap-scroller').scrollLeft")
    x = (position - 1) * int(data["columnPx"]) - left + int(data["columnPx"]) / 2
    point_at(driver, canvas, x, top + 2 * panel_px + (unit + 0.5) * row_px, tap=window.phone)
    tooltip = driver.find_element(By.ID, "tooltip")
    wait(driver, lambda d: tooltip.is_displayed(), "the tooltip")
    values = TOOLTIP.fullmatch(tooltip.text)
    assert values, tooltip.text
    assert (values["step"], values["unit"], values["layer"]) == (str(position - 1), str(unit), "1")
    assert values["byte"] == f"'\\n' 0x{fed.encode()[-1]:02x}" == "'\\n' 0x0a"
    state = session_state(served, sid)
    hidden = state["hidden_size"]
    assert shown(values["c"], state["c"][hidden + unit]) and shown(values["h"], state["h"][hidden + unit]), values
    assert all(0 <= float(values[gate]) <= 1 for gate in "fio") and -1 <= float(values["candidate"]) <= 1

    # The remembered fact: the first user message picked, eight units traced.
    picked = Select(driver.find_element(By.ID, "fact-message")).first_selected_option.text
    assert picked == f"1. you: {MESSAGES[0]}"
    units = driver.find_element(By.ID, "fact-chart").get_attribute("data-units").split(",")
    assert len(set(units)) == 8 and all(0 <= int(u) < hidden for u in units)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#fact-legend li")) == 8

    chat_box, gates_box = (driver.find_element(By.ID, name).rect for name in ("chat", "gates"))
    if window.phone:  # stacked, and nothing wider than the screen
        assert gates_box["y"] >= chat_box["y"] + chat_box["height"]
        assert driver.execute_script("return document.documentElement.scrollWidth") <= window.width
    else:  # side by side
        assert gates_box["x"] >= chat_box["x"] + chat_box["width"]
    assert severe(driver) == []
    if not window.phone:
        save_screenshot(driver, tmp_path / "gate-page.png")


def save_screenshot(driver: webdriver.Chrome, path: Path) -> None:
    """The whole page at the desktop width; also to GATE_PAGE_SCREENSHOT if set (the docs' copy)."""
    height = driver.execute_script("return document.documentElement.scrollHeight + outerHeight - innerHeight")
    driver.set_window_size(DESKTOP.width, height)
    driver.execute_script("scrollTo(0, 0); document.activeElement.blur()")  # no focus ring in the picture
    wait(driver, lambda d: d.execute_script("return innerHeight >= document.documentElement.scrollHeight"),
         "the window as tall as the page")
    assert driver.save_screenshot(str(path))
    target = os.environ.get("GATE_PAGE_SCREENSHOT")
    if target:
        shutil.copyfile(path, target)


def test_a_token_protected_server_s_page_asks_for_the_token(served_with_token, chrome):
    driver = chrome(DESKTOP)
    driver.get(served_with_token.url)
    form = driver.find_element(By.ID, "token-form")
    wait(driver, lambda d: form.is_displayed(), "the token form")
    assert "needs a token" in driver.find_element(By.ID, "status").text
    assert not driver.find_element(By.ID, "send").is_enabled()
    driver.find_element(By.ID, "token").send_keys(TOKEN + "\n")
    wait(driver, lambda d: d.find_element(By.ID, "send").is_enabled(), "the page ready to chat")
    assert not form.is_displayed()
    assert chat(driver, MESSAGES[0]).text.split("\n", 1)[1]
    refused = severe(driver)
    # Chrome logs the refused call (the page's first, before it had a token) as a failed load; nothing else.
    assert len(refused) == 1 and "v1/models" in refused[0]["message"] and "401" in refused[0]["message"], refused


def test_a_model_without_gates_still_chats(served_without_gates, chrome):
    driver = chrome(DESKTOP)
    driver.get(served_without_gates.url)
    wait(driver, lambda d: d.find_element(By.ID, "send").is_enabled(), "the page ready to chat")
    assert "no gates" in driver.find_element(By.ID, "status").text
    note = driver.find_element(By.ID, "gates-note")
    assert note.is_displayed() and f"cellstream gates {MODEL}.onnx" in note.text
    assert chat(driver, MESSAGES[0]).text.split("\n", 1)[1]
    assert heatmap(driver)["columns"] == "0"
    assert severe(driver) == []
