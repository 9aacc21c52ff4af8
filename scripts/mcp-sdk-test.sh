#!/usr/bin/env bash
# The official MCP Python SDK through a real gateway: the example server (examples/mcp/server.py)
# in the SDK's session mode and in its stateless mode, the example agent (examples/mcp/agent.py)
# in base-URL and explicit-proxy mode against both, with the SDK's high-level Client (protocol
# 2026-07-28, Mcp-Method / Mcp-Name headers) and with the initialize handshake (2025-11-25).
# Asserts what the agent prints (allowed tool results, streamed progress, the SDK's error for an
# escalation and for a tool the manifest does not allow), what reached the MCP server, the
# decision entries in the log (read through GET /v1/records) with their actions, a held call
# that completes after an approval through the admin API, a rejected call retried with its
# override token in the same SDK session, a non-ASCII tool name (its Mcp-Name
# header base64-wrapped by the SDK) allowed, and an Mcp-Name header contradicting the body, or
# malformed, refused before the server. Ends with `uapk-gateway verify` on the log.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pass=0; fail=0

python3 -c "import mcp.server.mcpserver, mcp.client.streamable_http, uvicorn" 2>/dev/null \
  || python3 -m pip install -q 'mcp==2.3.0'
cargo build --quiet
bin=$root/target/debug/uapk-gateway

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; }
check() { # description, command...
  local what=$1; shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
posts() { grep -c '"POST /mcp HTTP/1.1"' "$1" || true; } # requests the MCP server received

# ---------------------------------------------------------------- the two MCP servers
s_sess=$(port); s_less=$(port); s_names=$(port); proxy=$(port); admin=$(port)
python3 "$root/examples/mcp/server.py" --port "$s_sess" > "$work/server-session.log" 2>&1 & pids+=($!)
python3 "$root/examples/mcp/server.py" --port "$s_less" --stateless > "$work/server-stateless.log" 2>&1 & pids+=($!)
# The example server plus a tool whose name is not plain ASCII: the SDK sends its Mcp-Name header
# as =?base64?…?=, which the gateway must decode before comparing it with the body.
cat > "$work/names_server.py" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
from server import app
@app.tool(name="résumé")
def resume(id: str) -> str:
    return f"résumé of {id}"
app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
PY
python3 "$work/names_server.py" "$root/examples/mcp" "$s_names" > "$work/server-names.log" 2>&1 & pids+=($!)
for p in "$s_sess" "$s_less" "$s_names"; do
  # (a GET would open the stateless server's event stream: wait for the port instead)
  for _ in $(seq 150); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done

# ---------------------------------------------------------------- the gateway
"$bin" keygen --out "$work/issuer.pem" >/dev/null
"$bin" admin-key new --role approver > "$work/admin-key.txt"
admin_key=$(sed -n 1p "$work/admin-key.txt" | awk '{print $NF}')

connector() { # name, port
  cat <<YAML
  - name: $1
    base_url: http://127.0.0.1:$2
    hosts: [127.0.0.1]
    ports: [$2]
    protocol: mcp
    mcp_path: /mcp
    tools:
      - name: read_ticket
        action: ticket.read
      - name: "résumé"
        action: ticket.summary
      - name: export_tickets
        action: ticket.export
      - name: refund
        action: payment.refund
        params:
          amount:   { json: /amount }
          currency: { value: USD }
YAML
}
manifest() { # agent id, escalation mode
  cat <<YAML
apiVersion: uapk/v1
kind: Manifest
agent: { id: $1 }
capability:
  issuers:
    - id: platform
      public_key_file: $work/issuer.pub.pem
connectors:
$(connector tickets "$s_sess")
$(connector tickets-stateless "$s_less")
$(connector tickets-names "$s_names")
policy:
  approval: { amount_above: { USD: "100.00" } }
escalation: { mode: $2, hold_timeout: 60s }
YAML
}
mkdir -p "$work/policies"
manifest mcp-agent reject > "$work/policies/mcp-agent.yaml"
manifest mcp-hold-agent hold > "$work/policies/mcp-hold-agent.yaml"
cat > "$work/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:$proxy, admin: 127.0.0.1:$admin }
policies: $work/policies
data_dir: $work/data
network: { allow_private_destinations: [127.0.0.0/8] }
admin:
  keys:
$(sed -n 3p "$work/admin-key.txt")
YAML
"$bin" check -c "$work/gateway.yaml" >/dev/null
UAPK_LOG=warn "$bin" run -c "$work/gateway.yaml" 2>"$work/gateway.log" & gw=$!; pids+=($gw)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && break; sleep 0.1; done
mint() { "$bin" token mint --issuer-key "$work/issuer.pem" --iss platform --sub "$1" --ttl 10m; }
jti() { python3 -c 'import base64,json,sys; p=sys.argv[1].split(".")[1]; print(json.loads(base64.urlsafe_b64decode(p+"="*(-len(p)%4)))["jti"])' "$1"; }

# ---------------------------------------------------------------- the agent, eight ways
# Server in session or stateless mode; agent in base-URL or explicit-proxy mode, with the SDK's
# high-level Client (auto: server/discover, protocol 2026-07-28 with Mcp-Method / Mcp-Name
# headers) or the initialize handshake (legacy: 2025-11-25). Each run has its own token, so its
# decision entries are found by the token's jti.
runs=()
for server in session stateless; do
  if [ $server = session ]; then conn=tickets; sport=$s_sess; else conn=tickets-stateless; sport=$s_less; fi
  for mode in base-url proxy; do
    for protocol in auto legacy; do
      name=$server/$mode/$protocol
      token=$(mint mcp-agent)
      runs+=("$name $(jti "$token")")
      before=$(posts "$work/server-$server.log")
      if [ $mode = base-url ]; then args=(--base-url "http://127.0.0.1:$proxy/$conn/mcp")
      else args=(--url "http://127.0.0.1:$sport/mcp" --proxy "http://127.0.0.1:$proxy"); fi
      set +e
      UAPK_TOKEN=$token timeout 60 python3 "$root/examples/mcp/agent.py" --protocol $protocol "${args[@]}" > "$work/out" 2>&1
      rc=$?; set -e
      sleep 0.3
      after=$(posts "$work/server-$server.log")
      echo "---- agent $name (exit $rc)"; sed 's/^/       /' "$work/out"
      out=$work/out
      check "$name: the agent exits 0" test "$rc" -eq 0
      if [ $protocol = auto ]; then want_protocol=2026-07-28; else want_protocol=2025-11-25; fi
      check "$name: protocol $want_protocol" grep -q "^session ticket-desk (protocol $want_protocol)" "$out"
      check "$name: tools listed" grep -q '^tools .*read_ticket.*refund' "$out"
      check "$name: read_ticket allowed, the server's answer" grep -q '^allow read_ticket: ticket T-1001' "$out"
      check "$name: streamed tool result (3 progress events, then the result)" \
        bash -c "grep -q '^progress events 3$' '$out' && grep -q '^allow export_tickets: exported 3 tickets' '$out'"
      check "$name: escalated refund: the SDK error shows decision, code and record" \
        grep -Eq '^refused refund: MCPError -32003: escalate: amount_requires_approval: .*\(record [0-9]+\) \[approval appr-' "$out"
      check "$name: disallowed tool: the SDK error shows tool_not_allowed" \
        grep -Eq '^refused delete_ticket: MCPError -32003: deny: tool_not_allowed: .*\(record [0-9]+\)' "$out"
      # The session requests (discover, or initialize and its notification), tools/list,
      # read_ticket, export_tickets: the refund and the disallowed tool never reach the server.
      if [ $protocol = auto ]; then want=4; else want=5; fi
      check "$name: the server received the $want allowed JSON-RPC POSTs only (got $((after - before)))" \
        test $((after - before)) -eq $want
    done
  done
done

# ---------------------------------------------------------------- Mcp-Name contradicting the body
token=$(mint mcp-agent)
before=$(posts "$work/server-session.log")
curl -s -D "$work/mm.h" -o "$work/mm.b" "http://127.0.0.1:$proxy/tickets/mcp" \
  -H "x-uapk-capability: $token" -H 'content-type: application/json' \
  -H 'accept: application/json, text/event-stream' -H 'mcp-method: tools/call' -H 'mcp-name: read_ticket' \
  -d '{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"refund","arguments":{"amount":5,"customer":"c"}}}'
sleep 0.3
after=$(posts "$work/server-session.log")
echo "---- Mcp-Name mismatch"; sed 's/^/       /' "$work/mm.b"; echo
check "Mcp-Name mismatch: JSON-RPC error -32003 deny mcp_header_mismatch, x-uapk-decision: deny" \
  python3 -c '
import json, sys
b = json.load(open(sys.argv[1])); h = open(sys.argv[2]).read().lower()
assert h.startswith("http/1.1 200") and "x-uapk-decision: deny" in h, h
assert b["id"] == 7 and b["error"]["code"] == -32003, b
assert b["error"]["message"].startswith("deny: mcp_header_mismatch: "), b
assert b["error"]["data"]["reasons"][0]["code"] == "mcp_header_mismatch", b
' "$work/mm.b" "$work/mm.h"
check "Mcp-Name mismatch: nothing reached the server" test "$after" -eq "$before"

# ---------------------------------------------------------------- a tool name sent base64-wrapped
token=$(mint mcp-agent)
cat > "$work/names_agent.py" <<'PY'
import sys, anyio, httpx2
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
async def main(url, token):
    async with httpx2.AsyncClient(headers={"x-uapk-capability": token}, trust_env=False) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            try:
                r = await client.call_tool("résumé", {"id": "T-7"})
                print(f"allow résumé: {r.content[0].text} (protocol {client.protocol_version})")
            except MCPError as e:
                print(f"refused résumé: {e.message}")
anyio.run(main, sys.argv[1], sys.argv[2])
PY
set +e
timeout 60 python3 "$work/names_agent.py" "http://127.0.0.1:$proxy/tickets-names/mcp" "$token" > "$work/names.out" 2>&1
set -e
echo "---- non-ASCII tool name"; sed 's/^/       /' "$work/names.out"
check "non-ASCII tool name (Mcp-Name =?base64?…?=): allowed, the server's answer" \
  grep -q '^allow résumé: résumé of T-7 (protocol 2026-07-28)' "$work/names.out"
# A wrapper that is not canonical base64 is a mismatch, never a guess; nothing reaches the server.
sleep 0.3; before=$(posts "$work/server-names.log")
curl -s -o "$work/mm2.b" "http://127.0.0.1:$proxy/tickets-names/mcp" \
  -H "x-uapk-capability: $token" -H 'content-type: application/json' \
  -H 'accept: application/json, text/event-stream' -H 'mcp-name: =?base64?YR==?=' \
  -d '{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"a","arguments":{}}}'
sleep 0.3
check "malformed =?base64?…?= Mcp-Name: deny mcp_header_mismatch" grep -q '"message":"deny: mcp_header_mismatch: ' "$work/mm2.b"
got=$(( $(posts "$work/server-names.log") - before ))
check "malformed =?base64?…?= Mcp-Name: nothing reached the server (got $got)" test "$got" -eq 0

# ---------------------------------------------------------------- reject mode: approve, then retry with the override
# In the same SDK session: the refund escalates, an approver approves it (admin API), the agent
# fetches its override token on the proxy listener and retries the identical call with
# x-uapk-override set on its http client; once for each protocol generation.
cat > "$work/override_agent.py" <<'PY'
import sys, anyio, httpx2
from mcp import Client, ClientSession, MCPError
from mcp.client.streamable_http import streamable_http_client
url, gateway, admin, admin_key, token, protocol = sys.argv[1:7]
async def flow(session, http):
    args = {"amount": 900, "customer": "cus_123"}
    try:
        await session.call_tool("refund", args)
        print("unexpected: the refund was not escalated"); return
    except MCPError as e:
        approval = e.data["approval_id"]
        print(f"escalated {approval}")
    async with httpx2.AsyncClient(trust_env=False) as h:
        r = await h.post(f"{admin}/v1/approvals/{approval}/approve", json={"note": "ok"},
                         headers={"authorization": f"Bearer {admin_key}"})
        print(f"approve {r.status_code}")
        r = await h.get(f"{gateway}/uapk/v1/approvals/{approval}", headers={"x-uapk-capability": token})
        override = r.json().get("override_token")
        print(f"agent view {r.json().get('status')}")
    http.headers["x-uapk-override"] = override
    try:
        res = await session.call_tool("refund", args)
        print(f"retry allow: {res.content[0].text}")
    except MCPError as e:
        print(f"retry refused: {e.message}")
    finally:
        del http.headers["x-uapk-override"]
async def main():
    async with httpx2.AsyncClient(headers={"x-uapk-capability": token}, trust_env=False) as http:
        if protocol == "legacy":
            async with streamable_http_client(url, http_client=http) as (r, w):
                async with ClientSession(r, w) as session:
                    await session.initialize()
                    await flow(session, http)
        else:
            async with Client(streamable_http_client(url, http_client=http)) as session:
                await flow(session, http)
anyio.run(main)
PY
for protocol in auto legacy; do
  token=$(mint mcp-agent)
  set +e
  timeout 60 python3 "$work/override_agent.py" "http://127.0.0.1:$proxy/tickets/mcp" "http://127.0.0.1:$proxy" \
    "http://127.0.0.1:$admin" "$admin_key" "$token" $protocol > "$work/override.out" 2>&1
  set -e
  echo "---- reject, approve, retry with the override ($protocol)"; sed 's/^/       /' "$work/override.out"
  check "override/$protocol: the retried refund goes through with the server's answer" \
    bash -c "grep -q '^escalated appr-' '$work/override.out' && grep -q '^retry allow: refunded 900.00 USD to cus_123' '$work/override.out'"
done

# ---------------------------------------------------------------- hold mode: approved through the admin API
token=$(mint mcp-hold-agent)
runs+=("hold/base-url/auto $(jti "$token")")
UAPK_TOKEN=$token timeout 90 python3 "$root/examples/mcp/agent.py" \
  --base-url "http://127.0.0.1:$proxy/tickets/mcp" > "$work/hold.out" 2>&1 & held=$!
approval=
for _ in $(seq 300); do
  approval=$(curl -s -H "Authorization: Bearer $admin_key" "http://127.0.0.1:$admin/v1/approvals?status=pending&limit=10" \
    | python3 -c 'import json,sys; a=[x for x in json.load(sys.stdin).get("approvals",[]) if x["agent"]=="mcp-hold-agent"]; print(a[0]["id"] if a else "")' 2>/dev/null || true)
  [ -n "$approval" ] && break
  sleep 0.1
done
check "hold: the held refund is pending approval ($approval)" test -n "$approval"
curl -s -o "$work/approve.json" -X POST -H "Authorization: Bearer $admin_key" \
  "http://127.0.0.1:$admin/v1/approvals/$approval/approve" -d '{"note":"refund approved"}'
set +e; wait "$held"; rc=$?; set -e
echo "---- agent hold/base-url (exit $rc)"; sed 's/^/       /' "$work/hold.out"
check "hold: approved through the admin API" grep -q '"status":"approved"' "$work/approve.json"
check "hold: the held refund completes with the server's answer" \
  grep -q '^allow refund: refunded 900.00 USD to cus_123' "$work/hold.out"
check "hold: the disallowed tool is still refused" grep -q '^refused delete_ticket: .*tool_not_allowed' "$work/hold.out"

# ---------------------------------------------------------------- the log
# Every JSON-RPC request of every run has one decision entry with the right action.
sleep 0.5
runs_file=$work/runs; printf '%s\n' "${runs[@]}" > "$runs_file"
python3 - "$admin" "$admin_key" "$runs_file" "$work/mm.b" > "$work/log-check.out" 2>&1 <<'PY' || true
import json, sys, urllib.request
admin, key, runs_file = sys.argv[1], sys.argv[2], sys.argv[3]
entries, start = [], 0
while True:
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/v1/records?from={start}&limit=1000",
                                 headers={"Authorization": f"Bearer {key}"})
    page = json.load(urllib.request.urlopen(req))["records"]
    entries += page
    if len(page) < 1000:
        break
    start += len(page)
