#!/usr/bin/env bash
# Two independent verifiers must agree: `uapk-gateway verify --bundle` (Rust) and
# scripts/verify_log_chain.py (Python, written from the public specs and docs/evidence-format.md).
#
# A real gateway writes a real log (decisions, outcomes, an approval, a policy reload, a key
# rotation, restarts); bundles are exported; tampered copies are made (a flipped byte, a dropped
# entry, two swapped, an older checkpoint substituted, a bundle rolled back against a newer
# trusted checkpoint, a bundle re-signed with another key, ...). Both verifiers run on every case;
# the script fails if they ever disagree, if either accepts a tampered bundle, or if either
# refuses a genuine one.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python3 -c "import cryptography" 2>/dev/null || python3 -m pip install -q cryptography
command -v curl >/dev/null || { echo "verifier-agreement: curl is needed" >&2; exit 2; }
cargo build --quiet
bin=$root/target/debug/uapk-gateway
pyv=(python3 "$root/scripts/verify_log_chain.py")

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# ------------------------------------------------------------------ a real log
cat > "$work/upstream.py" <<'PY'
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        n = int(self.headers.get("content-length") or 0); self.rfile.read(n)
        body = json.dumps({"ok": True, "path": self.path}).encode()
        self.send_response(200); self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    do_GET = do_POST = _answer
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
up=$(port); proxy=$(port); admin=$(port)
python3 "$work/upstream.py" "$up" & pids+=($!)
"$bin" keygen --out "$work/issuer.pem" >/dev/null
"$bin" keygen --out "$work/keys/gateway-1.pem" >/dev/null
admin_key=uapk_agreement_admin_key
admin_hash=$(printf %s "$admin_key" | sha256sum | cut -d' ' -f1)
mkdir -p "$work/policies"
manifest() { # cap for USD
  cat <<YAML
apiVersion: uapk/v1
kind: Manifest
agent: { id: pay-agent }
capability:
  issuers:
    - id: platform
      public_key_file: $work/issuer.pub.pem
connectors:
  - name: shop
    base_url: http://127.0.0.1:$up
    hosts: [127.0.0.1]
    ports: [$up]
    routes:
      - { methods: [GET], path: "/v1/charges/**", action: payment.read }
      - methods: [POST]
        path: /v1/refunds
        action: payment.refund
        params:
          amount:   { json: /amount, scale: 2 }
          currency: { json: /currency }
policy:
  amount_caps: { USD: "$1" }
  approval: { amount_above: { USD: "50.00" } }
YAML
}
manifest 100.00 > "$work/policies/pay.yaml"
config() { # gateway key
  cat <<YAML
listeners: { proxy: 127.0.0.1:$proxy, admin: 127.0.0.1:$admin }
policies: $work/policies
data_dir: $work/data
keys: { gateway: $1 }
audit: { origin: agreement.example/log }
network: { allow_private_destinations: [127.0.0.0/8] }
admin:
  keys:
    - { id: auditor, sha256: $admin_hash, role: admin }
YAML
}
config "$work/keys/gateway-1.pem" > "$work/gateway.yaml"
gw=
start() {
  UAPK_LOG=warn "$bin" run -c "$work/gateway.yaml" 2>>"$work/gateway.log" & gw=$!; pids+=($gw)
  for _ in $(seq 200); do curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null && return 0; sleep 0.1; done
  echo "the gateway did not become ready:"; cat "$work/gateway.log"; exit 1
}
stop() { kill -TERM "$gw"; wait "$gw" || true; }
token=$("$bin" token mint --issuer-key "$work/issuer.pem" --iss platform --sub pay-agent --ttl 30m)
traffic() { # n
  for i in $(seq "$1"); do
    curl -s -o /dev/null -H "x-uapk-capability: $token" "http://127.0.0.1:$proxy/shop/v1/charges/c$i"
    curl -s -o /dev/null -H "x-uapk-capability: $token" -H 'content-type: application/json' \
      -d "{\"amount\": $((i * 3)), \"currency\": \"USD\"}" "http://127.0.0.1:$proxy/shop/v1/refunds"
    curl -s -o /dev/null -H "x-uapk-capability: $token" "http://127.0.0.1:$proxy/shop/v1/nope"
  done
}

start
traffic 6
# An escalation, approved by a human; the agent retries with its override token.
curl -s -H "x-uapk-capability: $token" -H 'content-type: application/json' \
  -d '{"amount": 7500, "currency": "USD"}' "http://127.0.0.1:$proxy/shop/v1/refunds" > "$work/escalated.json"
