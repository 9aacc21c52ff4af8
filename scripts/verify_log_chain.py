#!/usr/bin/env python3
"""Independent verifier for UAPK Gateway audit export bundles.

Written from public specifications and the project's bundle format (docs/evidence-format.md),
sharing no code with the gateway:

  * RFC 6962 / RFC 9162 Merkle trees (leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || l || r)),
  * C2SP signed-note (key names, key ids, Ed25519 signature lines) and tlog-checkpoint bodies,
  * RFC 8785 canonical JSON entries (read as bytes: the leaf hash covers them exactly).

Only the Python standard library and pyca/cryptography are used.

    verify_log_chain.py --bundle DIR --key PUB.pem [--key PUB2.pem] [--trusted-checkpoint FILE]

Exit status: 0 the bundle verified, 1 it is invalid or tampered with (the first bad index is
named when there is one), 2 usage or I/O error (nothing verified).
"""

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
import sys
import unicodedata

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
except ImportError:  # pragma: no cover
    sys.stderr.write("error: this verifier needs the 'cryptography' package (pip install cryptography)\n")
    sys.exit(2)

BUNDLE_FORMAT = "uapk-audit-bundle/2"
MANIFEST_CONTEXT = b"uapk-gateway export manifest v2\n"
BUNDLE_FILES = ("checkpoint", "entries.jsonl", "prefix.json", "gateway.pub.pem")
GENESIS_PREV = "0" * 64
EM_DASH = "\u2014"
MAX_SIGNATURES = 100
U64_MAX = (1 << 64) - 1


class Invalid(Exception):
    """The evidence is wrong: exit 1."""

    def __init__(self, reason, index=None):
        super().__init__(reason)
        self.reason = reason
        self.index = index


class IOFailure(Exception):
    """The evidence could not be read: exit 2."""


# --- encodings ---------------------------------------------------------------------------------


