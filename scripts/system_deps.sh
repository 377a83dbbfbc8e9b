#!/usr/bin/env bash
# Installs the Debian packages some tests use, where missing: Fashion-MNIST's IDX files and
# headless Chromium with its driver (for the HTML report test). Best effort: without root or apt
# the tests that need them are skipped with a reason.
set -u
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system_deps: missing ${need[*]} and cannot apt-get install them; tests that need them skip"
  exit 0
fi
echo "system_deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "system_deps: apt-get install ${need[*]} failed; tests that need them skip"
exit 0
