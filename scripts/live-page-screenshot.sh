#!/usr/bin/env bash
# Makes the screenshot of the live page in the docs (docs/live-page.png) from a real run: the
# server with a 1 GiB memory export and a policy that fails writes to 384..448 MiB once armed,
# fio writing and reading through its nbd engine, headless Chromium pressing the arm button,
# pinning a failed write and saving the page (scripts/lib/live_page_screenshot.py says what
# exactly). About 35 s. Installs what it needs; Debian 12.
#
#   bash scripts/live-page-screenshot.sh [OUTPUT.png]      # default docs/live-page.png
#   NBDFAULT_BIN=/path/to/nbdfault bash scripts/live-page-screenshot.sh   # another build
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/lib/packages.sh
source "$repo/scripts/lib/packages.sh"
install_packages fio python3 chromium chromium-driver python3-selenium

output=${1:-$repo/docs/live-page.png}
# shellcheck source=scripts/lib/nbdfault-bin.sh
source "$repo/scripts/lib/nbdfault-bin.sh"
nbdfault_binary
# Debian's python3, which has the Debian Selenium module (a pyenv or venv python3 may not).
/usr/bin/python3 "$repo/scripts/lib/live_page_screenshot.py" "$nbdfault" "$output"