def b64_strict(text):
    """Standard base64 with canonical padding and no stray bits (re-encoding gives the input)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return raw


def hex_strict(text, length=None):
    if not isinstance(text, str) or len(text) % 2 or not re.fullmatch(r"[0-9a-fA-F]*", text):
        return None
    raw = bytes.fromhex(text)
    if length is not None and len(raw) != length:
        return None
    return raw


def decimal_string(value):
    """A JSON string holding a decimal u64 without sign or leading zeros."""
    if not isinstance(value, str) or not re.fullmatch(r"0|[1-9][0-9]*", value):
        return None
    n = int(value)
    return n if n <= U64_MAX else None


def _no_constants(name):
    raise ValueError("not JSON: " + name)


def json_bytes(raw):
    """Strict JSON: UTF-8 only, no NaN/Infinity."""
    text = raw.decode("utf-8")
    return json.loads(text, parse_constant=_no_constants)


# --- RFC 6962 Merkle tree ----------------------------------------------------------------------


def leaf_hash(entry):
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


class Frontier:
    """The roots of the perfect subtrees of a tree, largest first: one per set bit of its size."""

    def __init__(self, size=0, nodes=None):
        self.size = size
        self.nodes = list(nodes or [])

    @classmethod
    def from_bytes(cls, raw):
        if len(raw) < 8 or (len(raw) - 8) % 32:
            return None
        size = int.from_bytes(raw[:8], "big")
        nodes = [raw[i : i + 32] for i in range(8, len(raw), 32)]
        if len(nodes) != bin(size).count("1"):
            return None
        return cls(size, nodes)

    def push(self, leaf):
        node, s = leaf, self.size
        while s & 1:
            node = node_hash(self.nodes.pop(), node)
            s >>= 1
        self.nodes.append(node)
        self.size += 1

    def root(self):
        if not self.nodes:
            return hashlib.sha256(b"").digest()
        acc = self.nodes[-1]
        for left in reversed(self.nodes[:-1]):
            acc = node_hash(left, acc)
        return acc


# --- C2SP signed notes and tlog-checkpoint -----------------------------------------------------


def key_name_error(name):
    """C2SP signed-note key names: non-empty, printable ASCII, no spaces, no '+'."""
    if not name:
        return "must not be empty"
    for c in name:
        if c == "+":
            return "must not contain '+'"
        if not ("\x21" <= c <= "\x7e"):
            return "must be printable ASCII without spaces (found U+%04X)" % ord(c)
    return None


def key_id(name, public_raw):
    return hashlib.sha256(name.encode("ascii") + b"\x0a\x01" + public_raw).digest()[:4]


def split_note(note):
    """-> (body including its final newline, [(key name, signature blob)])."""
    for c in note:
        if (unicodedata.category(c) == "Cc" and c != "\n") or c == "\ufffd":
            raise Invalid("checkpoint: the note contains a control character (U+%04X)" % ord(c))
    if not note.endswith("\n"):
        raise Invalid("checkpoint: the note's last line does not end in a newline")
    at = note.find("\n\n")
    if at < 0:
        raise Invalid("checkpoint: no blank line between body and signatures")
    body, rest = note[: at + 1], note[at + 2 :]
    if not rest:
        raise Invalid("checkpoint: the note has no signature line")
    sigs = []
    for line in rest[:-1].split("\n"):
        if not line.startswith(EM_DASH + " "):
            raise Invalid("checkpoint: signature line does not start with an em dash")
        parts = line[2:].split(" ", 1)
        if len(parts) != 2:
            raise Invalid("checkpoint: malformed signature line")
        name, b64 = parts
        err = key_name_error(name)
        if err:
            raise Invalid("checkpoint: signature key name %r %s" % (name, err))
        blob = b64_strict(b64)
        if blob is None:
            raise Invalid("checkpoint: signature is not base64")
        if len(blob) < 5:
            raise Invalid("checkpoint: signature is too short to hold a key id")
        sigs.append((name, blob))
        if len(sigs) > MAX_SIGNATURES:
            raise Invalid("checkpoint: too many signature lines")
    return body, sigs


def parse_checkpoint_body(body):
    lines = body[:-1].split("\n")
    origin = lines[0]
    err = key_name_error(origin)
    if err:
        raise Invalid("checkpoint: origin %r %s" % (origin, err))
    if len(lines) < 2:
        raise Invalid("checkpoint: no tree size line")
    size = decimal_string(lines[1])
    if size is None:
        raise Invalid("checkpoint: bad tree size line")
    if len(lines) < 3:
        raise Invalid("checkpoint: no root hash line")
    root = b64_strict(lines[2])
    if root is None:
        raise Invalid("checkpoint: bad root hash line")
    if len(root) != 32:
        raise Invalid("checkpoint: root hash is not 32 bytes")
    if any(line == "" for line in lines[3:]):
        raise Invalid("checkpoint: empty extension line in the checkpoint body")
    return {"origin": origin, "size": size, "root": root}


def parse_unverified(note):
    body, _ = split_note(note)
    return parse_checkpoint_body(body)


def verify_ed25519(public_raw, signature, message):
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def check_note_signature(note, keys):
    """At least one signature line by one of `keys` (raw public keys) must verify; a line that
    names one of them (key name and key id) but does not verify is an error."""
    body, sigs = split_note(note)
    cp = parse_checkpoint_body(body)
    verified = False
    for name, blob in sigs:
        for public_raw in keys:
            if blob[:4] != key_id(name, public_raw):
                continue
            if len(blob) != 68:
                raise Invalid("checkpoint: malformed signature")
            if verify_ed25519(public_raw, blob[4:], body.encode("utf-8")):
                verified = True
            else:
                raise Invalid("checkpoint: signature does not verify")
    if not verified:
        raise Invalid("checkpoint: no signature by a trusted key")
    return cp


# --- the trusted checkpoint --------------------------------------------------------------------


class Trusted:
    def __init__(self, note):
        self.note = note
        try:
            self.cp = parse_unverified(note)
        except Invalid as e:
            raise Invalid("trusted " + e.reason)
        self.signed = False

    def check_signature(self, known):
        if not self.signed:
            try:
                check_note_signature(self.note, known)
            except Invalid as e:
                raise Invalid("trusted " + e.reason)
            self.signed = True

    def check_at(self, size, tree, origin, known):
        if size != self.cp["size"]:
            return
        self.check_signature(known)
        at = size - 1 if size > 0 else None
        if origin != self.cp["origin"]:
            raise Invalid("the trusted checkpoint is of log %r, not of log %r" % (self.cp["origin"], origin), at)
        if tree.root() != self.cp["root"]:
            raise Invalid(
                "the log is not an extension of the trusted checkpoint of size %d: its tree of that size has "
                "another root (rolled back, forked or replaced)" % self.cp["size"],
                at,
            )

    def finish(self, size, known):
        if size < self.cp["size"]:
            try:
                check_note_signature(self.note, known)
            except Invalid as e:
                raise Invalid("trusted " + e.reason)
            raise Invalid(
                "the log holds %d entries but the trusted checkpoint covers %d: it was truncated, rolled back "
                "or replaced by an older copy" % (size, self.cp["size"]),
                size,
            )


# --- entries -----------------------------------------------------------------------------------

U64_TEXT = re.compile(r"\+?[0-9]+")


def check_entry(expected, raw, prev, origin):
    """Index, chain link and log name of one entry. Returns (leaf hash, entry object)."""
    try:
        entry = json_bytes(raw)
    except (UnicodeDecodeError, ValueError):
        raise Invalid("the entry is not valid JSON", expected)
    if not isinstance(entry, dict) or not isinstance(entry.get("idx"), str) or not isinstance(entry.get("prev"), str):
        raise Invalid("the entry is not valid JSON", expected)
    log = entry.get("log")
    if log != origin:
        raise Invalid("the entry is not of log %r" % origin, expected)
    idx = entry["idx"]
    if not U64_TEXT.fullmatch(idx) or int(idx) != expected:
        raise Invalid("the entry says idx %r (reordered or replaced)" % idx, expected)
    want_prev = GENESIS_PREV if expected == 0 else prev.hex()
    if entry["prev"] != want_prev:
        raise Invalid("the entry's prev does not match the previous entry's leaf hash", expected)
    return leaf_hash(raw), entry


def rotation_message(origin, new_key_hex):
    return ("uapk-gateway key rotation\n%s\n%s\n" % (origin, new_key_hex)).encode("utf-8")


def follow_rotation(index, entry, active):
    """A `key` entry: the new key, announced with a signature by the key active before it."""
    new_hex = entry.get("new_key")
    if not isinstance(new_hex, str):
        raise Invalid("a key entry without new_key", index)
    new_raw = hex_strict(new_hex, 32)
    if new_raw is None:
        raise Invalid("new_key is not 32 bytes", index)
    try:
        Ed25519PublicKey.from_public_bytes(new_raw)
    except ValueError:
        raise Invalid("new_key is not an Ed25519 key", index)
    sig = hex_strict(entry.get("announcement_sig"), 64)
    if sig is None:
        raise Invalid("announcement_sig is not a signature", index)
    origin = entry.get("log") if isinstance(entry.get("log"), str) else ""
    message = rotation_message(origin, new_hex)
    if not any(verify_ed25519(k, sig, message) for k in active):
        raise Invalid("a key rotation not signed by the key active before it", index)
    return new_raw


# --- the bundle --------------------------------------------------------------------------------


def read_bundle_file(bundle, name):
    try:
        with open(os.path.join(bundle, name), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Invalid("the bundle has no %s (incomplete or altered)" % name)
    except OSError as e:
        raise IOFailure("%s: %s" % (name, e))


def verify_bundle(bundle, keys, trusted_note):
    trusted = Trusted(trusted_note) if trusted_note is not None else None
    if not os.path.isdir(bundle):
        raise IOFailure("%s: not a bundle directory" % bundle)
    manifest = read_bundle_file(bundle, "manifest.json")
    sig_raw = read_bundle_file(bundle, "manifest.json.sig")
    sig = None
    try:
        sig_text = sig_raw.decode("utf-8")
        if sig_text.endswith("\n"):
            sig = b64_strict(sig_text[:-1])
    except UnicodeDecodeError:
        pass
    if sig is None or len(sig) != 64:
        raise Invalid("manifest.json.sig is not a base64 Ed25519 signature line")
    signed_manifest = MANIFEST_CONTEXT + manifest

    def manifest_by(ks):
        return any(verify_ed25519(k, sig, signed_manifest) for k in ks)

    manifest_signed_early = manifest_by(keys)
    try:
        m = json_bytes(manifest)
    except (UnicodeDecodeError, ValueError):
        raise Invalid("manifest.json is not JSON")
    if not isinstance(m, dict) or m.get("format") != BUNDLE_FORMAT:
        raise Invalid("manifest.json: format is not %r" % BUNDLE_FORMAT)
    start, to = decimal_string(m.get("from")), decimal_string(m.get("to"))
    if start is None:
        raise Invalid("manifest.json from is not a decimal string")
    if to is None:
        raise Invalid("manifest.json to is not a decimal string")
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    for name in BUNDLE_FILES:
        want = files.get(name)
        if not isinstance(want, str):
            raise Invalid("manifest.json does not list %s" % name)
        if hashlib.sha256(read_bundle_file(bundle, name)).hexdigest() != want:
            raise Invalid("%s does not match its SHA-256 in manifest.json" % name)
    try:
        note = read_bundle_file(bundle, "checkpoint").decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("checkpoint is not UTF-8 text")
    cp = parse_unverified(note)
    if m.get("origin") != cp["origin"]:
        raise Invalid("manifest.json names another origin than the checkpoint")
    if cp["size"] != to:
        raise Invalid("manifest.json says the bundle ends at %d, its checkpoint covers %d" % (to, cp["size"]))
    try:
        prefix = json_bytes(read_bundle_file(bundle, "prefix.json"))
    except (UnicodeDecodeError, ValueError):
        raise Invalid("prefix.json is not JSON")
    if not isinstance(prefix, dict):
        raise Invalid("prefix.json has no valid frontier")
    raw = hex_strict(prefix.get("frontier"))
    frontier = Frontier.from_bytes(raw) if raw is not None else None
    if frontier is None:
        raise Invalid("prefix.json has no valid frontier")
    psize = decimal_string(prefix.get("size"))
    if psize is None:
        raise Invalid("prefix.json size is not a decimal string")
    if psize != start or frontier.size != start:
        raise Invalid("prefix.json is not the tree of the %d entries before the bundle" % start)
    prev = hex_strict(prefix.get("last_leaf"), 32)
    if prev is None:
        raise Invalid("prefix.json has no valid last_leaf")
    if start == 0 and prev != bytes(32):
        raise Invalid("prefix.json: last_leaf of an empty prefix must be the genesis value (64 zeros)")
    if trusted is not None and trusted.cp["size"] < start:
        raise Invalid(
            "the bundle starts at entry %d, after the trusted checkpoint's size %d: its consistency with that "
            "checkpoint cannot be checked (export from %d or earlier)" % (start, trusted.cp["size"], trusted.cp["size"])
        )
    active, known, rotations = list(keys), list(keys), 0
    if trusted is not None:
        trusted.check_at(start, frontier, cp["origin"], known)
    try:
        f = open(os.path.join(bundle, "entries.jsonl"), "rb")
    except OSError as e:
        raise IOFailure("entries.jsonl: %s" % e)
    n = 0
    with f:
        while True:
            try:
                line = f.readline()
            except OSError as e:
                raise IOFailure("entries.jsonl: %s" % e)
            if not line:
                break
            idx = frontier.size
            if not line.endswith(b"\n"):
                raise Invalid("entries.jsonl: the last line does not end in a newline", idx)
            entry_raw = line[:-1]
            leaf, entry = check_entry(idx, entry_raw, prev, cp["origin"])
            if entry.get("kind") == "key":
                new_key = follow_rotation(idx, entry, active)
                active = [new_key]
                known.append(new_key)
                rotations += 1
            frontier.push(leaf)
            prev = leaf
            n += 1
            if trusted is not None:
                trusted.check_at(frontier.size, frontier, cp["origin"], known)
    if frontier.size != cp["size"]:
        raise Invalid(
            "the entries end at %d but the checkpoint covers %d" % (frontier.size, cp["size"]),
            min(frontier.size, cp["size"]),
        )
    check_note_signature(note, active)
    if frontier.root() != cp["root"]:
        raise Invalid(
            "the entries do not hash to the signed checkpoint (an entry was changed, dropped, added or moved)",
            max(cp["size"] - 1, 0),
        )
    if not manifest_signed_early and not manifest_by(active):
        raise Invalid("manifest.json is not signed by a trusted key")
    if trusted is not None:
        trusted.finish(frontier.size, known)
    return {
        "entries": n,
        "from": start,
        "size": cp["size"],
        "root": cp["root"].hex(),
        "rotations": rotations,
        "trusted": trusted.cp["size"] if trusted is not None else None,
    }


def load_key(path):
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise IOFailure("%s: %s" % (path, e))
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise IOFailure("%s: not an Ed25519 public key in SPKI PEM form" % path)
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Verify a UAPK Gateway audit export bundle (docs/evidence-format.md) independently."
    )
    ap.add_argument("--bundle", required=True, help="the bundle directory")
    ap.add_argument(
        "--key",
        action="append",
        default=[],
        help="trusted gateway public key (SPKI PEM), obtained independently of the bundle; repeatable",
    )
    ap.add_argument("--trusted-checkpoint", help="a signed checkpoint kept from earlier: the bundle must extend it")
    args = ap.parse_args(argv)  # exits 2 on usage errors
    if not args.key:
        sys.stderr.write("error: --bundle needs --key PUB.pem: the gateway public key you trust (never the bundle's own)\n")
        return 2
    try:
        keys = [load_key(p) for p in args.key]
        trusted = None
        if args.trusted_checkpoint is not None:
            try:
                with open(args.trusted_checkpoint, "rb") as f:
                    trusted = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise IOFailure("%s: %s" % (args.trusted_checkpoint, e))
        r = verify_bundle(args.bundle, keys, trusted)
    except IOFailure as e:
        sys.stderr.write("error: cannot verify: %s\n" % e)
        return 2
    except Invalid as e:
        where = "" if e.index is None else " at index %d" % e.index
        sys.stderr.write("error: verification failed%s: %s\n" % (where, e.reason))
        return 1
    rng = " (indexes %d..%d)" % (r["from"], r["size"]) if r["from"] > 0 else ""
    line = "ok: %d entries verified%s; 1 checkpoints; tree size %d; root %s" % (r["entries"], rng, r["size"], r["root"])
    if r["rotations"]:
        line += "; %d key rotation(s) followed" % r["rotations"]
    if r["trusted"] is not None:
        line += "; extends the trusted checkpoint of size %d" % r["trusted"]
    else:
        line += "; no trusted checkpoint given (truncation of the newest entries is not checked)"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
