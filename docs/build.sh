#!/usr/bin/env bash
# Build the documentation site — the pages of docs/ and the API reference generated from the docstrings — with
# warnings as errors (a docstring griffe cannot parse, or a `::: name` that does not resolve, fails the build).
#   docs/build.sh [SITE_DIR]      (default: a new temporary folder; needs `pip install -e ".[docs]"`)
set -euo pipefail
cd "$(dirname "$0")/.."
site="${1:-$(mktemp -d "${TMPDIR:-/tmp}/fip_fast_site.XXXXXX")}"
python -m mkdocs build --strict --quiet --config-file mkdocs.yml --site-dir "$site"
echo "docs built: $site/index.html"
