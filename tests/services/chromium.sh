#!/bin/sh
# Debian's Chromium for the browser tests (Playwright's own browser download does not work here).
# Idempotent: does nothing when /usr/bin/chromium is already there. Needs root (CI runs as root).
set -eu
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "chromium.sh: /usr/bin/chromium is missing; run as root or: apt-get install chromium" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
