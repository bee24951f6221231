"""The web playground at `/` in a real browser: Debian's headless Chromium driven by Selenium
with the system browser and chromedriver (nothing downloaded), against a real API and worker on
the tiny model. Enter a prompt, generate, see a preview and then the final image; a bad value
shows the API's own message beside its field. Screenshots are written to $TEST_ARTIFACTS_DIR
(default: test-artifacts/ at the repository root).

Never skipped: scripts/test.sh and .ci/run install chromium and chromium-driver. The worker is
paused (SIGSTOP) while the job is queued so that the page's event stream is registered before
the job runs, as it is for any job that waits in a queue (a tiny job can otherwise end before
the page has connected)."""
import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from devkit.api_proc import ALICE, service_stack
from devkit.services import ROOT

ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", ROOT / "test-artifacts"))


def system_binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
        if path:
            return path
    raise AssertionError(f"none of {names} installed: apt-get install -y chromium chromium-driver "
                         "(scripts/test.sh does it)")


@pytest.fixture(scope="module")
def stack(tiny_model):
    with service_stack(tiny_model, progress_interval_s=0.05) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = system_binary("chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(system_binary("chromedriver")))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(fn, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def fill(driver, field: str, value: str):
    from selenium.webdriver.common.by import By

    el = driver.find_element(By.ID, field)
    el.clear()
    el.send_keys(value)


def test_generate_shows_a_preview_then_the_image(stack, browser):
    from selenium.webdriver.common.by import By

    api, worker = stack["api"], stack["worker"]
    browser.get(api.url + "/")
    assert "latentd" in browser.title
    fill(browser, "key", ALICE)
    browser.find_element(By.ID, "prompt").click()                 # the key field's change event
    wait_until(lambda: "model:" in browser.find_element(By.ID, "model-name").text, 30, "the model name")
    fill(browser, "prompt", "a red circle on a white background")
    fill(browser, "size", "64x64")
    fill(browser, "steps", "24")
    fill(browser, "seed", "7")
    worker.proc.send_signal(signal.SIGSTOP)
    try:
        browser.find_element(By.ID, "generate").click()
        wait_until(lambda: "Queued" in browser.find_element(By.ID, "status").text, 30, "queued")
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    stage = browser.find_element(By.ID, "stage")
    wait_until(lambda: int(stage.get_attribute("data-previews")) >= 1, 60, "a preview")
    wait_until(lambda: stage.get_attribute("data-state") == "final", 60, "the final image")
    live = browser.find_element(By.ID, "live")
    assert "/v1/jobs/" in live.get_attribute("src") and "sig=" in live.get_attribute("src")
    wait_until(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", live) == 64,
               30, "the image to load")
    wait_until(lambda: "Done" in browser.find_element(By.ID, "status").text, 30, "done")
    results = browser.find_elements(By.CSS_SELECTOR, "#results figure")
    assert len(results) == 1 and "seed 7" in results[0].text
    assert results[0].find_element(By.CSS_SELECTOR, "a.download").get_attribute("download") == "latentd-7.png"
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#recent li"), 30, "the recent jobs list")
    shot(browser, "playground-generated.png")
    # reuse seed puts the seed back into the form
    fill(browser, "seed", "")
    results[0].find_element(By.CSS_SELECTOR, "button.reuse").click()
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "7"


def test_a_bad_value_shows_the_apis_message_beside_the_field(stack, browser):
    from selenium.webdriver.common.by import By

    api = stack["api"]
    browser.get(api.url + "/")
    wait_until(lambda: "model:" in browser.find_element(By.ID, "model-name").text, 30, "the model name")
    fill(browser, "prompt", "a blue square")
    fill(browser, "size", "64x64")
    fill(browser, "steps", "5000")
    browser.find_element(By.ID, "generate").click()
    slot = browser.find_element(By.CSS_SELECTOR, '.err[data-for="steps"]')
    wait_until(lambda: slot.text, 30, "the error beside steps")
    expected = httpx.post(api.url + "/v1/jobs", headers={"Authorization": f"Bearer {ALICE}"},
                          json={"prompt": "a blue square", "size": "64x64", "steps": 5000}).json()
    assert slot.text == expected["error"]["message"] and "steps" in slot.text
    assert browser.find_element(By.ID, "steps").get_attribute("aria-invalid") == "true"
    assert browser.find_element(By.ID, "form-error").text == ""
    shot(browser, "playground-error.png")
    fill(browser, "steps", "6")
    fill(browser, "size", "65x64")
    browser.find_element(By.ID, "generate").click()
    size_slot = browser.find_element(By.CSS_SELECTOR, '.err[data-for="size"]')
    wait_until(lambda: size_slot.text, 30, "the error beside size")
    assert "size" in size_slot.text and slot.text == ""         # the old message is gone


def test_static_files_are_served_with_a_strict_policy(stack):
    api = stack["api"]
    page = httpx.get(api.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<body>")[0].replace("http-equiv", "")   # no CDN
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css"), ("icon.svg", "svg")):
        r = httpx.get(f"{api.url}/playground/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert httpx.get(api.url + "/playground/..%2Fmain.py").status_code == 404
    assert httpx.get(api.url + "/playground/index.py").status_code == 404
