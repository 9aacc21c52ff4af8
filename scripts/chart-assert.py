"""Assertions on a rendered chart: what only the iptables init container may do, how policies
and secrets are mounted, the restricted security context of the gateway, the NetworkPolicy
(on by default; DNS only to the cluster DNS selector; no UDP but DNS; every egress rule names
its ports; ingress only to the admin port from listed peers, and in egress-gateway mode the proxy
port from the agents), the Pod Security level each mode meets, ports and UID clear of Istio's,
the upgrade strategy, the PodDisruptionBudget, the Service and the agents' NetworkPolicy, the
pod-level knobs, the state backends (embedded or PostgreSQL, local or Redis rate limits: the URL
Secrets mounted read-only as the files gateway.yaml reads, for the gateway only; no redb volume
with PostgreSQL; the egress rules to the engines) and the NOTES (third argument, optional)."""
import copy
import sys
import yaml

path, name = sys.argv[1], sys.argv[2]
notes = open(sys.argv[3]).read() if len(sys.argv) > 3 else None
docs = [d for d in yaml.safe_load_all(open(path)) if d]
problems = []


def merged(base, over):
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


defaults = yaml.safe_load(open("helm/uapk-gateway/values.yaml"))
ci_values = yaml.safe_load(open(f"helm/ci/{name}.yaml")) or {}
values = merged(defaults, ci_values)
mode = values["mode"]


def pod_containers(d):
    s = d["spec"]["template"]["spec"]
    return s.get("initContainers", []) + s["containers"]


deployments = [d for d in docs if d["kind"] == "Deployment"]
deploy = next(d for d in deployments if any(c["name"] == "uapk-gateway" for c in pod_containers(d)))
spec = deploy["spec"]["template"]["spec"]
inits = spec.get("initContainers", [])
containers = spec["containers"]
every = inits + containers
gateway = next(c for c in every if c["name"] == "uapk-gateway")
if mode == "egress-gateway":
    agent_deploys = [d for d in deployments if d is not deploy]
    if values["agent"]["enabled"] and len(agent_deploys) != 1:
        problems.append(f"egress-gateway mode renders {len(agent_deploys)} agent Deployments (want 1)")
    agent_pod = agent_deploys[0]["spec"]["template"]["spec"] if agent_deploys else {"containers": []}
    agent = next(iter(agent_pod["containers"]), None)
    if len(containers) != 1 or inits:
        problems.append("the egress gateway's pod holds more than the gateway")
else:
    agent_pod = spec
    agent = next(c for c in containers if c["name"] != "uapk-gateway")
volumes = {v["name"]: v for v in spec["volumes"]}
agent_volumes = {v["name"]: v for v in agent_pod.get("volumes", [])}

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
if agent is None:
    agent = {"name": "-", "securityContext": {}}
if sc.get("runAsUser") == agent["securityContext"].get("runAsUser"):
    problems.append("agent UID equals the gateway UID")
for m in agent.get("volumeMounts", []):
    v = agent_volumes[m["name"]]
    secret = v.get("secret")
    if secret and [i["key"] for i in secret.get("items", [])] != ["ca.pem"]:
        problems.append(f"agent mounts secret {secret['secretName']} beyond ca.pem")
    if m["name"] in ("uapk-ca", "uapk-gateway-key", "uapk-credentials", "uapk-state"):
        problems.append(f"agent mounts {m['name']}")
env = {e["name"]: e.get("value") for e in agent.get("env", [])}
if "secretName" in str(agent_volumes.get("uapk-ca-cert", "")):
    for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        if env.get(k) != "/etc/uapk-ca/ca.pem":
            problems.append(f"agent {k} is {env.get(k)}")
