"""`hellochat serve` in a real browser: the command is started on a tiny random-weight model
folder, headless Chromium (Debian's `chromium` and `chromium-driver` packages, driven by
selenium through /usr/bin/chromedriver) loads the page, uploads a clip, sends it, waits for the
reply text in the chat and the reply audio player, and saves a screenshot.

Marked slow (the talker's first compilation on a CPU takes a minute or more). Without the
browser the test skips, and in CI (tests/conftest.py) that skip is a failure: .ci/run installs
the packages."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hellochat_jax.testing.chat import make_tiny_chat_folders

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
START_TIMEOUT_S = 300  # jax import, model load, Gradio start
REPLY_TIMEOUT_S = 600  # first compilation of thinker, talker, flow and vocoder on a CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


@pytest.fixture
def server(tmp_path_factory):
    """`hellochat serve` on 127.0.0.1 over a tiny model folder: (url, clip, log path)."""
    root = make_tiny_chat_folders(tmp_path_factory.mktemp("serve"))
    port = _free_port()
    log = root / "serve.log"
    # One CPU device, as a user's machine has (the in-process tests simulate 8).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    cmd = [sys.executable, "-m", "hellochat_jax.cli", "serve", "--model", str(root / "model"), "--host", "127.0.0.1",
           "--port", str(port), "--max-new-tokens", "4", "--no-compilation-cache"]
    url = f"http://127.0.0.1:{port}/"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"hellochat serve exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"hellochat serve did not answer {url} within {START_TIMEOUT_S} s:\n{_tail(log)}")
            time.sleep(1)
        yield url, root / "q1.wav", log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver): no {', '.join(missing)}")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)  # with the driver's path given, Selenium Manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_browser_uploads_a_clip_and_gets_text_and_audio(server, browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, clip, log = server
    shot = tmp_path / "serve.png"

    def wait(condition, timeout: float, what: str):
        try:
            return WebDriverWait(browser, timeout, poll_frequency=0.5).until(condition)
        except TimeoutException:
            browser.save_screenshot(str(shot))
            pytest.fail(f"timed out after {timeout} s waiting for {what} (screenshot: {shot}); server log:\n{_tail(log)}")

    def css(selector: str):
        return (By.CSS_SELECTOR, selector)

    browser.get(url)
    wait(ec.element_to_be_clickable(css("#audio-in button[aria-label='Upload file']")), 120, "the upload source button").click()
    # Gradio keeps the file input hidden; chromedriver still sets files on it.
    wait(ec.presence_of_element_located(css("#audio-in input[type=file]")), 60, "the file input").send_keys(str(clip))
    wait(ec.presence_of_element_located(css("#audio-in audio")), 120, "the uploaded clip's player")
    wait(ec.element_to_be_clickable(css("#send")), 60, "the send button").click()

    def replied(driver):
        bots = driver.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")
        players = driver.find_elements(By.CSS_SELECTOR, "#reply-audio audio")
        # The reply player gets its <audio> with the last update, once the whole reply is spoken.
        if bots and bots[-1].text.strip() and players:
            return bots[-1].text
        return False

    start = time.monotonic()
    reply = wait(replied, REPLY_TIMEOUT_S, "the reply text and the reply audio")
    print(f"reply in the page after {time.monotonic() - start:.0f} s")
    assert not reply.startswith("error"), reply
    users = browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=user]")
    assert users and "[audio]" in users[-1].text  # the clip went in as the user's turn

    assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
