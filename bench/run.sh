#!/usr/bin/env bash
# Side-by-side benchmark on one machine, one run: the same upstream (nginx on loopback), the same
# load generators and the same core budget for every proxy. Every proxy of a class runs at once;
# the throughput runs go round-robin over them, several rounds, and each system's rate is the
# median of its rounds (a slow moment of the machine then hits every system alike). Prints a
# Markdown table (req/s, p50/p99 latency, peak RSS, ratios) and writes bench/results.md.
#   bash bench/run.sh            # 10 s per run, 3 rounds
#   bash bench/run.sh --quick    # 2 s per run, 1 round (CI smoke)
# CPU split on 2 cores: the proxy under test on core 0; load generator and upstream on core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
# Proxies and load generators hold many sockets: use the whole open-file allowance.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
root=$PWD
secs=10; rounds=3; [ "${1:-}" = "--quick" ] && secs=2 && rounds=1
need=()
for c in wrk nginx squid mitmdump hey taskset openssl; do command -v $c >/dev/null || need+=($c); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx-light squid mitmproxy hey util-linux openssl >/dev/null
fi
cargo build --release --quiet --bin uapk-gateway --example loadgen --example audit-append
bin=$root/target/release/uapk-gateway
lg=$root/target/release/examples/loadgen
w=$(mktemp -d); chmod 755 "$w"
pids=()
pg_stop=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ ${#pg_stop[@]} -gt 0 ] && "${pg_stop[@]}" >/dev/null 2>&1; rm -rf "$w"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }
hwm() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

# Certificates: a test CA, a cert for localhost used by the upstream and by nginx's TLS front.
(cd "$w"
 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null
 openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout up.key -out up.csr -subj /CN=localhost 2>/dev/null
 printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > ext
 openssl x509 -req -in up.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out up.pem -days 2 -extfile ext 2>/dev/null)

up=$(port); ups=$(port)
mkdir -p "$w/nginx-up"
cat > "$w/nginx-up/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $w/nginx-up/pid; error_log $w/nginx-up/error.log;
events { worker_connections 4096; }
http {
  access_log $w/nginx-up/access.log; keepalive_requests 100000;
  server { listen 127.0.0.1:$up; location / { default_type application/json; return 200 '{"ok":true}'; } }
  server { listen 127.0.0.1:$ups ssl; ssl_certificate $w/up.pem; ssl_certificate_key $w/up.key;
           location / { default_type application/json; return 200 '{"ok":true}'; } }
}
NGX
taskset -c 1 nginx -c "$w/nginx-up/nginx.conf" -p "$w/nginx-up" & pids+=($!)
wait_port "$up"; wait_port "$ups"

rows=()
declare -A rps p50 p99 rss runs
median() { python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.0f}")' "$@"; }
# wrk_tput NAME URL [lua] → one throughput run (c=32), appended to runs[NAME]
wrk_tput() {
  local name=$1 url=$2 lua=${3:-}
  local out; out=$(taskset -c 1 wrk -t1 -c32 -d"${secs}s" ${lua:+-s "$lua"} "$url")
  if grep -q "Non-2xx" <<<"$out" && [ "$name" != uapk-denied ]; then echo "warning: $name: non-2xx answers" >&2; fi
  runs[$name]+="$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out") "
}
# wrk_lat NAME URL [lua] → p50/p99 at c=4
wrk_lat() {
  local name=$1 url=$2 lua=${3:-}
  local lat; lat=$(taskset -c 1 wrk -t1 -c4 -d"${secs}s" --latency ${lua:+-s "$lua"} "$url")
  p50[$name]=$(awk '$1=="50%" {print $2}' <<<"$lat"); p99[$name]=$(awk '$1=="99%" {print $2}' <<<"$lat")
}
# HTTPS class, driven by bench/loadgen.rs (it can CONNECT through a proxy and then send the
# target's name as SNI, as real clients do). lg_tput NAME URL CA [proxy]; lg_lat likewise.
# Errors and non-2xx answers make a row meaningless: it then says so instead of showing a rate.
lg_ok() { grep -q 'errors: 0, non-2xx: 0' <<<"$2" || { echo "warning: $1: $(grep -m1 -E 'first error|errors:' <<<"$2")" >&2; failed[$1]=1; }; }
declare -A failed
lg_tput() {
  local name=$1 url=$2 ca=$3 proxy=${4:-}
  local out; out=$(taskset -c 1 "$lg" --url "$url" --cacert "$ca" ${proxy:+--proxy "$proxy"} -c 32 -d "$secs")
  lg_ok "$name" "$out"
  runs[$name]+="$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out") "
}
lg_lat() {
  local name=$1 url=$2 ca=$3 proxy=${4:-}
  local lat; lat=$(taskset -c 1 "$lg" --url "$url" --cacert "$ca" ${proxy:+--proxy "$proxy"} -c 4 -d "$secs")
  lg_ok "$name" "$lat"
  p50[$name]=$(awk '$1=="50%:" {print $2}' <<<"$lat"); p99[$name]=$(awk '$1=="99%:" {print $2}' <<<"$lat")
}
# finish NAME → rps[NAME] = median of its rounds (or "errors")
finish() {
  if [ -n "${failed[$1]:-}" ]; then rps[$1]="errors"; p50[$1]="-"; p99[$1]="-"; else rps[$1]=$(median ${runs[$1]}); fi
}
add() { rows+=("$1|$2|${rps[$1]}|${runs[$1]% }|${p50[$1]}|${p99[$1]}|${rss[$1]:--}"); }