appr=$(grep -Eo 'appr-[0-9a-f]{24}' "$work/escalated.json" | head -1 || true)
[ -n "$appr" ] || { echo "no approval id in: $(cat "$work/escalated.json")"; exit 1; }
curl -sf -X POST -H "Authorization: Bearer $admin_key" -d '{"note":"agreed"}' \
  "http://127.0.0.1:$admin/v1/approvals/$appr/approve" > "$work/approved.json"
override=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("override_token") or d.get("token") or "")' "$work/approved.json")
if [ -n "$override" ]; then
  curl -s -o /dev/null -H "x-uapk-capability: $token" -H "x-uapk-override: $override" -H 'content-type: application/json' \
    -d '{"amount": 7500, "currency": "USD"}' "http://127.0.0.1:$proxy/shop/v1/refunds"
fi
# A policy reload (SIGHUP after a change).
manifest 90.00 > "$work/policies/pay.yaml"
kill -HUP "$gw"; sleep 1.2
traffic 3
curl -sf -H "Authorization: Bearer $admin_key" "http://127.0.0.1:$admin/v1/checkpoint" > "$work/before-rotation.cp"
stop

# A key rotation: the old key announces the new one; the gateway then signs with the new key.
"$bin" keygen --out "$work/keys/gateway-2.pem" >/dev/null
"$bin" rotate-key -c "$work/gateway.yaml" --new-key "$work/keys/gateway-2.pem" >/dev/null
config "$work/keys/gateway-2.pem" > "$work/gateway.yaml"
start
traffic 4
curl -sf -H "Authorization: Bearer $admin_key" "http://127.0.0.1:$admin/v1/checkpoint" > "$work/after-rotation.cp"
traffic 2 & busy=$!
# An export of the live log through the admin API (POST /v1/export) while requests arrive.
UAPK_ADMIN_KEY=$admin_key "$bin" export --admin "http://127.0.0.1:$admin" --out "$work/live" >/dev/null
wait "$busy"
stop

key1=$work/keys/gateway-1.pub.pem; key2=$work/keys/gateway-2.pub.pem
kinds=$("$bin" export -c "$work/gateway.yaml" --out "$work/full" >/dev/null && python3 -c '
import json, sys
print(" ".join(sorted({json.loads(l)["kind"] for l in open(sys.argv[1])})))' "$work/full/entries.jsonl")
echo "log: $(wc -l < "$work/full/entries.jsonl") entries of kinds: $kinds"
for k in decision outcome approval config startup key; do
  case " $kinds " in *" $k "*) ;; *) echo "the log has no $k entry"; exit 1 ;; esac
done
old_size=$(sed -n 2p "$work/before-rotation.cp")
"$bin" export -c "$work/gateway.yaml" --out "$work/old" --to "$old_size" >/dev/null
"$bin" export -c "$work/gateway.yaml" --out "$work/tail" --from "$((old_size + 3))" >/dev/null
"$bin" export -c "$work/gateway.yaml" --out "$work/middle" --from 5 --to "$((old_size - 4))" >/dev/null

# ------------------------------------------------------------------ tampered copies
# tamper.py CASE SRC DST: copies the bundle and changes it. "resign" re-signs manifest.json with
# the real current gateway key (an insider who holds the key but cannot rewrite signed history);
# "foreign" re-signs checkpoint and manifest with a key of their own.
cat > "$work/tamper.py" <<'PY'
import base64, hashlib, json, os, shutil, sys
sys.path.insert(0, os.environ["SCRIPTS"])
import verify_log_chain as v
from cryptography.hazmat.primitives.serialization import load_pem_private_key, Encoding, PublicFormat
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

case, src, dst, real_key = sys.argv[1:5]
shutil.copytree(src, dst)
p = lambda n: os.path.join(dst, n)
lines = open(p("entries.jsonl"), "rb").read().split(b"\n")[:-1]

def write_entries(ls):
    open(p("entries.jsonl"), "wb").write(b"".join(l + b"\n" for l in ls))

def sign_manifest(key):
    m = json.load(open(p("manifest.json")))
    for n in v.BUNDLE_FILES:
        m["files"][n] = hashlib.sha256(open(p(n), "rb").read()).hexdigest()
    raw = (json.dumps(m, indent=2) + "\n").encode()
    open(p("manifest.json"), "wb").write(raw)
    sig = key.sign(v.MANIFEST_CONTEXT + raw)
    open(p("manifest.json.sig"), "w").write(base64.b64encode(sig).decode() + "\n")