calls = {  # (mcp_method, mcp_name) -> (action, decision)
    ("tools/list", None): ("mcp.session", "allow"),
    ("tools/call", "read_ticket"): ("ticket.read", "allow"),
    ("tools/call", "export_tickets"): ("ticket.export", "allow"),
    ("tools/call", "refund"): ("payment.refund", "escalate"),
    ("tools/call", "delete_ticket"): (None, "deny"),
}
session = {
    "auto": {("server/discover", None): ("mcp.session", "allow")},
    "legacy": {
        ("initialize", None): ("mcp.session", "allow"),
        ("notifications/initialized", None): ("mcp.session", "allow"),
    },
}
failed = 0
for line in open(runs_file):
    name, jti = line.split()
    expected = {**calls, **session[name.rsplit("/", 1)[1]]}
    mine = [e for e in entries if e.get("kind") == "decision" and (e.get("token") or {}).get("jti") == jti]
    rpc = [e for e in mine if e.get("mcp_method")]
    other = [e for e in mine if not e.get("mcp_method")]
    got = {}
    for e in rpc:
        got.setdefault((e["mcp_method"], e.get("mcp_name")), []).append((e.get("action"), e["decision"]))
    problems = []
    for k, want in expected.items():
        w = [want]
        if name.startswith("hold") and k == ("tools/call", "refund"):
            # held (escalate), then allowed once approved: two decision entries
            w = [("payment.refund", "escalate"), ("payment.refund", "allow")]
        if got.get(k) != w:
            problems.append(f"{k}: want {w}, got {got.get(k)}")
    # What the policy read from the refund's arguments, and nothing forwarded for a refusal.
    for e in rpc:
        if e.get("mcp_name") == "refund" and e["params"] != {"amount": "900", "currency": "USD"}:
            problems.append(f"refund params {e['params']}")
        outcomes = [o for o in entries if o.get("kind") == "outcome" and o.get("decision_idx") == e["idx"]]
        if (e["decision"] == "allow") != bool(outcomes):
            problems.append(f"{e['mcp_method']} {e['decision']} with {len(outcomes)} outcome entries")
    for k in got:
        if k not in expected:
            problems.append(f"unexpected JSON-RPC request {k}: {got[k]}")
    # The GET event stream and the session DELETE (session mode) are mcp.session too.
    for e in other:
        if (e.get("method"), e.get("action"), e["decision"]) not in {("GET", "mcp.session", "allow"), ("DELETE", "mcp.session", "allow")}:
            problems.append(f"non-JSON-RPC entry {e.get('method')} {e.get('action')} {e['decision']}")
    summary = ", ".join(f"{m}{'/' + n if n else ''}={v[0][0]}:{v[0][1]}" for (m, n), v in sorted(got.items(), key=str))
    if problems:
        failed += 1
        print(f"FAIL log/{name}: " + "; ".join(problems))
    else:
        print(f"ok   log/{name}: {len(rpc)} JSON-RPC decisions ({summary}); {len(other)} GET/DELETE mcp.session")
