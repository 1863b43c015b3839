#!/usr/bin/env bash
# Renders a kiln report in headless Chromium (Debian's `chromium` package) and saves a PNG to
# look at: tools/report/screenshot.sh report.html [out.png]
set -euo pipefail
html=$(realpath "$1")
out=${2:-${html%.html}.png}
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
# The flags keep Chromium off the network this machine does not have.
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --window-size=1100,1900 --screenshot="$out" "file://$html" 2>/dev/null
test -s "$out"
echo "wrote $out"
