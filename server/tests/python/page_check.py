#!/usr/bin/env python3
"""Drives nbdfault's live page in headless Chromium (Selenium, chromedriver) while qemu-io writes
to the server, and checks what a person would see: the failed write drawn in red where it is on the
disk (and none where the writes succeeded), the offset axis labelled in MiB for a 16 MiB export
(KiB once zoomed in), time labels in seconds, the failed write's request shown when pointed at, the
trigger armed by the page's own button changing what the server does, the policy's hit counts, the
fault in the table. Also what other pages may not do: a page of another origin cannot arm the
trigger (CSRF), a page under another name cannot read the API (DNS rebinding). Saves a screenshot.

    page_check.py page PAGE_URL NBD_URI SCREENSHOT
    page_check.py other-pages CONTROL

The export has 16 MiB and the rule `fail-armed` fails writes to 1MiB..2MiB while `go` is armed.
With `other-pages`, CONTROL (HOST:PORT) is the control API of a server without a token (a token
alone keeps other pages out), where pages of another origin or name try to arm `go`.
"""
import functools
import http.server
import subprocess
import sys
import tempfile
import threading
import time
import json
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By

FAILING = 1 << 20


def qemu_io(nbd_uri, command):
    out = subprocess.run(["qemu-io", "-f", "raw", nbd_uri, "-c", command],
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def wait(what, check, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            value = check()
        except StaleElementReferenceException:
            # The page rebuilt the table between finding a cell and reading it: look again.
            value = None
        if value:
            return value
        if time.time() > deadline:
            raise SystemExit(f"the page did not show {what} within {timeout} s")
        time.sleep(0.1)


def red_pixels(driver, offset):
    """Red pixels of the disk map in the band where `offset` is drawn."""
    return driver.execute_script("""
        const canvas = document.getElementById('map');
        const y = window.nbdfaultPage.yOf(arguments[0]);
        const top = Math.max(0, y - 3), rows = 10;
        const data = canvas.getContext('2d').getImageData(0, top, canvas.width, rows).data;
        let red = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (data[i] > 200 && data[i + 1] < 80 && data[i + 2] < 80) red++;
        }
        return red;
    """, offset)


def other_origin():
    """A web server on another port of 127.0.0.1 (same site, another origin) with an empty page."""
    root = tempfile.mkdtemp(prefix="nbdfault-other-origin-")
    with open(f"{root}/index.html", "w") as page:
        page.write("<!doctype html><title>another origin</title>")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def check_other_pages(driver, control):
    """A page of another origin fires a simple POST at the API, as any site could: the server must
    refuse it (the trigger stays disarmed). A page reached under a name that resolves to 127.0.0.1
    (Chromium's --host-resolver-rules stands in for rebinding DNS) gets no answer but the refusal."""
    server, url = other_origin()
    try:
        driver.get(url)
        status = driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch(arguments[0], { method: "POST", mode: "no-cors" }).then((r) => done(r.type), (e) => done(String(e)));
        """, f"http://{control}/v1/exports/disk/triggers/go")
        if status != "opaque":
            raise SystemExit(f"the cross-origin POST did not reach the server: {status}")
    finally:
        server.shutdown()
    with urllib.request.urlopen(f"http://{control}/v1/exports/disk") as answer:
        armed = [trigger for trigger in json.load(answer)["triggers"] if trigger["armed"]]
    if armed:
        raise SystemExit(f"a POST from another origin armed {armed}")
    port = control.rsplit(":", 1)[1]
    driver.get(f"http://rebinding.test:{port}/v1/exports")
    body = driver.find_element(By.TAG_NAME, "body").text
    if "DNS rebinding" not in body:
        raise SystemExit(f"the API answered a page under a foreign name: {body[:300]}")


def chromium():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="nbdfault-chromium-")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1400", f"--user-data-dir={profile}",
                 "--host-resolver-rules=MAP rebinding.test 127.0.0.1"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def check_page(driver, page, nbd_uri, screenshot):
    driver.get(page)
    wait("the live stream", lambda: driver.find_element(By.ID, "status").text == "live")
    wait("the rule fail-armed", lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-rule='fail-armed']"))

    labels = wait("axis labels", lambda: driver.execute_script("return window.nbdfaultPage.labels()")["times"] and
                  driver.execute_script("return window.nbdfaultPage.labels()"))
    offsets = labels["offsets"]
    if offsets[0] != "0" or "16 MiB" not in offsets or "8 MiB" not in offsets \
            or not all(label.endswith(" MiB") for label in offsets[1:]):
        raise SystemExit(f"the offset axis of a 16 MiB export is not labelled in MiB: {offsets}")
    if not labels["times"] or not all(label.endswith(" s") for label in labels["times"]):
        raise SystemExit(f"the time axis is not labelled in seconds: {labels['times']}")

    # Not armed yet: writes anywhere succeed.
    for command in ["write -P 1 0 64k", f"write -P 1 {FAILING} 4k"]:
        out = qemu_io(nbd_uri, command)
        if "failed" in out:
            raise SystemExit(f"{command} failed before the trigger was armed: {out}")

    # Arm with the page's button; the server now fails writes to the range.
    button = wait("the arm button of go",
                  lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-trigger='go'] button.arm"))
    button[0].click()
    wait("go armed", lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-trigger='go'] td.armed"))
    out = qemu_io(nbd_uri, f"write -P 2 {FAILING} 4k")
    if "Input/output error" not in out:
        raise SystemExit(f"the write into the failing range did not fail after arming from the page: {out}")

    wait("the fault in the table",
         lambda: driver.find_elements(By.CSS_SELECTOR, f"#faults tr[data-offset='{FAILING}']"))
    fired = wait("fired = 1 for fail-armed", lambda: driver.find_element(
        By.CSS_SELECTOR, "tr[data-rule='fail-armed'] td.fired").text == "1")
    assert fired
    occurrences = wait("occurrences of fail-armed", lambda: driver.find_element(
        By.CSS_SELECTOR, "tr[data-rule='fail-armed'] td.occurrences").text)
    if occurrences != "1":
        raise SystemExit(f"occurrences shows {occurrences}, expected 1 (only the armed write meets the rule)")
    red = wait("a red mark at 1 MiB", lambda: red_pixels(driver, FAILING))
    if red_pixels(driver, 0) != 0:
        raise SystemExit("red drawn at offset 0, where every write succeeded")

    # Pointing at the red mark shows its request.
    driver.find_element(By.ID, "pause").click()
    canvas = driver.find_element(By.ID, "map")
    point = driver.execute_script("return window.nbdfaultPage.pointOf(arguments[0])", FAILING)
    ActionChains(driver).move_to_element_with_offset(
        canvas, int(point["x"] - canvas.size["width"] / 2), int(point["y"] - canvas.size["height"] / 2)).perform()
    detail = wait("the request of the red mark", lambda: driver.find_element(By.ID, "detail").text)
    for expected in ["write 4 KiB at 1 MiB", "offset 1048576, length 4096", "error EIO", "rule fail-armed, outcome error"]:
        if expected not in detail:
            raise SystemExit(f"pointing at the red mark shows {detail!r}, without {expected!r}")
    hovered = detail
    # Zoom: drag from 512 KiB to 2.5 MiB; the axis then counts in KiB and the mark is still there.
    top = driver.execute_script("return window.nbdfaultPage.yOf(arguments[0])", 512 << 10)
    bottom = driver.execute_script("return window.nbdfaultPage.yOf(arguments[0])", 5 << 19)
    x = int(point["x"] - canvas.size["width"] / 2) - 40
    ActionChains(driver).move_to_element_with_offset(canvas, x, int(top - canvas.size["height"] / 2)) \
        .click_and_hold().move_by_offset(0, bottom - top).release().perform()
    shown = wait("the zoomed range", lambda: driver.find_element(By.ID, "range").text)
    view = driver.execute_script("return window.nbdfaultPage.state.view")
    # A pixel of the map is 40 KiB of this disk: the drag lands within a few.
    if not shown.startswith("offsets ") or abs(view[0] - (512 << 10)) > 160 << 10 \
            or abs(view[1] - (5 << 19)) > 160 << 10:
        raise SystemExit(f"dragging from 512 KiB to 2.5 MiB shows {shown!r} ({view})")
    offsets = wait("KiB labels", lambda: [label for label in
                                          driver.execute_script("return window.nbdfaultPage.labels()")["offsets"]
                                          if label.endswith("KiB")])
    if not red_pixels(driver, FAILING):
        raise SystemExit("the red mark is gone after zooming in")
    ActionChains(driver).double_click(canvas).perform()
    wait("the whole disk again", lambda: driver.find_element(By.ID, "range").text == "")
    driver.find_element(By.ID, "pause").click()
    time.sleep(0.5)
    driver.save_screenshot(screenshot)
    print(f"ok: axis {labels['offsets']} and {labels['times']}; red mark at "
          f"1 MiB ({red} px), none at 0; pointed at: {hovered!r}; zoomed to KiB {offsets}; armed from the page; "
          f"fired 1; screenshot {screenshot}")


def main():
    driver = chromium()
    try:
        if sys.argv[1] == "page":
            check_page(driver, *sys.argv[2:5])
        else:
            check_other_pages(driver, sys.argv[2])
            print("ok: a simple POST from another origin was refused, the API refused a foreign Host")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
