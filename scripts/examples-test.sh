#!/usr/bin/env bash
# Runs every example agent (curl, Python requests, Python httpx, Node fetch) through a real
# gateway to a real HTTPS upstream, in explicit-proxy mode on loopback and in transparent mode
# inside two network namespaces with the rules `init-iptables` prints; each agent must see
# allow → the upstream's answer, deny → 403 JSON, escalate → an approval id; the log must verify.
# Then the LLM SDK agents (openai and anthropic for Python, openai for Node) against a fake LLM
# API (scripts/fake_llm_upstream.py, HTTPS), in explicit-proxy and base-URL mode: decisions and
# token usage (JSON and streamed) in the log, a max_tokens budget refusing once crossed, and the
# refusal as each SDK shows it. Then the Anthropic agent against `run --demo` and `demo-upstream`
# (streamed messages). Needs root (namespaces, iptables).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pass=0; fail=0

need=()
for c in curl iptables openssl setpriv; do command -v $c >/dev/null || need+=($c); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl iptables openssl util-linux >/dev/null
fi
python3 -c "import requests, httpx" 2>/dev/null || python3 -m pip install -q requests httpx
python3 -c "import openai, anthropic" 2>/dev/null || python3 -m pip install -q openai==3.63.0 anthropic==2.17.0
(cd examples && npm ci --no-audit --no-fund --silent)
cargo build --quiet
bin=$root/target/debug/uapk-gateway

work=$(mktemp -d); chmod 755 "$work"
tag=$(head -c 3 /dev/urandom | od -An -tx1 | tr -d ' \n')
ns_a=uapk-ea-$tag; ns_u=uapk-eu-$tag
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$ns_a" 2>/dev/null || true; ip netns del "$ns_u" 2>/dev/null || true
  rm -rf "/etc/netns/$ns_a" "$work"
}
trap cleanup EXIT

# A test CA and an upstream certificate for api.test and localhost.
(cd "$work"
 openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout up-ca.key -out up-ca.pem -days 2 -subj /CN=examples-ca 2>/dev/null
 openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout up.key -out up.csr -subj /CN=api.test 2>/dev/null
 printf 'subjectAltName=DNS:api.test,DNS:localhost\n' > ext
 openssl x509 -req -in up.csr -CA up-ca.pem -CAkey up-ca.key -CAcreateserial -out up.pem -days 2 -extfile ext 2>/dev/null)
cat > "$work/upstream.py" <<'PY'
import http.server, json, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        n = int(self.headers.get("content-length") or 0); self.rfile.read(n)
        body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = _answer
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[3], sys.argv[4])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
PY
"$bin" keygen --out "$work/issuer.pem" >/dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# manifest HOST PORT → the examples agent's policy
manifest() {
  cat <<YAML
apiVersion: uapk/v1
kind: Manifest
agent: { id: example-agent }
capability:
  issuers:
    - id: platform
      public_key_file: $work/issuer.pub.pem
connectors:
  - name: shop
    hosts: [$1]
    ports: [$2]
    tls: intercept
    routes:
      - { methods: [GET], path: "/v1/items/**", action: item.read }
      - methods: [POST]
        path: /v1/refunds
        action: payment.refund
        params:
          amount:       { form: amount, scale: 2 }
          currency:     { form: currency }
          counterparty: { form: customer }
policy:
  approval: { amount_above: { USD: "50.00" } }
YAML
}

check_agent() { # name, output file, exit status
  local name=$1 out=$2 rc=$3
  if [ "$rc" -eq 0 ] && grep -q '^allow 200 ' "$out" && grep -q '^deny 403 route_not_allowed' "$out" \
     && grep -Eq '^escalate 403 appr-[0-9a-f]{24}$' "$out" \
     && { [[ "$name" != explicit/requests ]] || grep -q '^approval 200 pending$' "$out"; }; then
    pass=$((pass + 1)); echo "ok   $name"; sed 's/^/       /' "$out"
  else
    fail=$((fail + 1)); echo "FAIL $name (exit $rc)"; sed 's/^/       /' "$out"
  fi
}

