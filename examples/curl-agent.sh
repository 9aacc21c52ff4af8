#!/usr/bin/env bash
# An agent written with curl. It knows nothing of the gateway: in explicit mode curl reads
# HTTPS_PROXY (token in the proxy URL's password) and trusts the gateway CA via CURL_CA_BUNDLE; in
# transparent mode the pod's iptables rules send it to the gateway anyway.
set -euo pipefail
api=${UAPK_UPSTREAM:?set UAPK_UPSTREAM, e.g. https://api.test}
fail=0

body=$(curl -sS -w '\n%{http_code}' "$api/v1/items/1")
status=${body##*$'\n'}; body=${body%$'\n'*}
[ "$status" = 200 ] && echo "allow $status $body" || { echo "unexpected: $status $body"; fail=1; }

body=$(curl -sS -w '\n%{http_code}' "$api/v1/admin/users")
status=${body##*$'\n'}; body=${body%$'\n'*}
code=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["reasons"][0]["code"])' "$body" 2>/dev/null || true)
[ "$status" = 403 ] && echo "deny $status $code" || { echo "unexpected: $status $body"; fail=1; }

# Stripe-style APIs take form-encoded bodies: curl -d sends application/x-www-form-urlencoded.
body=$(curl -sS -w '\n%{http_code}' -X POST "$api/v1/refunds" -d amount=9000 -d currency=usd -d customer=cus_42)
status=${body##*$'\n'}; body=${body%$'\n'*}
id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("approval_id",""))' "$body" 2>/dev/null || true)
[ "$status" = 403 ] && [ -n "$id" ] && echo "escalate $status $id" || { echo "unexpected: $status $body"; fail=1; }
exit $fail
