#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine, then runs the whole suite.
# It is the README's test command and what CI runs (.ci/run), so a green CI means this works from a clean clone.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's Chromium drives the web page test (a browser download cannot work here); g++ builds DeepSpeed's CPU op;
# Debian's Prometheus scrapes a cluster in the dashboard test.
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v g++ >/dev/null || need+=(g++)
command -v prometheus >/dev/null || need+=(prometheus)  # the dashboard test scrapes a cluster with it
if ((${#need[@]})); then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -q && $SUDO apt-get install -y -q "${need[@]}"
fi

python3 -m venv .venv
. .venv/bin/activate
# The CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
pip install -q --upgrade pip
pip install -q torch==2.13.0 -e ".[dev]"
python -m pytest "$@"