# The refused Mcp-Name mismatch: its record (named in the JSON-RPC error) is a deny with the
# reason code, and no outcome entry follows it (nothing was forwarded).
mm_idx = str(json.load(open(sys.argv[4]))["error"]["data"]["record"])
mm = [e for e in entries if e.get("idx") == mm_idx]
forwarded = [e for e in entries if e.get("kind") == "outcome" and e.get("decision_idx") == mm_idx]
if mm and mm[0].get("kind") == "decision" and mm[0]["decision"] == "deny" \
        and mm[0]["reasons"][0]["code"] == "mcp_header_mismatch" and not forwarded \
        and (mm[0].get("mcp_method"), mm[0].get("mcp_name")) == ("tools/call", "refund"):
    print(f"ok   log/mcp-name-mismatch: record {mm_idx} is deny mcp_header_mismatch of tools/call refund, no outcome")
else:
    failed += 1
    print(f"FAIL log/mcp-name-mismatch: record {mm_idx}: {mm} {forwarded}")
PY
cat "$work/log-check.out"
pass=$((pass + $(grep -c '^ok ' "$work/log-check.out" || true)))
fail=$((fail + $(grep -c '^FAIL' "$work/log-check.out" || true)))
grep -q '^\(ok\|FAIL\) ' "$work/log-check.out" || bad "log check did not run"

kill -TERM "$gw"; wait "$gw" || true
if "$bin" verify --db "$work/data/audit.redb" --key "$work/data/gateway.pub.pem" > "$work/verify.out" 2>&1; then
  ok "verify: $(tail -1 "$work/verify.out")"
else
  bad "verify: $(cat "$work/verify.out")"
fi

echo "mcp-sdk-test: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