vports = values["ports"]
if mode in ("explicit", "egress-gateway"):
    want_proxy = f"http://127.0.0.1:{vports['proxy']}"
    if mode == "egress-gateway":
        want_proxy = f"http://{values['service']['name']}.default.svc:{vports['proxy']}"
    for k in ("HTTP_PROXY", "HTTPS_PROXY"):
        if values["agent"]["enabled"] and env.get(k) != want_proxy:
            problems.append(f"{mode} mode: agent {k} is {env.get(k)}, want {want_proxy}")
    if any(c["name"] == "uapk-init-iptables" for c in inits):
        problems.append(f"{mode} mode renders the iptables init container")
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
ADMIN_PORT = vports["admin"]
if defaults.get("networkPolicy", {}).get("enabled") is not True:
    problems.append("networkPolicy is not enabled by default")
np_enabled = values["networkPolicy"]["enabled"]
all_policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
agent_policies = [d for d in all_policies if d["metadata"]["name"].endswith("-agents")]
policies = [d for d in all_policies if d not in agent_policies]
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
    proxy_rules = []
    for rule in ingress:
        if not rule.get("from"):
            problems.append(f"ingress rule open to every peer: {rule}")
        rports = rule.get("ports") or []
        if mode == "egress-gateway" and [p.get("port") for p in rports] == [vports["proxy"]]:
            proxy_rules.append(rule)
            want_peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": values["agents"]["namespace"] or "default"}},
                         "podSelector": values["agents"]["podSelector"]}
            if rule.get("from") != [want_peer]:
                problems.append(f"the proxy port admits more than the agents' pods: {rule}")
            continue
        if not rports or any(p.get("port") not in (ADMIN_PORT, "admin") or p.get("endPort") for p in rports):
            problems.append(f"ingress beyond the admin port: {rule}")
    if mode == "egress-gateway" and len(proxy_rules) != 1:
        problems.append("egress-gateway mode: no ingress rule for the agents on the proxy port")
    ingress = [r for r in ingress if r not in proxy_rules]
    admin = (ci_values.get("networkPolicy") or {}).get("admin") or {}
    wanted = len(admin.get("cidrs") or []) + len(admin.get("from") or []) + (1 if admin.get("operatorNamespaceSelector") else 0)
    got = sum(len(r.get("from") or []) for r in ingress)
    if got != wanted:
        problems.append(f"admin ingress has {got} peers, the values list {wanted}")



# Pod Security Standards (https://kubernetes.io/docs/concepts/security/pod-security-standards/):
# the level a pod spec meets, checked on the fields the chart can render.
BASELINE_CAPS = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                 "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}


def pss_level(pod):
    cs = pod.get("initContainers", []) + pod["containers"]
    psc = pod.get("securityContext") or {}
    baseline = not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    baseline &= not any("hostPath" in v for v in pod.get("volumes", []))
    for c in cs:
        csc = c.get("securityContext") or {}
        if csc.get("privileged") or not caps(c) <= BASELINE_CAPS:
            baseline = False
        if any(p.get("hostPort") for p in c.get("ports", [])):
            baseline = False
    if not baseline:
        return "privileged"
    restricted = all(set(v) - {"name"} <= RESTRICTED_VOLUMES for v in pod.get("volumes", []))
    pod_nonroot = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    for c in cs:
        csc = c.get("securityContext") or {}
        restricted &= csc.get("allowPrivilegeEscalation") is False
        restricted &= csc.get("runAsNonRoot", pod_nonroot) is True
        restricted &= csc.get("runAsUser", psc.get("runAsUser", 1)) != 0
        restricted &= (csc.get("capabilities") or {}).get("drop") == ["ALL"]
        restricted &= caps(c) <= {"NET_BIND_SERVICE"}
        restricted &= (csc.get("seccompProfile") or {}).get("type", "RuntimeDefault" if pod_seccomp else None) in ("RuntimeDefault", "Localhost")
    return "restricted" if restricted else "baseline"


gw_level = pss_level(spec)
if mode == "transparent":
    want = "baseline" if not any(c["name"] == "uapk-init-iptables" for c in inits) else "privileged"
    if gw_level != want:
        problems.append(f"transparent mode pod meets Pod Security {gw_level}, expected {want}")
