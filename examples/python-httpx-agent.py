"""An agent written with httpx (the client under the OpenAI and Anthropic SDKs). httpx reads
HTTPS_PROXY and SSL_CERT_FILE from the environment (trust_env=True)."""
import os
import sys

import httpx

api = os.environ["UAPK_UPSTREAM"]
ok = True
with httpx.Client(timeout=10) as client:
    r = client.get(f"{api}/v1/items/1")
    print("allow", r.status_code, r.text) if r.status_code == 200 else print("unexpected", r.status_code, r.text)
    ok &= r.status_code == 200

    r = client.get(f"{api}/v1/admin/users")
    print("deny", r.status_code, r.json()["reasons"][0]["code"])
    ok &= r.status_code == 403 and r.json()["decision"] == "deny"

    # Stripe-style APIs take form-encoded bodies (data=), as the gateway reads them.
    r = client.post(f"{api}/v1/refunds", data={"amount": 9000, "currency": "usd", "customer": "cus_42"})
    print("escalate", r.status_code, r.json().get("approval_id"))
    ok &= r.status_code == 403 and r.json()["decision"] == "escalate"

sys.exit(0 if ok else 1)
