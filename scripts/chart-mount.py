"""Lays out the gateway container's volumes on disk as the kubelet would mount them, so the
rendered chart can be run by the real binary outside a cluster.

Usage: chart-mount.py OBJECTS.yaml ROOT
  OBJECTS.yaml  the rendered chart plus the ConfigMaps and Secrets the README creates (kubectl
                create ... --dry-run=client -o yaml)
  ROOT          an empty directory; every mountPath M of the gateway container becomes ROOT/M

What the kubelet does, and so this script: configMap, secret and projected volumes become a
directory holding a timestamped `..<ts>` directory with the files, a `..data` link to it, and one
link per top-level entry into `..data` (so hidden entries are skipped by readers that skip them);
`items` choose keys and their paths (sub-directories included), and are required to exist (a
missing key fails the pod, here the script); Secret `data` is base64-decoded; `subPath` mounts one
entry of the volume at mountPath; emptyDir and persistentVolumeClaim volumes are empty
directories. Modes: `defaultMode`/`mode` as given.

The pod's absolute paths do not exist here, so they are mapped under ROOT: in every file that
comes from a ConfigMap (gateway.yaml, the manifests), each occurrence of a mountPath (longest
first) at the start of a path is rewritten to ROOT/mountPath. The gateway.yaml named by the
container's `-c` argument additionally gets its listeners moved to free ports on 127.0.0.1.
Prints JSON: {"config": path, "admin": "127.0.0.1:PORT", "proxy": ..., "args": [...]}.
"""
import base64
import json
import os
import re
import socket
import sys

import yaml


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def fail(msg):
    print(f"chart-mount: {msg}", file=sys.stderr)
    sys.exit(1)


objects_path, root = sys.argv[1], os.path.abspath(sys.argv[2])
docs = [d for d in yaml.safe_load_all(open(objects_path)) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d

def pod_containers(d):
    s = d["spec"]["template"]["spec"]
    return s.get("initContainers", []) + s["containers"]


# The Deployment the gateway runs in (the agent's pod, or the egress gateway's own).
deploy = next((d for d in by_kind.get("Deployment", {}).values() if any(c["name"] == "uapk-gateway" for c in pod_containers(d))),
              None) or fail("no Deployment with the gateway rendered")
spec = deploy["spec"]["template"]["spec"]
containers = pod_containers(deploy)
gateway = next((c for c in containers if c["name"] == "uapk-gateway"), None) or fail("no uapk-gateway container")
volumes = {v["name"]: v for v in spec.get("volumes", [])}
mounts = gateway.get("volumeMounts", [])
mount_paths = sorted({m["mountPath"] for m in mounts}, key=len, reverse=True)


def rewrite_paths(text):
    """Absolute pod paths under a mountPath → the same path under ROOT."""
    for mp in mount_paths:
        text = re.sub(r'(?<![\w./-])' + re.escape(mp) + r'(?=$|[/\s"\',}\]])', root + mp, text, flags=re.M)
    return text


def source_files(kind, name, items, optional=False):
    """(relative path, bytes, mode) for each key of a ConfigMap or Secret, as items select."""
    obj = by_kind.get(kind, {}).get(name)
    if obj is None:
        if optional:
            return []
        fail(f"{kind} {name} does not exist (the pod would not start)")
    if kind == "Secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    else:
        data = {k: rewrite_paths(v).encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    if items:
        out = []
        for i in items:
            if i["key"] not in data:
                fail(f"{kind} {name} has no key {i['key']} (the pod would not start)")
            out.append((i["path"], data[i["key"]], i.get("mode")))
        return out
    return [(k, v, None) for k, v in data.items()]


def volume_files(v):
    if "configMap" in v:
        cm = v["configMap"]
        return source_files("ConfigMap", cm["name"], cm.get("items"), cm.get("optional", False)), cm.get("defaultMode", 0o644)
    if "secret" in v:
        s = v["secret"]
        return source_files("Secret", s["secretName"], s.get("items"), s.get("optional", False)), s.get("defaultMode", 0o644)
    if "projected" in v:
        p = v["projected"]
        files = []
        for src in p.get("sources", []):
            if "configMap" in src:
                c = src["configMap"]
                files += source_files("ConfigMap", c["name"], c.get("items"), c.get("optional", False))
            elif "secret" in src:
                s = src["secret"]
                files += source_files("Secret", s["name"], s.get("items"), s.get("optional", False))
            else:
                fail(f"projected source {list(src)} is not laid out by this script")
        return files, p.get("defaultMode", 0o644)
    return None, None


def materialise(v, target):
    """Writes volume v at directory target, kubelet-style. Returns True for an atomic-writer volume."""
    files, default_mode = volume_files(v)
    if files is None:
        if "emptyDir" in v or "persistentVolumeClaim" in v:
            os.makedirs(target, exist_ok=True)
            return False
        fail(f"volume {v['name']}: kind {[k for k in v if k != 'name']} is not laid out by this script")
    os.makedirs(target, exist_ok=True)
    ts = "..2026_01_01_00_00_00.000000001"
    for rel, data, mode in files:
        if rel.startswith("/") or ".." in rel.split("/"):
            fail(f"volume {v['name']}: item path {rel} is not allowed")
        path = os.path.join(target, ts, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, (mode if mode is not None else default_mode) | 0o400)  # we are not root: keep it readable to us
    os.symlink(ts, os.path.join(target, "..data"))
    for top in sorted({rel.split("/")[0] for rel, _, _ in files}):
        os.symlink(os.path.join("..data", top), os.path.join(target, top))
    return True


for m in sorted(mounts, key=lambda m: len(m["mountPath"])):
    v = volumes.get(m["name"]) or fail(f"mount {m['name']} names no volume")
    dest = root + m["mountPath"]
    if "subPath" in m:
        staging = os.path.join(root, ".volumes", m["name"])
        if not os.path.exists(staging):
            materialise(v, staging)
        src = os.path.join(staging, m["subPath"])
        if not os.path.exists(src):
            fail(f"mount {m['name']}: subPath {m['subPath']} does not exist in the volume")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.symlink(os.path.realpath(src), dest)
    else:
        materialise(v, dest)

args = gateway.get("args") or []
if "-c" not in args:
    fail(f"the gateway's args {args} name no -c config")
config = root + args[args.index("-c") + 1]
cfg = yaml.safe_load(open(config)) or {}
ports = {}
for name in ("proxy", "admin", "transparent"):
    if (cfg.get("listeners") or {}).get(name):
        ports[name] = f"127.0.0.1:{free_port()}"
        cfg["listeners"][name] = ports[name]
real = os.path.realpath(config)
os.chmod(real, 0o644)
with open(real, "w") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
print(json.dumps({"config": config, "args": args, **ports}))