verify_log() { # data dir
  if "$bin" verify --db "$1/audit.redb" --key "$1/gateway.pub.pem" > "$work/verify.out" 2>&1; then
    pass=$((pass + 1)); echo "ok   $(cat "$work/verify.out")"
  else
    fail=$((fail + 1)); echo "FAIL verify: $(cat "$work/verify.out")"
  fi
}

agents=("curl:bash $root/examples/curl-agent.sh" "requests:python3 $root/examples/python-requests-agent.py"
        "httpx:python3 $root/examples/python-httpx-agent.py" "node:node $root/examples/node-agent.mjs")

# ---------------------------------------------------------------- explicit proxy on loopback
up=$(port); proxy=$(port); admin=$(port)
python3 "$work/upstream.py" 127.0.0.1 "$up" "$work/up.pem" "$work/up.key" & pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null --cacert "$work/up-ca.pem" "https://localhost:$up/" && break; sleep 0.1; done
mkdir -p "$work/explicit/policies"
manifest localhost "$up" > "$work/explicit/policies/agent.yaml"
cat > "$work/explicit/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:$proxy, admin: 127.0.0.1:$admin }
policies: $work/explicit/policies
data_dir: $work/explicit/data
tls: { extra_upstream_roots: [$work/up-ca.pem] }
network: { allow_private_destinations: [127.0.0.0/8, "::1/128"] }
YAML
UAPK_LOG=warn "$bin" run -c "$work/explicit/gateway.yaml" 2>"$work/explicit.log" & gw=$!; pids+=($gw)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
token=$("$bin" token mint --issuer-key "$work/issuer.pem" --iss platform --sub example-agent --ttl 10m)
ca=$work/explicit/data/ca.pem
for a in "${agents[@]}"; do
  name=${a%%:*}; cmd=${a#*:}
  set +e
  env -u NO_PROXY -u no_proxy UAPK_UPSTREAM="https://localhost:$up" \
    UAPK_GATEWAY="http://127.0.0.1:$proxy" UAPK_TOKEN="$token" \
    HTTPS_PROXY="http://agent:$token@127.0.0.1:$proxy" HTTP_PROXY="http://agent:$token@127.0.0.1:$proxy" \
    SSL_CERT_FILE="$ca" REQUESTS_CA_BUNDLE="$ca" CURL_CA_BUNDLE="$ca" NODE_EXTRA_CA_CERTS="$ca" \
    $cmd > "$work/out" 2>&1
  rc=$?; set -e
  check_agent "explicit/$name" "$work/out" "$rc"
done
kill -TERM "$gw"; wait "$gw" || true
verify_log "$work/explicit/data"

# ---------------------------------------------------------------- LLM SDK agents, usage, token budgets
# Two fake LLM APIs over HTTPS (one per connector, told apart by port in explicit-proxy mode).
oa=$(port); an=$(port)
python3 "$root/scripts/fake_llm_upstream.py" "$oa" --cert "$work/up.pem" --key "$work/up.key" --log "$work/llm-openai.log" 2>/dev/null & pids+=($!)
python3 "$root/scripts/fake_llm_upstream.py" "$an" --cert "$work/up.pem" --key "$work/up.key" --log "$work/llm-anthropic.log" 2>/dev/null & pids+=($!)
for p in "$oa" "$an"; do
  for _ in $(seq 100); do curl -s -o /dev/null --cacert "$work/up-ca.pem" "https://localhost:$p/v1/models" && break; sleep 0.1; done
done
llm_manifest() {
  cat <<YAML
apiVersion: uapk/v1
kind: Manifest
agent: { id: llm-agent }
capability:
  issuers:
    - id: platform
      public_key_file: $work/issuer.pub.pem
connectors:
  - name: openai
    base_url: https://localhost:$oa
    hosts: [localhost]
    ports: [$oa]
    usage: openai
    routes:
      - { methods: [POST], path: /v1/chat/completions, action: llm.chat, params: { model: { json: /model } } }
  - name: anthropic
    base_url: https://localhost:$an
    hosts: [localhost]
    ports: [$an]
    usage: anthropic
    routes:
      - { methods: [POST], path: /v1/messages, action: llm.chat, params: { model: { json: /model } } }
policy:
  params:
    model: { allow: [gpt-4o-mini, claude-sonnet-4-5] }
  budgets:
    # The fake APIs answer 60 + 42 (OpenAI) and 36 + 46 (Anthropic) tokens: the second call of
    # each agent crosses 80 and completes, the third is refused.
    - { window: day, scope: connector, max_tokens: 80 }
YAML
}
# check_llm NAME MODE OUT RC DATA CONNECTOR "TOTALS": the agent's own output, then the log.
check_llm() {
  local name=$1 mode=$2 out=$3 rc=$4 data=$5 conn=$6 totals=$7 why=""
  [ "$rc" -eq 0 ] || why="exit $rc"
  grep -q '^chat record [0-9]' "$out" || why="$why; no chat line"
  grep -q '^stream tokens [0-9]' "$out" || why="$why; no stream line"
  grep -q '^followup' "$out" && why="$why; the follow-up passed the spent budget"
  grep -Eq '^refused:.*deny: budget_exceeded: .*tokens.*\(record [0-9]+\)' "$out" || why="$why; no refusal with decision, code and record"
  "$bin" export -c "$data/../gateway.yaml" --out "$work/bundle-$name-$mode" >/dev/null 2>"$work/export.err" \
    || why="$why; export failed: $(cat "$work/export.err")"
  python3 - "$work/bundle-$name-$mode" "$conn" "$totals" > "$work/logcheck" 2>&1 <<'PY' || why="$why; log: $(cat "$work/logcheck")"
import json, pathlib, sys
bundle, conn, totals = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3].split()
entries = [json.loads(l) for l in (bundle / "entries.jsonl").read_text().splitlines() if l.strip()]
# Requests (not CONNECT tunnel authorisations, which explicit-proxy mode adds).
dec = [e for e in entries if e["kind"] == "decision" and e.get("connector") == conn and e.get("action") == "llm.chat"]
out = [e for e in entries if e["kind"] == "outcome"]
allowed = [d for d in dec if d["decision"] == "allow"]
denied = [d for d in dec if d["decision"] == "deny"]
assert len(allowed) == 2, f"{len(allowed)} allowed decisions"
assert [d["reasons"][0]["code"] for d in denied] == ["budget_exceeded"], denied
seen = sorted(o["usage"]["total_tokens"] for o in out if o.get("usage"))
assert seen == sorted(totals), f"usage totals {seen}, want {totals}"
assert all(o["connector"] == conn and o["action"] == "llm.chat" for o in out), out
assert not any(o.get("error") or o.get("usage_error") for o in out), out
print("ok")
PY
  if [ -z "$why" ]; then
    pass=$((pass + 1)); echo "ok   $mode/$name (usage $totals; budget refused)"; sed 's/^/       /' "$out"
  else
    fail=$((fail + 1)); echo "FAIL $mode/$name:$why"; sed 's/^/       /' "$out"
  fi
}
llm_agents=("openai-py:openai:60 42:python3 $root/examples/openai-agent.py"
            "anthropic-py:anthropic:36 46:python3 $root/examples/anthropic-agent.py"
            "openai-node:openai:60 42:node $root/examples/openai-node-agent.mjs")
