#!/usr/bin/env python3
"""Drives nbdfault's live page in headless Chromium (Selenium, chromedriver) while qemu-io writes
to the server, and checks what a person would see: the failed write drawn in red where it is on the
disk (and none where the writes succeeded), the trigger armed by the page's own button changing
what the server does, the policy's hit counts, the fault in the table. Saves a screenshot.

    page_check.py PAGE_URL NBD_URI SCREENSHOT

The export has 16 MiB and the rule `fail-armed` fails writes to 1MiB..2MiB while `go` is armed.
"""
import subprocess
import sys
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

PAGE, NBD_URI, SCREENSHOT = sys.argv[1:4]
FAILING = 1 << 20


def qemu_io(command):
    out = subprocess.run(["qemu-io", "-f", "raw", NBD_URI, "-c", command],
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def wait(what, check, timeout=30):
    deadline = time.time() + timeout
    while True:
        value = check()
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


def main():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="nbdfault-chromium-")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,1400", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(PAGE)
        wait("the live stream", lambda: driver.find_element(By.ID, "status").text == "live")
        wait("the rule fail-armed", lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-rule='fail-armed']"))

        # Not armed yet: writes anywhere succeed.
        for command in ["write -P 1 0 64k", f"write -P 1 {FAILING} 4k"]:
            out = qemu_io(command)
            if "failed" in out:
                raise SystemExit(f"{command} failed before the trigger was armed: {out}")

        # Arm with the page's button; the server now fails writes to the range.
        button = wait("the arm button of go",
                      lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-trigger='go'] button.arm"))
        button[0].click()
        wait("go armed", lambda: driver.find_elements(By.CSS_SELECTOR, "tr[data-trigger='go'] td.armed"))
        out = qemu_io(f"write -P 2 {FAILING} 4k")
        if "Input/output error" not in out:
            raise SystemExit(f"the write into the failing range did not fail after arming from the page: {out}")

        wait("the fault in the table",
             lambda: driver.find_elements(By.CSS_SELECTOR, f"#faults tr[data-offset='{FAILING}']"))
        fired = wait("fired = 1 for fail-armed", lambda: driver.find_element(
            By.CSS_SELECTOR, "tr[data-rule='fail-armed'] td.fired").text == "1")
        assert fired
        occurrences = driver.find_element(By.CSS_SELECTOR, "tr[data-rule='fail-armed'] td.occurrences").text
        if occurrences != "1":
            raise SystemExit(f"occurrences shows {occurrences}, expected 1 (only the armed write meets the rule)")
        red = wait("a red mark at 1 MiB", lambda: red_pixels(driver, FAILING))
        if red_pixels(driver, 0) != 0:
            raise SystemExit("red drawn at offset 0, where every write succeeded")
        time.sleep(0.5)
        driver.save_screenshot(SCREENSHOT)
        print(f"ok: red mark at 1 MiB ({red} px), none at 0; armed from the page; fired 1; screenshot {SCREENSHOT}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
