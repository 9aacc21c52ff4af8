"""Assertions on a rendered chart: what only the iptables init container may do, how policies
and secrets are mounted, and the restricted security context of the gateway."""
import sys
import yaml

path, name = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
deploy = next(d for d in docs if d["kind"] == "Deployment")
spec = deploy["spec"]["template"]["spec"]
inits = spec.get("initContainers", [])
containers = spec["containers"]
every = inits + containers
gateway = next(c for c in every if c["name"] == "uapk-gateway")
agent = next(c for c in containers if c["name"] != "uapk-gateway")
volumes = {v["name"]: v for v in spec["volumes"]}
problems = []

def caps(c):
    return set(((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or [])

for c in every:
    if caps(c) & {"NET_ADMIN", "NET_RAW"} and c["name"] != "uapk-init-iptables":
        problems.append(f"{c['name']} has NET_ADMIN/NET_RAW")
for c in every:
    for m in c.get("volumeMounts", []):
        if m["name"] == "uapk-policies" and "subPath" in m:
            problems.append(f"{c['name']} mounts the policies with subPath (breaks hot reload)")
        if "subPath" in m:
            problems.append(f"{c['name']} uses subPath for {m['name']}")
sc = gateway["securityContext"]
for key, want in [("runAsNonRoot", True), ("readOnlyRootFilesystem", True), ("allowPrivilegeEscalation", False)]:
    if sc.get(key) != want:
        problems.append(f"gateway securityContext.{key} is {sc.get(key)}")
if sc.get("capabilities", {}).get("drop") != ["ALL"]:
    problems.append("gateway does not drop ALL capabilities")
if sc.get("runAsUser") == agent["securityContext"].get("runAsUser"):
    problems.append("agent UID equals the gateway UID")
for m in agent.get("volumeMounts", []):
    v = volumes[m["name"]]
    secret = v.get("secret")
    if secret and [i["key"] for i in secret.get("items", [])] != ["ca.pem"]:
        problems.append(f"agent mounts secret {secret['secretName']} beyond ca.pem")
    if m["name"] in ("uapk-ca", "uapk-gateway-key", "uapk-credentials"):
        problems.append(f"agent mounts {m['name']}")
env = {e["name"]: e.get("value") for e in agent.get("env", [])}
if "secretName" in str(volumes.get("uapk-ca-cert", "")):
    for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        if env.get(k) != "/etc/uapk-ca/ca.pem":
            problems.append(f"agent {k} is {env.get(k)}")
explicit = "mode: explicit" in open(f"helm/ci/{name}.yaml").read()
if explicit:
    for k in ("HTTP_PROXY", "HTTPS_PROXY"):
        if env.get(k) != "http://127.0.0.1:15080":
            problems.append(f"explicit mode without {k}")
    if any(c["name"] == "uapk-init-iptables" for c in inits):
        problems.append("explicit mode renders the iptables init container")
else:
    if not any(c["name"] == "uapk-init-iptables" for c in inits):
        problems.append("transparent mode without the iptables init container")
    if "HTTPS_PROXY" in env:
        problems.append("transparent mode sets proxy variables")
    order = [c["name"] for c in inits]
    if "uapk-gateway" in order and order.index("uapk-init-iptables") > order.index("uapk-gateway"):
        problems.append("the iptables init container must run before the gateway sidecar")
if gateway.get("startupProbe", {}).get("httpGet", {}).get("path") != "/readyz":
    problems.append("gateway startupProbe is not /readyz")
for p in problems:
    print(f"  {name}: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
