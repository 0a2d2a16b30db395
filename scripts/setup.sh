#!/usr/bin/env bash
# Prepare this checkout: system packages, then the virtual environment from uv.lock.
#   scripts/setup.sh            Mosquitto and the Python environment
#   scripts/setup.sh --browser  also Chromium and the pinned Mermaid (npm ci into
#                               tests/mermaid/node_modules), for the browser tests
# As root, missing system packages are installed with apt-get; otherwise the exact
# command is printed and the script stops with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
want_browser=0
for arg in "$@"; do
  case "$arg" in
    --browser) want_browser=1 ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done

if ! command -v python3 >/dev/null 2>&1; then
  echo "setup: python3 is missing; install Python 3.10 or newer" >&2; exit 1
fi
if ! python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "setup: Python 3.10 or newer is needed, found $(python3 --version 2>&1)" >&2; exit 1
fi

packages=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || packages+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || packages+=(mosquitto-clients)
if [ "$want_browser" = 1 ]; then
  [ -x /usr/bin/chromium ] || packages+=(chromium)
  command -v npm >/dev/null 2>&1 || packages+=(npm)
fi
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || packages+=(python3-venv)

if [ ${#packages[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${packages[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
    # Debian starts a system-wide broker on install where it can; the sandbox runs its own.
    if command -v service >/dev/null 2>&1; then service mosquitto stop >/dev/null 2>&1 || true; fi
  else
    echo "setup: missing system packages: ${packages[*]}" >&2
    echo "setup: install them with:  sudo apt-get install -y ${packages[*]}" >&2
    exit 1
  fi
fi

if [ ! -x .tools/bin/uv ] || [ "$(.tools/bin/uv --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  rm -rf .tools
  python3 -m venv .tools
  .tools/bin/pip install --quiet "uv==$UV_VERSION"
fi
UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=.venv \
  .tools/bin/uv sync --frozen --all-extras --quiet --python "$(command -v python3)"

# The docs test renders every Mermaid diagram with the exact version in package-lock.json;
# npm ci runs again only when the lock file changed since the last install.
if [ "$want_browser" = 1 ]; then
  stamp=tests/mermaid/node_modules/.installed-package-lock.json
  if ! cmp -s tests/mermaid/package-lock.json "$stamp"; then
    (cd tests/mermaid && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
    cp tests/mermaid/package-lock.json "$stamp"
  fi
fi
