#!/usr/bin/env bash
# Runs every fuzz target briefly (CI smoke). Longer, by hand:
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/corpus/<target> -- -max_total_time=3600
# Targets: manifest, token, authority_and_path, audit_parsers, client_hello, usage (the token
# usage reader), mcp (the MCP JSON-RPC classifier), params (form and query param readers).
# Seeds live in fuzz/corpus/<target>/ (libFuzzer adds what it finds there; commit interesting
# ones, a few dozen at most). fuzz/Cargo.lock is checked to be current: after changing the
# gateway's dependencies, run `cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml`
# (it resolves the lock again, keeping the versions already locked) and commit fuzz/Cargo.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-15}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly-only flags; this stable toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
targets=(manifest token authority_and_path audit_parsers client_hello usage mcp params)
# cargo-fuzz takes no --locked: check the lock first, so the build below cannot rewrite it.
cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null ||
  { echo "fuzz/Cargo.lock is out of date with the gateway's dependencies (see the top of $0)"; exit 1; }
cargo fuzz build -O
pass=0; fail=0
for t in "${targets[@]}"; do
  work=$(mktemp -d)
  cp -r "fuzz/corpus/$t/." "$work/"
  if cargo fuzz run -O "$t" "$work" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$work.log" 2>&1; then
    pass=$((pass + 1)); echo "ok   $t: $(grep -Eo 'Done [0-9]+ runs' "$work.log" | tail -1)"
  else
    fail=$((fail + 1)); echo "FAIL $t"; tail -30 "$work.log"
  fi
  rm -rf "$work" "$work.log"
done
echo "fuzz-smoke: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
