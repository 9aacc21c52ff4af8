#!/usr/bin/env bash
# The operator page in a real headless browser: a real gateway (hold mode), a real upstream, a
# real escalated request whose body carries <script>, signed-in approver and viewer sessions.
# Saves a screenshot to target/ui/operator-page.png. Needs root only to install chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
(cd tests/ui && npm ci --no-audit --no-fund --silent)
cargo build --quiet
bin=$root/target/debug/uapk-gateway

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port=$(port); proxy_port=$(port); admin_port=$(port)

# Upstream: answers every request with a small JSON body.
python3 - "$up_port" >/dev/null 2>&1 <<'PY' &
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def _ok(self):
        n = int(self.headers.get("content-length") or 0); self.rfile.read(n)
        body = b'{"refunded": true}'
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = _ok
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
pids+=($!)

mkdir -p "$work/policies" "$work/data"
"$bin" keygen --out "$work/issuer.pem" >/dev/null
approver_key="uapk_ui_approver_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
viewer_key="uapk_ui_viewer_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
cat > "$work/policies/ui.yaml" <<YAML
apiVersion: uapk/v1
kind: Manifest
agent: { id: ui-agent }
capability:
  issuers:
    - id: platform
      public_key_file: $work/issuer.pub.pem
connectors:
  - name: pay
    base_url: http://127.0.0.1:$up_port
    routes:
      - methods: [POST]
        path: /v1/refunds
        action: payment.refund
        params:
          amount:       { json: /amount, scale: 2 }
          currency:     { json: /currency }
          counterparty: { json: /customer }
policy:
  amount_caps: { USD: "500.00" }
  approval: { amount_above: { USD: "50.00" } }
escalation: { mode: hold, hold_timeout: 90s }
YAML
cat > "$work/gateway.yaml" <<YAML
listeners: { proxy: 127.0.0.1:$proxy_port, admin: 127.0.0.1:$admin_port }
policies: $work/policies
data_dir: $work/data
network: { allow_private_destinations: [127.0.0.0/8] }
admin:
  keys:
    - { id: compliance-officer, sha256: $(sha "$approver_key"), role: approver }
    - { id: auditor, sha256: $(sha "$viewer_key"), role: viewer }
YAML
UAPK_LOG=warn "$bin" run -c "$work/gateway.yaml" 2>"$work/gateway.log" &
pids+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null && break; sleep 0.1; done

token=$("$bin" token mint --issuer-key "$work/issuer.pem" --iss platform --sub ui-agent --ttl 10m)
refund() { # amount → a held request whose customer is agent-supplied markup
  curl -s -o "$work/held-$1.body" -w '%{http_code}' -m 120 -X POST "http://127.0.0.1:$proxy_port/pay/v1/refunds" \
    -H "x-uapk-capability: $token" -H 'content-type: application/json' -H 'stripe-account: acct_ui' \
    -d "{\"amount\": $1, \"currency\": \"USD\", \"customer\": \"<script>alert(1)</script>\"}" > "$work/held-$1.status"
}
refund 6000 & held=$!
refund 7000 & pids+=($!)

mkdir -p target/ui
ADMIN_URL="http://127.0.0.1:$admin_port" APPROVER_KEY="$approver_key" VIEWER_KEY="$viewer_key" \
  SCREENSHOT="$root/target/ui/operator-page.png" node tests/ui/operator-page.mjs

wait "$held"
status=$(cat "$work/held-6000.status")
if [ "$status" != "200" ]; then
  echo "the held request approved in the browser answered $status: $(cat "$work/held-6000.body")" >&2
  echo "ui-test: 0 passed, 1 failed"; exit 1
fi
grep -q refunded "$work/held-6000.body"
echo "held request released by the browser approval: 200 $(cat "$work/held-6000.body")"
echo "screenshot: target/ui/operator-page.png"
echo "ui-test: 1 passed, 0 failed"