token=$("$bin" token mint --issuer-key "$work/issuer.pem" --iss platform --sub llm-agent --ttl 10m)
for mode in explicit base-url; do
  for a in "${llm_agents[@]}"; do
    IFS=: read -r name conn totals cmd <<<"$a"
    d=$work/llm-$mode-$name; mkdir -p "$d/policies"
    llm_manifest > "$d/policies/llm.yaml"
    cat > "$d/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:$proxy, admin: 127.0.0.1:$admin }
policies: $d/policies
data_dir: $d/data
tls: { extra_upstream_roots: [$work/up-ca.pem] }
network: { allow_private_destinations: [127.0.0.0/8, "::1/128"] }
YAML
    UAPK_LOG=warn "$bin" run -c "$d/gateway.yaml" 2>"$d/gateway.log" & gw=$!; pids+=($gw)
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
    if [ "$mode" = explicit ]; then
      # The SDK talks to the API's own URL; the proxy and the gateway CA come from the environment.
      set -- HTTPS_PROXY="http://agent:$token@127.0.0.1:$proxy" SSL_CERT_FILE="$d/data/ca.pem" \
        NODE_EXTRA_CA_CERTS="$d/data/ca.pem" NODE_USE_ENV_PROXY=1 \
        OPENAI_BASE_URL="https://localhost:$oa/v1" ANTHROPIC_BASE_URL="https://localhost:$an"
    else
      # The SDK's base URL is the gateway's connector prefix; the token travels as a header.
      set -- UAPK_CAPABILITY="$token" \
        OPENAI_BASE_URL="http://127.0.0.1:$proxy/openai/v1" ANTHROPIC_BASE_URL="http://127.0.0.1:$proxy/anthropic"
    fi
    set +e
    env -u NO_PROXY -u no_proxy -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy \
      -u OPENAI_API_KEY -u ANTHROPIC_API_KEY "$@" $cmd > "$d/out" 2>&1
    rc=$?; set -e
    kill -TERM "$gw"; wait "$gw" || true
    check_llm "$name" "$mode" "$d/out" "$rc" "$d/data" "$conn" "$totals"
    verify_log "$d/data"
  done
