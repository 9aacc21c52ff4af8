#!/usr/bin/env bash
# Licences, bans and sources of the dependency tree (see deny.toml). Advisories are skipped:
# the RustSec database is fetched from the network, which this workplace does not reach.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
# cargo-deny reads the whole graph (every target platform), so fetch every crate first; the
# check itself then runs offline.
cargo fetch --locked --quiet
cargo deny --offline check --hide-inclusion-graph bans licenses sources
echo "deny: 1 passed, 0 failed"
