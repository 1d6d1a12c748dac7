#!/usr/bin/env python3
"""Makes docs/live-page.png: the live page of a real server while fio writes and reads through
fio's nbd engine, with a failing range armed from the page's own button.

    live_page_screenshot.py NBDFAULT_BINARY OUTPUT.png

What it runs (about 40 s):
  * `nbdfault serve` with a 1 GiB memory export and the policy below, installed through the
    control API (`PUT /v1/exports/disk/policy`, as a test would): writes to 384..448 MiB
    fail with EIO once the trigger `bad-range` is armed; a fifth of the reads of 640..768 MiB wait
    50 to 200 ms (drawn orange while they wait);
  * fio, three jobs, rate-limited so the map stays readable: random 16 KiB writes over the whole
    disk (25 a second), random 64 KiB reads (15 a second), and a sequential 16 KiB "journal"
    writer in 64..96 MiB (40 a second);
  * headless Chromium (Selenium) on http://CONTROL/?export=disk: after 12 s it presses the arm
    button of `bad-range`; 20 s later (the map's 30 s then full) it pins the newest failed write
    (its request shown beside it), pauses the map and saves the screenshot.
Fails (exit status 1, with the reason) when the page shows no failed write or no fault.
"""
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

POLICY = """\
seed: 7
rules:
  - name: fail-bad-range
    when: { op: [write, write_zeroes], range: 384MiB..448MiB, armed_by: bad-range }
    then: { error: EIO, delay: 2ms }
  - name: slow-reads
    when: { op: read, range: 640MiB..768MiB, probability: 20% }
    then: { delay: 50ms..200ms }
"""

FIO_SECONDS = 40


def wait(what, check, timeout=30):
    deadline = time.time() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.time() > deadline:
            raise SystemExit(f"live_page_screenshot.py: the page did not show {what} within {timeout} s")
        time.sleep(0.1)


def start_server(binary):
    server = subprocess.Popen(
        [binary, "serve", "-q", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
         "--export", "disk=memory:1GiB"],
        stdout=subprocess.PIPE, text=True)
    ready = json.loads(server.stdout.readline() or "{}")
    if ready.get("event") != "ready":
        server.kill()
        raise SystemExit("live_page_screenshot.py: the server did not start")
    control = ready["control"]
    request = urllib.request.Request(f"http://{control}/v1/exports/disk/policy", data=POLICY.encode(), method="PUT")
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()
    return server, ready["nbd"][0], control


def start_fio(nbd, workdir):
    uri = f"nbd://{nbd}/disk"
    common = ["--ioengine=nbd", f"--uri={uri}", "--size=1G", "--time_based", f"--runtime={FIO_SECONDS}",
              "--continue_on_error=all", "--randrepeat=0"]
    jobs = [
        # Fixed block sizes: with a range, fio's rate_iops counts the smallest size.
        ("random-writes", ["--rw=randwrite", "--bs=16k", "--rate_iops=25", "--iodepth=4"]),
        ("random-reads", ["--rw=randread", "--bs=64k", "--rate_iops=15", "--iodepth=4"]),
        ("journal", ["--rw=write", "--bs=16k", "--offset=64m", "--size=32m", "--rate_iops=40"]),
    ]
    args = ["fio", f"--output={workdir}/fio.txt"]
    for name, options in jobs:
        # The job's own options last: they win over the common ones (the journal's --size).
        args += [f"--name={name}"] + common + options
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def chromium(workdir):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1060", "--hide-scrollbars",
                 f"--user-data-dir={workdir}/chromium"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main():
    binary, output = sys.argv[1], sys.argv[2]
    workdir = tempfile.mkdtemp(prefix="nbdfault-screenshot-")
    server, nbd, control = start_server(binary)
    fio = driver = None
    try:
        driver = chromium(workdir)
        driver.get(f"http://{control}/?export=disk")
        wait("the live stream", lambda: driver.find_element(By.ID, "status").text == "live")
        fio = start_fio(nbd, workdir)
        time.sleep(12)
        wait("the arm button of bad-range",
             lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-trigger='bad-range'] button.arm"))[0].click()
        wait("bad-range armed", lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-trigger='bad-range'] td.armed"))
        time.sleep(20)
        wait("a fault in the table", lambda: driver.find_elements(By.CSS_SELECTOR, "#faults tbody tr"))
        driver.find_element(By.ID, "pause").click()
        # Pin the newest failed write that is well inside the map, so its request stays shown.
        point = wait("a failed write on the map", lambda: driver.execute_script("""
            const page = window.nbdfaultPage, alerts = page.state.alerts;
            for (let i = alerts.length - 1; i >= 0; i--) {
                if (!alerts[i].failed) continue;
                const p = page.pointOf(alerts[i].offset);
                if (p && p.x > 200 && p.x < document.getElementById('map').clientWidth - 300) return p;
            }
            return null;
        """))
        canvas = driver.find_element(By.ID, "map")
        ActionChains(driver).move_to_element_with_offset(
            canvas, int(point["x"] - canvas.size["width"] / 2), int(point["y"] - canvas.size["height"] / 2)) \
            .click().perform()
        detail = wait("the pinned request", lambda: driver.find_element(By.ID, "detail").text)
        if "EIO" not in detail:
            raise SystemExit(f"live_page_screenshot.py: the pinned mark is not a failed write: {detail!r}")
        # Move the pointer off the map, so only the pin shows.
        ActionChains(driver).move_to_element(driver.find_element(By.TAG_NAME, "h1")).perform()
        time.sleep(1)
        driver.save_screenshot(output)
        print(f"live_page_screenshot.py: {output}; pinned: {detail!r}")
    finally:
        if driver:
            driver.quit()
        if fio:
            fio.kill()
            fio.wait()
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