done
# What reached the fake APIs: uncompressed bodies asked for, and never the agent's identity.
if python3 - "$work/llm-openai.log" "$work/llm-anthropic.log" <<'PY'
import json, sys
reqs = [json.loads(l) for f in sys.argv[1:] for l in open(f)]
posts = [r for r in reqs if r["method"] == "POST"]
assert len(posts) == 12, [(r["path"], (r["body"] or {}).get("stream")) for r in posts]
assert all(r["headers"].get("accept-encoding") == "identity" for r in reqs if r["method"] == "POST")
assert not any(k.startswith("x-uapk") or k == "proxy-authorization" for r in reqs for k in r["headers"])
PY
then pass=$((pass + 1)); echo "ok   the fake LLM APIs saw 12 calls, identity-encoded, without gateway headers"
else fail=$((fail + 1)); echo "FAIL what reached the fake LLM APIs"; fi

# ---------------------------------------------------------------- the Anthropic agent against `run --demo`
# The shipped example manifests (policies/) served by `run --demo` against `demo-upstream`, as in
# the README: a message, a streamed one (the Messages API's event stream), a follow-up; each with
# its usage in the log.
demo=$(port); d=$work/demo; mkdir -p "$d"
cat > "$d/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:$proxy, admin: 127.0.0.1:$admin }
policies: $root/policies
data_dir: $d/data
YAML
"$bin" demo-upstream --listen "127.0.0.1:$demo" >/dev/null 2>"$d/upstream.log" & pids+=($!)
UAPK_LOG=warn "$bin" run --demo --demo-upstream "127.0.0.1:$demo" -c "$d/gateway.yaml" 2>"$d/gateway.log" & gw=$!; pids+=($gw)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
token=$("$bin" token mint --issuer-key "$root/examples/keys/demo-issuer.pem" --iss platform --sub llm-agent --ttl 10m)
set +e
env -u NO_PROXY -u no_proxy -u HTTP_PROXY -u HTTPS_PROXY -u http_proxy -u https_proxy -u ANTHROPIC_API_KEY \
  UAPK_CAPABILITY="$token" ANTHROPIC_BASE_URL="http://127.0.0.1:$proxy/anthropic" \
  python3 "$root/examples/anthropic-agent.py" > "$d/out" 2>&1
rc=$?; set -e
kill -TERM "$gw"; wait "$gw" || true
why=""
[ "$rc" -eq 0 ] || why="exit $rc"
for line in '^chat record [0-9]' '^stream tokens [0-9]' '^followup tokens [0-9]'; do
  grep -q "$line" "$d/out" || why="$why; no line $line"
done
"$bin" export -c "$d/gateway.yaml" --out "$d/bundle" >/dev/null 2>"$d/export.err" || why="$why; export: $(cat "$d/export.err")"
python3 - "$d/bundle" > "$d/logcheck" 2>&1 <<'PY' || why="$why; log: $(cat "$d/logcheck")"
import json, pathlib, sys
entries = [json.loads(l) for l in (pathlib.Path(sys.argv[1]) / "entries.jsonl").read_text().splitlines() if l.strip()]
out = [e for e in entries if e["kind"] == "outcome" and e.get("connector") == "anthropic"]
assert len(out) == 3, out
assert all(o["status"] == "200" and o.get("usage") and not o.get("usage_error") for o in out), out
assert all(int(o["usage"]["input_tokens"]) > 0 and int(o["usage"]["output_tokens"]) > 0 for o in out), out
PY
if [ -z "$why" ]; then
  pass=$((pass + 1)); echo "ok   demo/anthropic-py (run --demo, streamed message, usage recorded)"; sed 's/^/       /' "$d/out"
