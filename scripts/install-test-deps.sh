#!/usr/bin/env bash
# Debian tools the tests drive (iproute2 for namespaces, iperf3/sockperf for traffic, tmux
# for the live view) and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in ip:iproute2 iperf3:iperf3 sockperf:sockperf tmux:tmux setpriv:util-linux ps:procps wireguard-go:wireguard-go wg:wireguard-tools cc:gcc; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
# Python.h, for the package's optional C loop (mqtun.packet._accel): a python3 without it builds
# the package without the loop, and the tests that check it is built fail
python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || need+=(python3-dev)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
python3 -m pip install -q -e '.[test,bench,docs]'