elif gw_level != "restricted":
    problems.append(f"{mode} mode: the gateway's pod meets only Pod Security {gw_level} (want restricted)")
if mode == "egress-gateway" and values["agent"]["enabled"] and pss_level(agent_pod) != "restricted":
    problems.append(f"egress-gateway mode: the agents' pod meets only Pod Security {pss_level(agent_pod)} (want restricted)")

# Ports and UID clear of Istio's (15000-15090, UID 1337), and used consistently.
for key, port in vports.items():
    if 15000 <= port <= 15090:
        problems.append(f"ports.{key} {port} is in Istio's 15000-15090")
if values["gateway"]["uid"] == 1337 or sc.get("runAsUser") == 1337:
    problems.append("the gateway runs as UID 1337 (Istio's sidecar UID)")
cports = {p["name"]: p["containerPort"] for p in gateway.get("ports", [])}
if cports.get("proxy") != vports["proxy"] or cports.get("admin") != vports["admin"]:
    problems.append(f"gateway container ports {cports} differ from values.ports {vports}")
cfg = next((yaml.safe_load(d["data"]["gateway.yaml"]) for d in docs if d["kind"] == "ConfigMap" and "gateway.yaml" in d.get("data", {})), {})
listeners = cfg.get("listeners", {})
proxy_host = "0.0.0.0" if mode == "egress-gateway" else "127.0.0.1"
if listeners.get("proxy") != f"{proxy_host}:{vports['proxy']}" or listeners.get("admin") != f"0.0.0.0:{vports['admin']}":
    problems.append(f"gateway.yaml listeners {listeners} differ from values.ports")
if mode == "transparent":
    if listeners.get("transparent") != f"0.0.0.0:{vports['transparent']}":
        problems.append(f"transparent listener {listeners.get('transparent')} is not ports.transparent")
    init = next((c for c in inits if c["name"] == "uapk-init-iptables"), None)
    if init:
        args = init["args"]
        if args[args.index("--port") + 1] != str(vports["transparent"]) or args[args.index("--proxy-uid") + 1] != str(values["gateway"]["uid"]):
            problems.append(f"init-iptables args {args} differ from ports.transparent / gateway.uid")
        exempt = [int(args[i + 1]) for i, a in enumerate(args) if a == "--exempt-uid"]
        if exempt != values["iptables"].get("exemptUids", []):
            problems.append(f"init-iptables exempts {exempt}, values say {values['iptables'].get('exemptUids')}")
        if agent["securityContext"].get("runAsUser") in exempt:
            problems.append("the agent runs as an exempt UID")

# Upgrades: the embedded backend with persistence must not start a second pod on the held file.
strategy = deploy["spec"].get("strategy", {}).get("type")
want_strategy = "Recreate" if values["state"]["backend"] == "embedded" and values["persistence"]["enabled"] else "RollingUpdate"
if strategy != want_strategy:
    problems.append(f"strategy {strategy}, want {want_strategy}")
pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
if values["podDisruptionBudget"]["enabled"] and mode == "egress-gateway":
    if len(pdbs) != 1 or pdbs[0]["spec"]["selector"]["matchLabels"] != deploy["spec"]["selector"]["matchLabels"]:
        problems.append("egress-gateway mode without a PodDisruptionBudget selecting the gateways")
if not values["podDisruptionBudget"]["enabled"] and pdbs:
    problems.append("a PodDisruptionBudget rendered though disabled")

