#!/usr/bin/env bash
# A/B of two uapk-gateway binaries on the request path: the same nginx upstream, the same manifest
# and load, each gateway on core 0 with one tokio worker (load generator and upstream on core 1),
# the two started and measured alternately, several rounds; prints each round and the medians.
#   bash bench/ab.sh OLD_BIN NEW_BIN [SECONDS] [ROUNDS]
# e.g. the request path before and after a change:
#   git worktree add /tmp/before <rev> && (cd /tmp/before && cargo build --release --bin uapk-gateway)
#   cargo build --release --bin uapk-gateway
#   bash bench/ab.sh /tmp/before/target/release/uapk-gateway target/release/uapk-gateway
# Rows: allowed (explicit proxy, plain HTTP, audit sync and async, wrk -c32), allowed-post (a
# 1 KiB JSON body to a route that reads no params, audit sync and async: the body is read and
# hashed before the decision since limits.hash_before_forward) and denied (no route, audit sync,
# wrk -c32). With audit sync every row waits for an fsync: on a shared disk its rounds vary most. Refusals are recorded one by one in both (a refusal budget far above the
# rates here, where the binary knows limits.refusals_per_agent).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: bash bench/ab.sh OLD_BIN NEW_BIN [SECONDS] [ROUNDS]" >&2; exit 2; }
old=$(realpath "$1"); new=$(realpath "$2"); secs=${3:-6}; rounds=${4:-3}
for c in wrk nginx taskset; do command -v $c >/dev/null || { echo "needs $c" >&2; exit 2; }; done
w=$(mktemp -d); chmod 755 "$w"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$w"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

up=$(port)
mkdir -p "$w/nginx"
cat > "$w/nginx/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $w/nginx/pid; error_log $w/nginx/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000;
  server { listen 127.0.0.1:$up; location / { default_type application/json; return 200 '{"ok":true}'; } } }
NGX
taskset -c 1 nginx -c "$w/nginx/nginx.conf" -p "$w/nginx" & pids+=($!)
wait_port "$up"

mkdir -p "$w/policies"
"$new" keygen --out "$w/issuer.pem" >/dev/null
cat > "$w/policies/bench.yaml" <<YAML
apiVersion: uapk/v1
kind: Manifest
agent: { id: bench-agent }
capability: { issuers: [{ id: bench, public_key_file: $w/issuer.pub.pem }] }
connectors:
  - name: bench
    base_url: http://localhost:$up
    hosts: [localhost, 127.0.0.1]
    ports: [$up]
    routes: [{ methods: [GET], path: /ok, action: bench.read }, { methods: [POST], path: /post, action: bench.write }]
YAML
token=$("$new" token mint --issuer-key "$w/issuer.pem" --iss bench --sub bench-agent --ttl 2h)
printf 'wrk.path = "http://127.0.0.1:%s/ok"\nwrk.headers["Host"] = "127.0.0.1:%s"\nwrk.headers["Proxy-Authorization"] = "Bearer %s"\n' "$up" "$up" "$token" > "$w/allowed.lua"
body=$(python3 -c 'import json; print(json.dumps({"event": "bench", "data": "x" * 990}))')
printf 'wrk.method = "POST"\nwrk.path = "http://127.0.0.1:%s/post"\nwrk.body = %s\nwrk.headers["Host"] = "127.0.0.1:%s"\nwrk.headers["Content-Type"] = "application/json"\nwrk.headers["Proxy-Authorization"] = "Bearer %s"\n' "$up" "$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$body")" "$up" "$token" > "$w/post.lua"
printf 'wrk.path = "/bench/denied"\nwrk.headers["x-uapk-capability"] = "%s"\n' "$token" > "$w/denied.lua"

gwpid=""; gwport=""; gwdir=""
start() { # BIN DURABILITY → sets gwpid, gwport and gwdir
  local bin=$1 d=$2 p a dir
  p=$(port); a=$(port); dir="$w/gw-$RANDOM$RANDOM"; mkdir -p "$dir"
  printf 'listeners: { proxy: 127.0.0.1:%s, admin: 127.0.0.1:%s }\npolicies: %s\ndata_dir: %s/data\naudit: { durability: %s }\nnetwork: { allow_private_destinations: [127.0.0.0/8] }\n' \
    "$p" "$a" "$w/policies" "$dir" "$d" > "$dir/gateway.yaml"
  cp "$dir/gateway.yaml" "$dir/base.yaml"
  printf 'limits: { refusals_per_agent: 4000000000/s, refusals_burst: 4000000000 }\n' >> "$dir/gateway.yaml"
  "$bin" check -c "$dir/gateway.yaml" >/dev/null 2>&1 || cp "$dir/base.yaml" "$dir/gateway.yaml"
  UAPK_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$bin" run -c "$dir/gateway.yaml" 2>"$dir/log" & gwpid=$!
  pids+=("$gwpid")
  wait_port "$p"
  gwport=$p; gwdir=$dir
}
rate() { # URL LUA → req/s
  taskset -c 1 wrk -t1 -c32 -d"${secs}s" -s "$2" "$1" | awk '/Requests\/sec/ {printf "%.0f", $2}'
}
declare -A runs
for r in $(seq "$rounds"); do
  for which in old new; do
    bin=${!which}
    for d in sync async; do
      start "$bin" "$d"; p=$gwport
      taskset -c 1 wrk -t1 -c32 -d1s -s "$w/allowed.lua" "http://127.0.0.1:$p" >/dev/null # warm-up
      runs[$which-allowed-$d]+="$(rate "http://127.0.0.1:$p" "$w/allowed.lua") "
      runs[$which-allowed-post-$d]+="$(rate "http://127.0.0.1:$p" "$w/post.lua") "
      if [ "$d" = sync ]; then runs[$which-denied-$d]+="$(rate "http://127.0.0.1:$p" "$w/denied.lua") "; fi
      kill -TERM "$gwpid"; wait "$gwpid" 2>/dev/null || true
      rm -rf "$gwdir" # each run's log (tens of MB with audit sync) would otherwise fill the disk
    done
  done
  echo "round $r done" >&2
done
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.0f}")' "$@"; }
echo "| row | old req/s (rounds) | new req/s (rounds) | new / old |"
echo "|---|---|---|---|"
for row in allowed-sync allowed-async allowed-post-sync allowed-post-async denied-sync; do
  o=$(median ${runs[old-$row]}); n=$(median ${runs[new-$row]})
  echo "| $row | $o (${runs[old-$row]% }) | $n (${runs[new-$row]% }) | $(python3 -c "print(f'{$n/$o:.2f}')") |"
done
