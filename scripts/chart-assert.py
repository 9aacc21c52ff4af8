"""Assertions on a rendered chart: what only the iptables init container may do, how policies
and secrets are mounted, the restricted security context of the gateway, and the NetworkPolicy
(on by default; DNS only to the cluster DNS selector; no UDP but DNS; every egress rule names
its ports; ingress only to the admin port, only from listed peers)."""
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
# Policies, issuer keys and credentials: one directory (no subPath), the manifests' relative
# paths (keys/<file>, secrets/<key>) laid out as the values ask, credentials for the gateway only.
ci = yaml.safe_load(open(f"helm/ci/{name}.yaml")) or {}
pol = volumes.get("uapk-policies", {})
sources = (pol.get("projected") or {}).get("sources") or []
paths = [i["path"] for s in sources for src in s.values() for i in (src.get("items") or [])]
for f in (ci.get("issuerKeys") or {}).get("files") or []:
    if f"keys/{f}" not in paths:
        problems.append(f"issuer key {f} is not mounted at keys/{f} beside the manifests")
for secret, keys in (ci.get("credentials") or {}).items():
    for k in keys:
        if f"secrets/{k}" not in paths:
            problems.append(f"credential {secret}/{k} is not mounted at secrets/{k} beside the manifests")
if not any("configMap" in s for s in sources):
    problems.append("the policies directory does not project the manifests' ConfigMap")
for c in every:
    if c is not gateway and any(m["name"] == "uapk-policies" for m in c.get("volumeMounts", [])):
        problems.append(f"{c['name']} mounts the policies directory (credentials live there)")
cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
for fname, manifest in (ci.get("policies") or {}).items():
    data = next((d.get("data", {}) for d in cms.values() if fname in d.get("data", {})), None)
    if data is None:
        problems.append(f"policy {fname} is in no ConfigMap")
    elif (yaml.safe_load(data[fname]) if isinstance(manifest, str) else None) != (yaml.safe_load(manifest) if isinstance(manifest, str) else None):
        problems.append(f"policy {fname} given as text is not carried unchanged")
    elif not isinstance(manifest, str) and yaml.safe_load(data[fname]) != manifest:
        problems.append(f"policy {fname} given as a mapping is not carried unchanged")
if gateway.get("startupProbe", {}).get("httpGet", {}).get("path") != "/readyz":
    problems.append("gateway startupProbe is not /readyz")

# The NetworkPolicy: on by default, and unless these values turn it off it must be rendered.
ADMIN_PORT = 15021
defaults = yaml.safe_load(open("helm/uapk-gateway/values.yaml"))
if defaults.get("networkPolicy", {}).get("enabled") is not True:
    problems.append("networkPolicy is not enabled by default")
ci_values = yaml.safe_load(open(f"helm/ci/{name}.yaml")) or {}
np_enabled = (ci_values.get("networkPolicy") or {}).get("enabled", defaults["networkPolicy"]["enabled"])
policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
if np_enabled and len(policies) != 1:
    problems.append(f"networkPolicy enabled but {len(policies)} NetworkPolicy objects rendered")
pod_labels = deploy["spec"]["template"]["metadata"]["labels"]

def covers_53(port):
    p, end = port.get("port"), port.get("endPort")
    if p is None:
        return True  # no port: every port
    if isinstance(p, str):
        return p in ("dns", "dns-tcp", "domain")
    return p <= 53 <= (end or p)

def is_dns_peer(peer):
    return bool(peer.get("namespaceSelector")) and bool(peer.get("podSelector")) and "ipBlock" not in peer

for np in policies:
    spec_np = np["spec"]
    selector = spec_np.get("podSelector", {}).get("matchLabels", {})
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        problems.append("the NetworkPolicy does not select the gateway's pod")
    if sorted(spec_np.get("policyTypes", [])) != ["Egress", "Ingress"]:
        problems.append(f"NetworkPolicy policyTypes {spec_np.get('policyTypes')} (want Ingress and Egress)")
    egress = spec_np.get("egress")
    if egress is None:
        problems.append("NetworkPolicy without egress rules")
        egress = []
    dns_rules = 0
    for rule in egress:
        ports = rule.get("ports")
        peers = rule.get("to") or []
        if not ports:
            problems.append(f"egress rule without ports (every protocol and port): {rule}")
            continue
        for port in ports:
            proto = port.get("protocol", "TCP")
            if proto not in ("TCP", "UDP"):
                problems.append(f"egress {proto} allowed: {rule}")
            if proto == "UDP" and not covers_53(port):
                problems.append(f"UDP egress other than DNS: {port}")
            if (proto == "UDP" or covers_53(port)) and (port.get("port") != 53 or port.get("endPort")):
                problems.append(f"egress port range or name covering DNS: {port}")
            if covers_53(port) and (not peers or not all(is_dns_peer(p) for p in peers)):
                problems.append(f"port 53 allowed without the cluster DNS selector: {rule}")
        if any(covers_53(p) for p in ports):
            dns_rules += 1
    if dns_rules != 1:
        problems.append(f"{dns_rules} DNS egress rules (want exactly one, to the cluster DNS)")
    ingress = spec_np.get("ingress")
    if ingress is None:
        problems.append("NetworkPolicy ingress is missing (with policyTypes Ingress, say [] for none)")
        ingress = []
    for rule in ingress:
        if not rule.get("from"):
            problems.append(f"ingress rule open to every peer: {rule}")
        ports = rule.get("ports") or []
        if not ports or any(p.get("port") not in (ADMIN_PORT, "admin") or p.get("endPort") for p in ports):
            problems.append(f"ingress beyond the admin port: {rule}")
    admin = (ci_values.get("networkPolicy") or {}).get("admin") or {}
    wanted = len(admin.get("cidrs") or []) + len(admin.get("from") or []) + (1 if admin.get("operatorNamespaceSelector") else 0)
    got = sum(len(r.get("from") or []) for r in ingress)
    if got != wanted:
        problems.append(f"admin ingress has {got} peers, the values list {wanted}")

for p in problems:
    print(f"  {name}: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