else
  fail=$((fail + 1)); echo "FAIL demo/anthropic-py:$why"; sed 's/^/       /' "$d/out"
fi
verify_log "$d/data"

# ---------------------------------------------------------------- transparent, in namespaces
va=va$tag; vu=vu$tag
ip netns add "$ns_a"; ip netns add "$ns_u"
ip link add "$va" type veth peer name "$vu"
ip link set "$va" netns "$ns_a"; ip link set "$vu" netns "$ns_u"
ip -n "$ns_a" addr add 10.202.0.1/24 dev "$va"; ip -n "$ns_a" link set "$va" up; ip -n "$ns_a" link set lo up
ip -n "$ns_u" addr add 10.202.0.2/24 dev "$vu"; ip -n "$ns_u" link set "$vu" up; ip -n "$ns_u" link set lo up
mkdir -p "/etc/netns/$ns_a"; printf '127.0.0.1 localhost\n10.202.0.2 api.test\n' > "/etc/netns/$ns_a/hosts"
ip netns exec "$ns_u" python3 "$work/upstream.py" 0.0.0.0 443 "$work/up.pem" "$work/up.key" & pids+=($!)
for _ in $(seq 100); do ip netns exec "$ns_u" ss -ltn | grep -q ':443 ' && break; sleep 0.1; done
mkdir -p "$work/transparent/policies" "$work/transparent/data"
manifest api.test 443 > "$work/transparent/policies/agent.yaml"
"$bin" token mint --issuer-key "$work/issuer.pem" --iss platform --sub example-agent --ttl 10m > "$work/transparent/token"
cat > "$work/transparent/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:15080, transparent: 0.0.0.0:15001, admin: 127.0.0.1:15021 }
policies: $work/transparent/policies
data_dir: $work/transparent/data
identity: { default_agent: example-agent, token_file: $work/transparent/token }
tls: { extra_upstream_roots: [$work/up-ca.pem] }
network: { allow_private_destinations: [10.202.0.0/24] }
YAML
chown -R 1337:1337 "$work/transparent"
ip netns exec "$ns_a" setpriv --reuid=1337 --regid=1337 --clear-groups \
  env UAPK_LOG=warn "$bin" run -c "$work/transparent/gateway.yaml" 2>"$work/transparent.log" & gw=$!; pids+=($gw)
for _ in $(seq 100); do ip netns exec "$ns_a" curl -sf http://127.0.0.1:15021/readyz >/dev/null && break; sleep 0.1; done
"$bin" init-iptables --proxy-uid 1337 --port 15001 --dry-run | grep '^iptables ' | while read -r rule; do
  ip netns exec "$ns_a" $rule
done
ca=$work/transparent/data/ca.pem
for a in "${agents[@]}"; do
  name=${a%%:*}; cmd=${a#*:}
  set +e
  # The agent runs as root: any UID but the gateway's is redirected (and root can use the
  # Python packages installed for this machine's interpreter).
  ip netns exec "$ns_a" env -i PATH="$PATH" HOME="$HOME" PYENV_ROOT="${PYENV_ROOT:-}" UAPK_UPSTREAM=https://api.test \
    SSL_CERT_FILE="$ca" REQUESTS_CA_BUNDLE="$ca" CURL_CA_BUNDLE="$ca" NODE_EXTRA_CA_CERTS="$ca" \
    $cmd > "$work/out" 2>&1
  rc=$?; set -e
  check_agent "transparent/$name" "$work/out" "$rc"
done
# SIGTERM reaches the gateway through `ip netns exec` and setpriv, which exec it.
kill -TERM "$gw"; wait "$gw" || true
verify_log "$work/transparent/data"

echo "examples-test: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