# egress-gateway: the Service and the agents' NetworkPolicy.
if mode == "egress-gateway":
    svcs = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == values["service"]["name"]]
    if len(svcs) != 1:
        problems.append(f"no Service named {values['service']['name']}")
    else:
        svc = svcs[0]["spec"]
        if svc["selector"] != deploy["spec"]["selector"]["matchLabels"] or [p["port"] for p in svc["ports"]] != [vports["proxy"]]:
            problems.append(f"the Service does not expose only the gateways' proxy port: {svc}")
    if values["agents"]["networkPolicy"]:
        if len(agent_policies) != 1:
            problems.append(f"{len(agent_policies)} agents' NetworkPolicies rendered (want 1)")
        else:
            ap = agent_policies[0]
            if ap["metadata"].get("namespace") != (values["agents"]["namespace"] or "default"):
                problems.append("the agents' NetworkPolicy is not in agents.namespace")
            aspec = ap["spec"]
            if aspec["podSelector"] != values["agents"]["podSelector"] or aspec.get("policyTypes") != ["Egress"]:
                problems.append("the agents' NetworkPolicy does not select agents.podSelector for Egress")
            if values["agent"]["enabled"]:
                labels = agent_deploys[0]["spec"]["template"]["metadata"]["labels"]
                if any(labels.get(k) != v for k, v in values["agents"]["podSelector"]["matchLabels"].items()):
                    problems.append("the demo agent's pod is not selected by the agents' NetworkPolicy")
            to_gateway = to_dns = 0
            for rule in aspec.get("egress", []):
                rports = [(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports") or []]
                peers = rule.get("to") or []
                if rports == [("TCP", vports["proxy"])] and peers and all(
                        (p.get("podSelector") or {}).get("matchLabels") == deploy["spec"]["selector"]["matchLabels"]
                        and "ipBlock" not in p for p in peers):
                    to_gateway += 1
                elif sorted(rports) == [("TCP", 53), ("UDP", 53)] and peers and all(is_dns_peer(p) for p in peers):
                    to_dns += 1
                else:
                    problems.append(f"the agents may reach more than the gateway and the cluster DNS: {rule}")
            if (to_gateway, to_dns) != (1, 1):
                problems.append("the agents' NetworkPolicy lacks the gateway or the DNS rule")
elif agent_policies:
    problems.append("an agents' NetworkPolicy rendered outside egress-gateway mode")

# The knobs every chart has: they reach the pod spec of the gateway (and the demo agent).
for pod in ([spec, agent_pod] if mode == "egress-gateway" and values["agent"]["enabled"] else [spec]):
    if pod.get("automountServiceAccountToken") is not values["serviceAccount"]["automount"]:
        problems.append("automountServiceAccountToken does not follow serviceAccount.automount")
    for key, field in [("imagePullSecrets", "imagePullSecrets"), ("nodeSelector", "nodeSelector"), ("affinity", "affinity"),
                       ("tolerations", "tolerations"), ("priorityClassName", "priorityClassName")]:
        if values[key] and pod.get(field) != values[key]:
            problems.append(f"{key} does not reach the pod spec")
    if values["serviceAccount"]["name"] and pod.get("serviceAccountName") != values["serviceAccount"]["name"]:
        problems.append("serviceAccount.name does not reach the pod spec")
meta = deploy["spec"]["template"]["metadata"]
for k, v in values["podLabels"].items():
    if meta["labels"].get(k) != v:
        problems.append(f"podLabels.{k} missing on the gateway's pod")
for k, v in values["podAnnotations"].items():
    if meta.get("annotations", {}).get(k) != v:
        problems.append(f"podAnnotations.{k} missing on the gateway's pod")
monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
if values["serviceMonitor"]["enabled"]:
    admin_svc = [d for d in docs if d["kind"] == "Service" and any(p.get("name") == "admin" for p in d["spec"]["ports"])]
    if len(monitors) != 1 or len(admin_svc) != 1:
        problems.append("serviceMonitor.enabled without a ServiceMonitor and the admin Service")
    elif monitors[0]["spec"]["endpoints"][0].get("path") != "/metrics" or admin_svc[0]["spec"]["ports"][0]["port"] != vports["admin"]:
        problems.append("the ServiceMonitor does not scrape /metrics on the admin port")
elif monitors:
    problems.append("a ServiceMonitor rendered though disabled")

# State backends (SPEC 15.1, 15.5): what gateway.yaml reads, where the chart mounts it from.
backend = values["state"]["backend"]
rl_backend = values["rateLimits"]["backend"]
origin = values["audit"]["origin"] or ((values["gateway"]["config"] or {}).get("audit") or {}).get("origin")
if deploy["spec"]["replicas"] != values["replicas"]:
    problems.append(f"the gateways' Deployment has {deploy['spec']['replicas']} replicas, values say {values['replicas']}")
if values["replicas"] > 1 and backend != "postgres":
    problems.append(f"{values['replicas']} replicas rendered with state.backend {backend}")
if (cfg.get("audit") or {}).get("origin") != (origin or None):
    problems.append(f"gateway.yaml audit.origin {(cfg.get('audit') or {}).get('origin')!r}, values say {origin!r}")
mounts = {m["mountPath"]: m for m in gateway.get("volumeMounts", [])}


def mounted_file(file, secret_ref, what):
    """file must be a key of the Secret secret_ref, projected read-only (mode 0400) under a mount
    of the gateway container."""
    if not file:
        problems.append(f"gateway.yaml has no {what}")
        return
    base = max((mp for mp in mounts if file.startswith(mp.rstrip("/") + "/")), key=len, default=None)
    if base is None:
        problems.append(f"{what} {file} is under no mount of the gateway")
        return
    m = mounts[base]
    if not m.get("readOnly"):
        problems.append(f"{what}: the mount {base} is not read-only")
    rel = file[len(base.rstrip("/")) + 1:]
    v = volumes[m["name"]]
    srcs = [s["secret"] for s in (v.get("projected") or {}).get("sources", []) if "secret" in s]
    if "secret" in v:
        srcs.append({"name": v["secret"]["secretName"], "items": v["secret"].get("items")})
    default_mode = (v.get("projected") or v.get("secret") or {}).get("defaultMode")
    hits = [(src, i) for src in srcs for i in (src.get("items") or []) if i["path"] == rel]
    if len(hits) != 1:
        problems.append(f"{what}: {len(hits)} Secret items project {rel} in volume {m['name']}")
        return
    src, item = hits[0]
    if (src["name"], item["key"]) != (secret_ref["name"], secret_ref["key"]):
        problems.append(f"{what}: {file} is Secret {src['name']} key {item['key']}, values say {secret_ref}")
    if item.get("mode", default_mode) != 0o400:
        problems.append(f"{what}: {file} has mode {oct(item.get('mode', default_mode) or 0)}, want 0400")
    for c in every:
        if c is not gateway and any(cm["name"] == m["name"] for cm in c.get("volumeMounts", [])):
            problems.append(f"{c['name']} mounts {m['name']} ({what})")


def engine(section, key, name, v):
    """gateway.yaml's `key.name` block of a shared engine: chosen, its URL and CA read from the
    mounted Secret files the values name (never inline); returns the block."""
    block = section.get(name) or {}
    if section.get("backend") != name:
        problems.append(f"gateway.yaml {key}.backend is {section.get('backend')}, want {name}")
    if "url" in block:
        problems.append(f"gateway.yaml carries the {name} URL inline")
    mounted_file(block.get("url_file"), v["urlSecret"], f"{key}.{name}.url_file")
    if v["caSecret"]["name"]:
        mounted_file(block.get("ca_file"), v["caSecret"], f"{key}.{name}.ca_file")
    elif "ca_file" in block:
        problems.append(f"{key}.{name}.ca_file without caSecret")
    return block


state_cfg = cfg.get("state") or {}
if backend == "postgres":
    pgv = values["state"]["postgres"]
    pg = engine(state_cfg, "state", "postgres", pgv)
    for key, vkey in [("pool_size", "poolSize"), ("connect_timeout", "connectTimeout"), ("statement_timeout", "statementTimeout")]:
        if pg.get(key) != pgv[vkey]:
            problems.append(f"gateway.yaml state.postgres.{key} {pg.get(key)!r}, values say {pgv[vkey]!r}")
    if not origin:
        problems.append("postgres rendered without audit.origin")
    if "path" in (cfg.get("audit") or {}):
        problems.append("gateway.yaml sets audit.path with the postgres backend")
    if any("persistentVolumeClaim" in v for v in volumes.values()) or any(d["kind"] == "PersistentVolumeClaim" for d in docs):
        problems.append("the postgres backend renders or mounts the redb PersistentVolumeClaim")
    if not values["secrets"]["gatewayKey"] or (cfg.get("keys") or {}).get("gateway") is None:
        problems.append("the postgres backend without a shared keys.gateway")
    ru = deploy["spec"].get("strategy", {}).get("rollingUpdate") or {}
    if ru.get("maxUnavailable") != 0 or ru.get("maxSurge") != 1:
        problems.append(f"postgres backend: rollingUpdate {ru}, want maxUnavailable 0, maxSurge 1")
    if values["podDisruptionBudget"]["enabled"] and (len(pdbs) != 1 or pdbs[0]["spec"]["selector"]["matchLabels"] != deploy["spec"]["selector"]["matchLabels"]):
        problems.append("postgres backend without a PodDisruptionBudget selecting the gateways")
elif "state" in cfg and state_cfg.get("backend") != "embedded":
    problems.append(f"embedded backend, gateway.yaml state {state_cfg}")
rl_cfg = cfg.get("rate_limits") or {}
if rl_backend == "redis":
    rv = values["rateLimits"]["redis"]
    rd = engine(rl_cfg, "rate_limits", "redis", rv)
    if rd.get("timeout") != rv["timeout"]:
        problems.append(f"gateway.yaml rate_limits.redis.timeout {rd.get('timeout')!r}, values say {rv['timeout']!r}")
elif "rate_limits" in cfg and rl_cfg.get("backend") != "local":
    problems.append(f"local rate limits, gateway.yaml rate_limits {rl_cfg}")
if backend == "embedded" and rl_backend == "local" and "uapk-state" in volumes:
    problems.append("the embedded backend with local rate limits mounts state Secrets")
# The engines are reachable through the pod's NetworkPolicy: a TCP rule on their port.
for engine, on in [("postgres", backend == "postgres"), ("redis", rl_backend == "redis")]:
    port = values["networkPolicy"][engine]["port"]
    rules = [r for np in policies for r in np["spec"].get("egress", [])
             if [(p.get("protocol", "TCP"), p.get("port")) for p in r.get("ports") or []] == [("TCP", port)]]
    if np_enabled and on:
        want_to = values["networkPolicy"][engine]["to"] or [{"ipBlock": {"cidr": c}} for c in values["networkPolicy"]["egressCidrs"]]
        if not any(r.get("to") == want_to for r in rules):
            problems.append(f"the NetworkPolicy lets the gateway reach no {engine} on TCP {port} at {want_to}")

# NOTES: the warnings SPEC 15.5 asks for, exactly when they apply.
if notes is not None:
    if not notes.startswith("NOTES:"):
        problems.append("no NOTES rendered")
    lost = "the log is lost with the pod" in " ".join(notes.split())
    if lost != (backend == "embedded" and not values["persistence"]["enabled"]):
        problems.append(f"NOTES {'warn' if lost else 'do not warn'} that the log is lost with the pod (backend {backend}, persistence {values['persistence']['enabled']})")
    each = "each replica enforces each rate limit on its own" in " ".join(notes.split())
    if each != (backend == "postgres" and rl_backend == "local"):
        problems.append(f"NOTES {'warn' if each else 'do not warn'} that each replica enforces each rate limit on its own (state {backend}, rate limits {rl_backend})")

for p in problems:
    print(f"  {name}: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