def sign_note(origin, size, root, key):
    body = "%s\n%d\n%s\n" % (origin, size, base64.b64encode(root).decode())
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = v.key_id(origin, pub) + key.sign(body.encode())
    return body + "\n\u2014 %s %s\n" % (origin, base64.b64encode(blob).decode())

real = load_pem_private_key(open(real_key, "rb").read(), None)
mid = len(lines) // 2
if case == "flip-byte":
    b = bytearray(lines[mid]); b[len(b) // 2] ^= 0x01; lines[mid] = bytes(b); write_entries(lines)
elif case == "flip-byte-resigned":
    b = bytearray(lines[mid]); b[len(b) // 2] ^= 0x01; lines[mid] = bytes(b); write_entries(lines); sign_manifest(real)
elif case == "drop-entry":
    del lines[mid]; write_entries(lines); sign_manifest(real)
elif case == "drop-last-entry":
    del lines[-1]; write_entries(lines); sign_manifest(real)
elif case == "swap-entries":
    lines[mid], lines[mid + 1] = lines[mid + 1], lines[mid]; write_entries(lines); sign_manifest(real)
elif case == "older-checkpoint":
    shutil.copy(os.environ["OLD_CP"], p("checkpoint")); sign_manifest(real)
elif case == "checkpoint-no-final-newline":
    t = open(p("checkpoint")).read(); open(p("checkpoint"), "w").write(t[:-1]); sign_manifest(real)
elif case == "duplicate-entry":
    lines.insert(mid, lines[mid]); write_entries(lines); sign_manifest(real)
elif case == "prefix-altered":
    d = json.load(open(p("prefix.json"))); d["last_leaf"] = "11" * 32
    open(p("prefix.json"), "w").write(json.dumps(d, indent=2)); sign_manifest(real)
elif case == "prefix-frontier-altered":
    d = json.load(open(p("prefix.json"))); f = d["frontier"]
    d["frontier"] = f[:-1] + ("0" if f[-1] != "0" else "1")
    open(p("prefix.json"), "w").write(json.dumps(d, indent=2)); sign_manifest(real)
elif case == "manifest-unsigned-context":
    raw = open(p("manifest.json"), "rb").read()
    open(p("manifest.json.sig"), "w").write(base64.b64encode(real.sign(raw)).decode() + "\n")
elif case == "foreign-resigned":
    foreign = Ed25519PrivateKey.generate()
    last = json.loads(lines[-1]); last["ts"] = "1999-01-01T00:00:00.000000Z"
    lines[-1] = json.dumps(last, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    write_entries(lines)
    cp = v.parse_unverified(open(p("checkpoint")).read())
    f = v.Frontier.from_bytes(bytes.fromhex(json.load(open(p("prefix.json")))["frontier"]))
    for l in lines:
        f.push(v.leaf_hash(l))
    open(p("checkpoint"), "w").write(sign_note(cp["origin"], f.size, f.root(), foreign))
    pem = foreign.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    open(p("gateway.pub.pem"), "wb").write(pem)
    sign_manifest(foreign)
elif case == "forged-trusted":
    # Not a bundle change: a "newer" trusted checkpoint signed by someone else (see below).
    cp = v.parse_unverified(open(p("checkpoint")).read())
    open(os.path.join(os.path.dirname(dst), "forged.cp"), "w").write(
        sign_note(cp["origin"], cp["size"] + 10, cp["root"], Ed25519PrivateKey.generate()))
else:
    sys.exit("unknown case " + case)
PY

pass=0; fail=0
# check NAME EXPECTED-EXIT BUNDLE [verifier args...]: both verifiers, same exit code, as expected.
check() {
  local name=$1 want=$2 bundle=$3; shift 3
  set +e
  "$bin" verify --bundle "$bundle" "$@" > "$work/rs.out" 2> "$work/rs.err"; local rs=$?
  "${pyv[@]}" --bundle "$bundle" "$@" > "$work/py.out" 2> "$work/py.err"; local py=$?
  set -e
  if [ "$rs" -eq "$want" ] && [ "$py" -eq "$want" ]; then
    pass=$((pass + 1)); printf 'ok   %-34s exit %d  rust: %s\n%-46s python: %s\n' "$name" "$rs" \
      "$(cat "$work/rs.out" "$work/rs.err" | head -1)" "" "$(cat "$work/py.out" "$work/py.err" | head -1)"
  else
    fail=$((fail + 1)); printf 'FAIL %-34s want %d, rust %d, python %d\n' "$name" "$want" "$rs" "$py"
    sed 's/^/     rust:   /' "$work/rs.out" "$work/rs.err"; sed 's/^/     python: /' "$work/py.out" "$work/py.err"
  fi
}

real2=$work/keys/gateway-2.pem
export SCRIPTS=$root/scripts OLD_CP=$work/before-rotation.cp
for c in flip-byte flip-byte-resigned drop-entry drop-last-entry swap-entries older-checkpoint \
         checkpoint-no-final-newline duplicate-entry prefix-altered manifest-unsigned-context foreign-resigned; do
  python3 "$work/tamper.py" "$c" "$work/full" "$work/t-$c" "$real2"
done
python3 "$work/tamper.py" prefix-altered "$work/tail" "$work/t-tail-prefix-altered" "$real2"
python3 "$work/tamper.py" prefix-frontier-altered "$work/tail" "$work/t-tail-frontier-altered" "$real2"
python3 "$work/tamper.py" forged-trusted "$work/full" "$work/t-unused" "$real2"
printf 'not a checkpoint\n' > "$work/garbage.cp"

echo "== genuine bundles: both must accept"
check "full, from the original key" 0 "$work/full" --key "$key1"
check "full, trusted pre-rotation cp" 0 "$work/full" --key "$key1" --trusted-checkpoint "$work/before-rotation.cp"
check "full, trusted post-rotation cp" 0 "$work/full" --key "$key1" --trusted-checkpoint "$work/after-rotation.cp"
# A range before the rotation, exported after it: its checkpoint is the old key's, its manifest
# the exporting (new) key's, so the auditor trusts both.
check "older export alone" 0 "$work/old" --key "$key1" --key "$key2"
check "middle range" 0 "$work/middle" --key "$key1" --key "$key2"
check "older export, old key only" 1 "$work/old" --key "$key1"
check "tail after the rotation (new key)" 0 "$work/tail" --key "$key2"
check "live export via the admin API" 0 "$work/live" --key "$key1" --trusted-checkpoint "$work/after-rotation.cp"

echo "== tampered bundles and wrong trust: both must refuse (1), I/O and usage: 2"
for c in flip-byte flip-byte-resigned drop-entry drop-last-entry swap-entries older-checkpoint \
         checkpoint-no-final-newline duplicate-entry prefix-altered manifest-unsigned-context; do
  check "$c" 1 "$work/t-$c" --key "$key1"
done
check "tail prefix altered" 1 "$work/t-tail-prefix-altered" --key "$key2"
check "tail frontier altered" 1 "$work/t-tail-frontier-altered" --key "$key2"
check "foreign re-signed, real key" 1 "$work/t-foreign-resigned" --key "$key1"
check "foreign re-signed, real new key" 1 "$work/t-foreign-resigned" --key "$key2"
check "rolled back vs newer trusted cp" 1 "$work/old" --key "$key1" --key "$key2" --trusted-checkpoint "$work/after-rotation.cp"
check "forged newer trusted cp" 1 "$work/full" --key "$key1" --trusted-checkpoint "$work/forged.cp"
check "garbage trusted cp" 1 "$work/full" --key "$key1" --trusted-checkpoint "$work/garbage.cp"
check "tail after trusted size" 1 "$work/tail" --key "$key2" --trusted-checkpoint "$work/before-rotation.cp"
check "new key only, from entry 0" 1 "$work/full" --key "$key2"
check "wrong key" 1 "$work/full" --key "$work/issuer.pub.pem"
check "no such bundle" 2 "$work/nowhere" --key "$key1"
check "no --key" 2 "$work/full"

# VERIFIER_AGREEMENT_KEEP=DIR keeps a copy of the genuine bundles and keys for inspection.
if [ -n "${VERIFIER_AGREEMENT_KEEP:-}" ]; then
  mkdir -p "$VERIFIER_AGREEMENT_KEEP"
  cp -r "$work/full" "$work/old" "$work/tail" "$work/before-rotation.cp" "$work/after-rotation.cp" "$key1" "$key2" \
    "$VERIFIER_AGREEMENT_KEEP/"
fi
echo "verifier-agreement: $pass agreed, $fail failed"
[ "$fail" -eq 0 ]
