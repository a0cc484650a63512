#!/usr/bin/env bash
# Render a medcl HTML report in headless Chromium and save a full-height PNG screenshot,
# to check how the report looks without a desktop.
#
#   scripts/screenshot_report.sh report.html [out.png] [width] [height]
#
# Needs chromium (Debian/Ubuntu: apt-get install -y chromium). The browser runs with a throwaway
# profile and every network feature off: the report is self-contained and must render offline.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 REPORT.html [OUT.png] [WIDTH] [HEIGHT]" >&2
    exit 2
fi
report="$(realpath "$1")"
out="$(realpath -m "${2:-${report%.html}.png}")"
width="${3:-1400}"
height="${4:-3000}"
[[ -f "$report" ]] || { echo "report not found: $report" >&2; exit 2; }

browser=""
for candidate in chromium chromium-browser google-chrome; do
    if command -v "$candidate" >/dev/null 2>&1; then browser="$candidate"; break; fi
done
[[ -n "$browser" ]] || { echo "no chromium found: apt-get install -y chromium" >&2; exit 2; }

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out" --window-size="${width},${height}" "file://$report" >/dev/null 2>&1
[[ -s "$out" ]] || { echo "no screenshot written to $out" >&2; exit 1; }
echo "$out"
