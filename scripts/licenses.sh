#!/usr/bin/env bash
# Write the licences of what iotref ships (the device library and the sandbox extra, not the
# development tools) to docs/licenses.md.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=$(.tools/bin/uv export --frozen --no-dev --all-extras --no-hashes --no-emit-project \
  --format requirements-txt | grep -E '^[A-Za-z0-9]' | sed -E 's/[=<>; ].*//' | sort -u)
{
  echo "# Dependency licences"
  echo
  echo "What iotref ships with: the device library's dependencies and the sandbox extra's,"
  echo "as locked in \`uv.lock\`. Written by \`make licenses\`; do not edit by hand."
  echo
  # shellcheck disable=SC2086
  .venv/bin/pip-licenses --format=markdown --with-urls --order=name --packages $packages
} > docs/licenses.md
echo "wrote docs/licenses.md ($(echo "$packages" | wc -l) packages)"
