// An agent written with Node's fetch. Node >= 24 honours HTTP(S)_PROXY itself with
// NODE_USE_ENV_PROXY=1; on older Node, undici's EnvHttpProxyAgent reads the same variables.
// The gateway CA comes from NODE_EXTRA_CA_CERTS.
import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";

const major = Number(process.versions.node.split(".")[0]);
if (major < 24 && (process.env.HTTPS_PROXY || process.env.https_proxy)) {
  setGlobalDispatcher(new EnvHttpProxyAgent());
}
const api = process.env.UAPK_UPSTREAM;
let ok = true;

let r = await fetch(`${api}/v1/items/1`);
const text = await r.text();
console.log(r.status === 200 ? "allow" : "unexpected", r.status, text);
ok &&= r.status === 200;

r = await fetch(`${api}/v1/admin/users`);
let j = await r.json();
console.log("deny", r.status, j.reasons[0].code);
ok &&= r.status === 403 && j.decision === "deny";

// Stripe-style APIs take form-encoded bodies: URLSearchParams sends
// application/x-www-form-urlencoded;charset=UTF-8.
r = await fetch(`${api}/v1/refunds`, {
  method: "POST",
  body: new URLSearchParams({ amount: "9000", currency: "usd", customer: "cus_42" }),
});
j = await r.json();
console.log("escalate", r.status, j.approval_id);
ok &&= r.status === 403 && j.decision === "escalate";

process.exit(ok ? 0 : 1);
