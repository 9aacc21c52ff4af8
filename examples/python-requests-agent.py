"""An agent written with requests. requests reads HTTPS_PROXY and REQUESTS_CA_BUNDLE from the
environment, so the same code runs with the gateway as explicit proxy or transparently."""
import os
import sys

import requests

api = os.environ["UAPK_UPSTREAM"]
ok = True

r = requests.get(f"{api}/v1/items/1", timeout=10)
print("allow", r.status_code, r.text) if r.status_code == 200 else print("unexpected", r.status_code, r.text)
ok &= r.status_code == 200

r = requests.get(f"{api}/v1/admin/users", timeout=10)
print("deny", r.status_code, r.json()["reasons"][0]["code"])
ok &= r.status_code == 403 and r.json()["decision"] == "deny"

# Stripe-style APIs take form-encoded bodies (data=), as the gateway reads them.
r = requests.post(f"{api}/v1/refunds", data={"amount": 9000, "currency": "usd", "customer": "cus_42"}, timeout=10)
approval = r.json().get("approval_id")
print("escalate", r.status_code, approval)
ok &= r.status_code == 403 and r.json()["decision"] == "escalate"

# An agent in reject mode asks the gateway itself how its approval stands (with its own token, not
# through the proxy); once approved the answer carries the override token to retry with, in the
# x-uapk-override header.
gateway, token = os.environ.get("UAPK_GATEWAY"), os.environ.get("UAPK_TOKEN")
if gateway and token and approval:
    direct = requests.Session()
    direct.trust_env = False  # the gateway's own API is not reached through the proxy
    s = direct.get(f"{gateway}/uapk/v1/approvals/{approval}", headers={"x-uapk-capability": token}, timeout=10)
    print("approval", s.status_code, s.json().get("status"))
    ok &= s.status_code == 200 and s.json()["status"] == "pending" and "override_token" not in s.json()

sys.exit(0 if ok else 1)
