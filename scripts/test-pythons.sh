#!/usr/bin/env bash
# Run the unit tests under every supported Python found on this machine.
#   scripts/test-pythons.sh [VERSION...]     default: 3.10 3.11 3.12 3.13
# For each version other than the one of .venv (where `make test` runs the whole suite), an
# interpreter is looked for as python3.X on PATH and under pyenv's versions folder; a missing
# one is skipped with a note. A found one gets its own environment, .venv-3.X, built from
# uv.lock with the same extras as .venv (no interpreter is ever downloaded), and runs
# `pytest tests/unit`. Exits non-zero if any of these runs failed.
set -euo pipefail
cd "$(dirname "$0")/.."

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.10 3.11 3.12 3.13)

# The X.Y of an interpreter, or nothing when it does not run (e.g. a pyenv shim for a
# version that is installed but not selected).
minor_of() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true
}

find_python() {
  local version=$1 candidate
  local candidates=()
  while IFS= read -r candidate; do candidates+=("$candidate"); done \
    < <(type -ap "python$version" 2>/dev/null || true)
  # Newest patch release first.
  while IFS= read -r candidate; do candidates+=("$candidate"); done \
    < <(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".*/bin/"python$version" \
          2>/dev/null | sort -rV || true)
  for candidate in "${candidates[@]}"; do
    if [ -x "$candidate" ] && [ "$(minor_of "$candidate")" = "$version" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

main_version=$(minor_of .venv/bin/python)
failed=()
for version in "${versions[@]}"; do
  if [ "$version" = "$main_version" ]; then
    echo "test-pythons: Python $version: .venv runs the whole suite"
    continue
  fi
  if ! python=$(find_python "$version"); then
    echo "test-pythons: Python $version not found (python$version on PATH or pyenv); skipped"
    continue
  fi
  echo "test-pythons: Python $version ($python): unit tests in .venv-$version"
  UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=".venv-$version" \
    .tools/bin/uv sync --frozen --all-extras --quiet --python "$python"
  start=$SECONDS
  if ".venv-$version/bin/python" -m pytest tests/unit -q -p no:cacheprovider; then
    echo "test-pythons: Python $version: passed in $((SECONDS - start)) s"
  else
    echo "test-pythons: Python $version: FAILED"
    failed+=("$version")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "test-pythons: unit tests failed under Python ${failed[*]}" >&2
  exit 1
fi