# Plain-HTTP class: direct (the floor), nginx as a reverse proxy, squid as an allowlisting forward
# proxy, uapk-gateway as an explicit proxy with sync and with async audit, and denied requests.
np=$(port); mkdir -p "$w/nginx-rp"
cat > "$w/nginx-rp/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $w/nginx-rp/pid; error_log $w/nginx-rp/error.log;
events { worker_connections 4096; }
http { access_log off; upstream u { server 127.0.0.1:$up; keepalive 64; }
  server { listen 127.0.0.1:$np; location / { proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGX
taskset -c 0 nginx -c "$w/nginx-rp/nginx.conf" -p "$w/nginx-rp" & nginx_rp=$!; pids+=($nginx_rp); wait_port "$np"

sp=$(port); mkdir -p "$w/squid"
cat > "$w/squid/squid.conf" <<SQ
http_port 127.0.0.1:$sp
acl allowed dstdomain localhost
http_access allow allowed
http_access deny all
cache deny all
access_log none
cache_log $w/squid/cache.log
pid_filename $w/squid/pid
coredump_dir $w/squid
workers 1
shutdown_lifetime 1 seconds
SQ
taskset -c 0 squid -N -f "$w/squid/squid.conf" & squid=$!; pids+=($squid); wait_port "$sp"
printf 'wrk.path = "http://localhost:%s/ok"\nwrk.headers["Host"] = "localhost:%s"\n' "$up" "$up" > "$w/squid.lua"

# uapk-gateway: one instance per durability mode, both up for the whole run (an idle one costs
# nothing), each on core 0 with one tokio worker.
mkdir -p "$w/policies"
"$bin" keygen --out "$w/issuer.pem" >/dev/null
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
    routes: [{ methods: [GET], path: /ok, action: bench.read }]
  - name: bench-tls
    base_url: https://localhost:$ups
    hosts: [localhost]
    ports: [$ups]
    tls: intercept
    routes: [{ methods: [GET], path: /ok, action: bench.read }]
YAML
sed -e 's/id: bench-agent/id: flood-agent/' "$w/policies/bench.yaml" > "$w/policies/flood.yaml"
token=$("$bin" token mint --issuer-key "$w/issuer.pem" --iss bench --sub bench-agent --ttl 2h)
flood_token=$("$bin" token mint --issuer-key "$w/issuer.pem" --iss bench --sub flood-agent --ttl 2h)
declare -A gw gp ga
start_gw() { # durability [limits-yaml]
  # The denied rows measure recorded refusals, so their instances record every one (a refusal
  # budget far above any rate here); the "under attack" instance keeps the default budget.
  local d=$1 limits=${2:-"{ refusals_per_agent: 4000000000/s, refusals_burst: 4000000000 }"}
  gp[$d]=$(port); ga[$d]=$(port)
  rm -rf "$w/gw-$d"; mkdir -p "$w/gw-$d"
  cat > "$w/gw-$d/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:${gp[$d]}, admin: 127.0.0.1:${ga[$d]} }
policies: $w/policies
data_dir: $w/gw-$d/data
audit: { durability: ${d%%-*} }
tls: { extra_upstream_roots: [$w/ca.pem] }
network: { allow_private_destinations: [127.0.0.0/8, "::1/128"] }
limits: $limits
YAML
  UAPK_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$bin" run -c "$w/gw-$d/gateway.yaml" 2>"$w/gw-$d/log" & gw[$d]=$!; pids+=(${gw[$d]})
  wait_port "${gp[$d]}"
}
stop_gw() { kill -TERM "${gw[$1]}"; wait "${gw[$1]}" 2>/dev/null || true; }
start_gw sync; start_gw async
printf 'wrk.path = "http://127.0.0.1:%s/ok"\nwrk.headers["Host"] = "127.0.0.1:%s"\nwrk.headers["Proxy-Authorization"] = "Bearer %s"\n' "$up" "$up" "$token" > "$w/explicit.lua"
printf 'wrk.headers["x-uapk-capability"] = "%s"\n' "$token" > "$w/base.lua"
printf 'wrk.path = "/bench/denied"\nwrk.headers["x-uapk-capability"] = "%s"\n' "$token" > "$w/denied.lua"

declare -A url lua
url[direct]="http://127.0.0.1:$up/ok"
url[nginx]="http://127.0.0.1:$np/ok"
url[squid]="http://127.0.0.1:$sp"; lua[squid]="$w/squid.lua"
url[uapk-explicit-sync]="http://127.0.0.1:${gp[sync]}"; lua[uapk-explicit-sync]="$w/explicit.lua"
url[uapk-explicit-async]="http://127.0.0.1:${gp[async]}"; lua[uapk-explicit-async]="$w/explicit.lua"
url[uapk-denied]="http://127.0.0.1:${gp[sync]}"; lua[uapk-denied]="$w/denied.lua"
url[uapk-denied-async]="http://127.0.0.1:${gp[async]}"; lua[uapk-denied-async]="$w/denied.lua"
plain=(direct nginx squid uapk-explicit-sync uapk-explicit-async uapk-denied uapk-denied-async)
denied_upstream=0
entries() { curl -s "http://127.0.0.1:${ga[sync]}/metrics" | awk '/^uapk_audit_entries_total/ {print $2}'; }
for round in $(seq "$rounds"); do
  for n in "${plain[@]}"; do
    if [ "$n" = uapk-denied ] || [ "$n" = uapk-denied-async ]; then
      before=$(wc -l < "$w/nginx-up/access.log"); e0=$(entries); t0=$(date +%s.%N)
      wrk_tput "$n" "${url[$n]}" "${lua[$n]:-}"
      t1=$(date +%s.%N); e1=$(entries); after=$(wc -l < "$w/nginx-up/access.log")
      denied_upstream=$((denied_upstream + after - before))
      # entries() reads the sync instance: its appends/s during its own denied run.
      if [ "$n" = uapk-denied ]; then appends=$(python3 -c "print(int(($e1 - $e0) / ($t1 - $t0)))"); fi
    else
      wrk_tput "$n" "${url[$n]}" "${lua[$n]:-}"
    fi
  done
done
for n in "${plain[@]}"; do wrk_lat "$n" "${url[$n]}" "${lua[$n]:-}"; done
rss[nginx]=$(ps -o rss= --ppid "$nginx_rp" | awk '{s+=$1} END {printf "%.1f", s/1024}'); rss[squid]=$(hwm "$squid")
rss[uapk-explicit-sync]=$(hwm "${gw[sync]}"); rss[uapk-denied]=${rss[uapk-explicit-sync]}; rss[uapk-explicit-async]=$(hwm "${gw[async]}")
rss[uapk-denied-async]=${rss[uapk-explicit-async]}
kill "$nginx_rp" "$squid"
for n in "${plain[@]}"; do finish "$n"; done
add direct "plain HTTP, no proxy"
add nginx "reverse proxy, keep-alive upstream"
add squid "forward proxy, domain allowlist"
add uapk-explicit-sync "uapk-gateway explicit proxy, plain HTTP, audit sync"
add uapk-explicit-async "uapk-gateway explicit proxy, plain HTTP, audit async"
add uapk-denied "uapk-gateway denied (no route), audit sync"
add uapk-denied-async "uapk-gateway denied (no route), audit async"

# HTTPS class: nginx terminating and re-encrypting TLS, mitmproxy, uapk-gateway CONNECT +
# interception (sync, async) and base-URL to the TLS upstream.
nt=$(port); mkdir -p "$w/nginx-tls"
cat > "$w/nginx-tls/nginx.conf" <<NGX
worker_processes 1; daemon off; pid $w/nginx-tls/pid; error_log $w/nginx-tls/error.log;
events { worker_connections 4096; }
http { access_log off; upstream u { server 127.0.0.1:$ups; keepalive 64; }
  server { listen 127.0.0.1:$nt ssl; ssl_certificate $w/up.pem; ssl_certificate_key $w/up.key;
    location / { proxy_pass https://u; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_session_reuse on; proxy_ssl_verify on; proxy_ssl_trusted_certificate $w/ca.pem; proxy_ssl_name localhost; } } }
NGX
taskset -c 0 nginx -c "$w/nginx-tls/nginx.conf" -p "$w/nginx-tls" & nginx_tls=$!; pids+=($nginx_tls); wait_port "$nt"
mp=$(port)
taskset -c 0 mitmdump -q --listen-host 127.0.0.1 --listen-port "$mp" --set confdir="$w/mitm" \
  --set ssl_verify_upstream_trusted_ca="$w/ca.pem" & mitm=$!; pids+=($mitm); wait_port "$mp"
for _ in $(seq 100); do [ -f "$w/mitm/mitmproxy-ca-cert.pem" ] && break; sleep 0.1; done
# name → "URL CA [proxy]" for loadgen
declare -A lgargs
lgargs[nginx-tls]="https://localhost:$nt/ok $w/ca.pem"
lgargs[mitmproxy]="https://localhost:$ups/ok $w/mitm/mitmproxy-ca-cert.pem http://127.0.0.1:$mp"
lgargs[uapk-intercept-sync]="https://localhost:$ups/ok $w/gw-sync/data/ca.pem http://agent:$token@127.0.0.1:${gp[sync]}"
lgargs[uapk-intercept-async]="https://localhost:$ups/ok $w/gw-async/data/ca.pem http://agent:$token@127.0.0.1:${gp[async]}"
tls=(nginx-tls mitmproxy uapk-intercept-sync uapk-intercept-async)
base_url="http://127.0.0.1:${gp[sync]}/bench-tls/ok"
for round in $(seq "$rounds"); do
  for n in "${tls[@]}"; do lg_tput "$n" ${lgargs[$n]}; done
  wrk_tput uapk-base-tls "$base_url" "$w/base.lua"
done
for n in "${tls[@]}"; do lg_lat "$n" ${lgargs[$n]}; done
wrk_lat uapk-base-tls "$base_url" "$w/base.lua"
rss[nginx-tls]=$(ps -o rss= --ppid "$nginx_tls" | awk '{s+=$1} END {printf "%.1f", s/1024}'); rss[mitmproxy]=$(hwm "$mitm")
rss[uapk-intercept-sync]=$(hwm "${gw[sync]}"); rss[uapk-base-tls]=${rss[uapk-intercept-sync]}; rss[uapk-intercept-async]=$(hwm "${gw[async]}")
kill "$nginx_tls" "$mitm"
stop_gw sync; stop_gw async
for n in "${tls[@]}" uapk-base-tls; do finish "$n"; done
add nginx-tls "nginx TLS termination + re-encryption"
add mitmproxy "mitmproxy HTTPS interception"
add uapk-intercept-sync "uapk-gateway CONNECT + interception, audit sync"
add uapk-intercept-async "uapk-gateway CONNECT + interception, audit async"
add uapk-base-tls "uapk-gateway base-URL, TLS upstream, audit sync (wrk)"

# Fleet class (SPEC §15.6): two gateways sharing one PostgreSQL (a private cluster, on core 1
# with the load generator), allowed requests through the explicit proxy, against the embedded
# sync mode in the same rounds. Both fleet gateways run on core 0, the core one embedded gateway
# has: "fleet, one gateway" drives one of them (c=32), "fleet, both" drives both at once (two
# wrk -c16, rates summed). Skipped, saying so, without PostgreSQL.
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
fleet_note="not measured (no PostgreSQL: install the Debian package postgresql)"
if [ -n "$pgbin" ] && [ -x "$pgbin/initdb" ]; then
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  pgd=$w/pg; mkdir -p "$pgd"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$pgd"
  as_pg "$pgbin/initdb" -D "$pgd/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
  pgp=$(port)
  as_pg taskset -c 1 "$pgbin/pg_ctl" -D "$pgd/data" -l "$pgd/log" -w \
    -o "-p $pgp -k $pgd -c listen_addresses=127.0.0.1 -c max_connections=100" start >/dev/null
  pg_stop=(as_pg "$pgbin/pg_ctl" -D "$pgd/data" -m immediate stop)
  echo "postgres://postgres@127.0.0.1:$pgp/postgres?sslmode=disable" > "$w/pg-url"
  "$bin" keygen --out "$w/fleet-key.pem" >/dev/null
  start_fleet_gw() { # name
    local n=$1; gp[$n]=$(port); ga[$n]=$(port); mkdir -p "$w/gw-$n"
    cat > "$w/gw-$n/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:${gp[$n]}, admin: 127.0.0.1:${ga[$n]} }
policies: $w/policies
data_dir: $w/gw-$n/data
keys: { gateway: $w/fleet-key.pem }
audit: { origin: bench.fleet/log }
state: { backend: postgres, postgres: { url_file: $w/pg-url } }
network: { allow_private_destinations: [127.0.0.0/8, "::1/128"] }
limits: { refusals_per_agent: 4000000000/s, refusals_burst: 4000000000 }
YAML
    HOSTNAME=$n UAPK_LOG=warn TOKIO_WORKER_THREADS=1 taskset -c 0 "$bin" run -c "$w/gw-$n/gateway.yaml" 2>"$w/gw-$n/log" & gw[$n]=$!; pids+=(${gw[$n]})
    wait_port "${gp[$n]}"
  }
  start_gw sync; start_fleet_gw fleet-a; start_fleet_gw fleet-b
  url[uapk-fleet-ref]="http://127.0.0.1:${gp[sync]}"
  url[uapk-fleet-one]="http://127.0.0.1:${gp[fleet-a]}"
  for round in $(seq "$rounds"); do
    wrk_tput uapk-fleet-ref "${url[uapk-fleet-ref]}" "$w/explicit.lua"
    wrk_tput uapk-fleet-one "${url[uapk-fleet-one]}" "$w/explicit.lua"
    taskset -c 1 wrk -t1 -c16 -d"${secs}s" -s "$w/explicit.lua" "http://127.0.0.1:${gp[fleet-a]}" > "$w/fa.out" & fa=$!
    taskset -c 1 wrk -t1 -c16 -d"${secs}s" -s "$w/explicit.lua" "http://127.0.0.1:${gp[fleet-b]}" > "$w/fb.out"
    wait "$fa"
    runs[uapk-fleet-both]+="$(awk '/Requests\/sec/ {s+=$2} END {printf "%.0f", s}' "$w/fa.out" "$w/fb.out") "
  done
  wrk_lat uapk-fleet-ref "${url[uapk-fleet-ref]}" "$w/explicit.lua"
  wrk_lat uapk-fleet-one "${url[uapk-fleet-one]}" "$w/explicit.lua"
  p50[uapk-fleet-both]=-; p99[uapk-fleet-both]=-
  rss[uapk-fleet-ref]=$(hwm "${gw[sync]}"); rss[uapk-fleet-one]=$(hwm "${gw[fleet-a]}"); rss[uapk-fleet-both]=${rss[uapk-fleet-one]}
  fleet_entries=$("$pgbin/psql" -h 127.0.0.1 -p "$pgp" -U postgres -At -c "SELECT count(*) FROM uapk_entries" postgres)
  stop_gw sync; stop_gw fleet-a; stop_gw fleet-b
  for n in uapk-fleet-ref uapk-fleet-one uapk-fleet-both; do finish "$n"; done
  add uapk-fleet-ref "uapk-gateway explicit proxy, embedded audit sync (the fleet rows' reference)"
  add uapk-fleet-one "uapk-gateway fleet: one of 2 gateways on one PostgreSQL"
  add uapk-fleet-both "uapk-gateway fleet: both gateways at once (2 × wrk -c16, summed; core 0 shared)"
  fleet_note="one fleet gateway / embedded sync: $(python3 -c "import sys; a,b=sys.argv[1:]; print(f'{float(a)/float(b):.2f}')" "${rps[uapk-fleet-one]}" "${rps[uapk-fleet-ref]}") (target ≥ 0.5); both at once / embedded sync: $(python3 -c "import sys; a,b=sys.argv[1:]; print(f'{float(a)/float(b):.2f}')" "${rps[uapk-fleet-both]}" "${rps[uapk-fleet-ref]}"); p50 ${p50[uapk-fleet-ref]} → ${p50[uapk-fleet-one]}, p99 ${p99[uapk-fleet-ref]} → ${p99[uapk-fleet-one]}; the fleet log holds ${fleet_entries} entries"
  "${pg_stop[@]}" >/dev/null 2>&1 || true; pg_stop=()
fi

# Under attack: allowed requests (explicit proxy, sync audit, default limits) on one instance,
# alone, while another agent floods refusals (wrk -c8 on /bench/denied), and while silent
# sockets are held open (re-opened as the gateway closes them after header_read_timeout): 2,000,
# or fewer when the open-file limit would put them past the gateway's connection cap.
# wrk -c32 --latency: req/s and p99 of the allowed requests.
start_gw sync-attack "{}"
atk="http://127.0.0.1:${gp[sync-attack]}"
printf 'wrk.path = "/bench/denied"\nwrk.headers["x-uapk-capability"] = "%s"\n' "$flood_token" > "$w/flood.lua"
cat > "$w/silent.py" <<'PY'
import resource, selectors, socket, sys, time
port, n, secs = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 64: resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64), hard))
sel = selectors.DefaultSelector()
def open_one():
    s = socket.create_connection(("127.0.0.1", port)); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
for _ in range(n): open_one()
print("held", n, flush=True)
end = time.time() + secs
while time.time() < end:
    for key, _ in sel.select(timeout=0.2):
        try: data = key.fileobj.recv(4096)
        except OSError: data = b""
        if not data:
            sel.unregister(key.fileobj); key.fileobj.close(); open_one()
PY
attack_entries() { curl -s "http://127.0.0.1:${ga[sync-attack]}/metrics" | awk '/^uapk_audit_entries_total/ {print $2}'; }
atk_run() { # NAME → one run of allowed requests, req/s into runs[NAME], p50/p99 into p50/p99
  local out; out=$(taskset -c 1 wrk -t1 -c32 -d"${secs}s" --latency -s "$w/explicit.lua" "$atk")
  runs[$1]+="$(awk '/Requests\/sec/ {printf "%.0f", $2}' <<<"$out") "
  p50[$1]=$(awk '$1=="50%" {print $2}' <<<"$out"); p99[$1]=$(awk '$1=="99%" {print $2}' <<<"$out")
  grep -q "Non-2xx" <<<"$out" && failed[$1]=1 && echo "warning: $1: non-2xx answers to allowed requests" >&2 || true
}
flood_rps=0; flood_entries=0
# The gateway's cap is (open files - 64 - 256 admin) / 2; stay 100 below it with the wrk clients.
silent_n=$(python3 -c "import sys; print(max(0, min(2000, ($(ulimit -n) - 320) // 2 - 100)))")
for round in $(seq "$rounds"); do
  atk_run uapk-attack-none
  e0=$(attack_entries); t0=$(date +%s.%N)
  taskset -c 1 wrk -t1 -c8 -d"$((secs + 1))s" -s "$w/flood.lua" "$atk" > "$w/flood.out" & flood=$!
  sleep 0.5; atk_run uapk-attack-refusals; wait "$flood"
  t1=$(date +%s.%N); e1=$(attack_entries)
  flood_rps=$(awk '/Requests\/sec/ {printf "%.0f", $2}' "$w/flood.out")
  flood_entries=$(python3 -c "print(int(($e1 - $e0) / ($t1 - $t0)))")
  taskset -c 1 python3 "$w/silent.py" "${gp[sync-attack]}" "$silent_n" "$((secs + 2))" > "$w/silent.out" & silent=$!
  for _ in $(seq 100); do grep -q held "$w/silent.out" 2>/dev/null && break; sleep 0.05; done
  atk_run uapk-attack-silent; wait "$silent" || true
done
rss[uapk-attack-none]=$(hwm "${gw[sync-attack]}"); rss[uapk-attack-refusals]=${rss[uapk-attack-none]}; rss[uapk-attack-silent]=${rss[uapk-attack-none]}
stop_gw sync-attack
for n in uapk-attack-none uapk-attack-refusals uapk-attack-silent; do finish "$n"; done
add uapk-attack-none "under attack: none (allowed, explicit, sync; c=32 p50/p99)"
add uapk-attack-refusals "under attack: another agent floods refusals (wrk -c8)"
add uapk-attack-silent "under attack: $silent_n silent sockets held"

# Audit micro-benchmark: 32 concurrent writers, each waiting for its durable commit; then verify.
am=$(taskset -c 0 "$root/target/release/examples/audit-append" --writers 32 --seconds "$secs" --durability sync)
echo "$am"
appends_micro=$(awk '/^appends:/ {for (i=1;i<=NF;i++) if ($i=="entries/s") print $(i-1)}' <<<"$am")
verify_rate=$(awk '/^verify:/ {for (i=1;i<=NF;i++) if ($i=="entries/s") print $(i-1)}' <<<"$am")

# RSS at a steady 1,000 req/s (explicit proxy, sync).
start_gw sync
taskset -c 1 hey -z "$((secs + 3))s" -c 10 -q 100 -x "http://agent:$token@127.0.0.1:${gp[sync]}" "http://127.0.0.1:$up/ok" >/dev/null
rss_1k=$(hwm "${gw[sync]}")
stop_gw sync

ratio() { python3 -c "import sys; a,b=sys.argv[1:]; print(f'{float(a)/float(b):.2f}' if a.replace('.','').isdigit() and b.replace('.','').isdigit() and float(b) else 'not measured')" "$1" "$2"; }
{
  echo "# Benchmark results"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r); \`bash bench/run.sh${1:+ $1}\` ($secs s per run, rounds: $rounds)."
  echo "Plain HTTP rows: wrk -t1 -c32 (throughput) and -c4 (latency). HTTPS rows: bench/loadgen.rs -c32 / -c4 (one thread, HTTP/1.1 keep-alive, CONNECT through the proxy, then TLS with the target's SNI). Proxy on core 0; load generators and the nginx upstream on core 1. uapk-gateway with one tokio worker. All systems of a class run at once and the throughput runs go round-robin over them; req/s is the median of the rounds (each round listed). Peak RSS is the process's over all its runs."
  echo
  echo "| system | mode | req/s | rounds | p50 (c=4) | p99 (c=4) | peak RSS MB |"
  echo "|---|---|---:|---|---:|---:|---:|"
  for r in "${rows[@]}"; do IFS='|' read -r a b c d e f g <<<"$r"; echo "| $a | $b | $c | $d | $e | $f | $g |"; done
  echo
  echo "Ratios (medians of one run):"
  echo "- explicit plain HTTP, sync / nginx: $(ratio "${rps[uapk-explicit-sync]}" "${rps[nginx]}") (target ≥ 0.8); async / nginx: $(ratio "${rps[uapk-explicit-async]}" "${rps[nginx]}") (target ≥ 1.0); sync / squid: $(ratio "${rps[uapk-explicit-sync]}" "${rps[squid]}") (target ≥ 1.5)"
  echo "- interception, sync / nginx TLS→TLS: $(ratio "${rps[uapk-intercept-sync]}" "${rps[nginx-tls]}") (target ≥ 0.7); / mitmproxy: $(ratio "${rps[uapk-intercept-sync]}" "${rps[mitmproxy]}") (target ≥ 10)"
  echo "- denied / allowed, sync: $(ratio "${rps[uapk-denied]}" "${rps[uapk-explicit-sync]}"), async: $(ratio "${rps[uapk-denied-async]}" "${rps[uapk-explicit-async]}") (target ≥ 2); upstream requests during the denied runs: $denied_upstream (target 0)"
  echo "- median at c=4: direct ${p50[direct]}, uapk sync ${p50[uapk-explicit-sync]}, uapk async ${p50[uapk-explicit-async]} (targets: +1 ms sync, +0.3 ms async)"
  echo "- peak RSS at 1,000 req/s (explicit, sync): ${rss_1k} MB (target ≤ 30)"
  echo "- durable audit appends, micro-benchmark with 32 concurrent writers (bench/audit_append.rs): ${appends_micro} entries/s (target ≥ 20,000); through the proxy during the denied run: ${appends} entries/s"
  echo "- verify of the micro-benchmark's log: ${verify_rate} entries/s (target ≥ 200,000)"
  echo "- fleet (two gateways, one PostgreSQL): ${fleet_note}"
  echo "- under attack (default limits; peak RSS over all three runs ${rss[uapk-attack-none]} MB): allowed req/s with a refusal flood / without: $(ratio "${rps[uapk-attack-refusals]}" "${rps[uapk-attack-none]}"), with $silent_n silent sockets / without: $(ratio "${rps[uapk-attack-silent]}" "${rps[uapk-attack-none]}"); p99 ${p99[uapk-attack-none]} → ${p99[uapk-attack-refusals]} (refusals), ${p99[uapk-attack-silent]} (silent sockets); the flood sent ${flood_rps} refusals/s and the log took ${flood_entries} entries/s for everything during it (refusal budget: 50/s per agent, the rest summarised)"
} | tee bench/results.md
echo "bench: 1 passed, 0 failed"
