//! RFC 8785 (JCS) canonical JSON, as the log stores it: object keys sorted by UTF-16 code
//! units, no insignificant whitespace, minimal string escaping. Integers are written as decimal
//! strings (the log holds no JSON numbers); any other number is refused.
//!
//! Entries are bounded (SPEC §14.8): a string value longer than [`MAX_STRING_BYTES`] is stored
//! as its first [`CUT_STRING_BYTES`] bytes (on a UTF-8 boundary) followed by `…`, and the
//! entry's `truncated` map gives its full SHA-256 and length under the value's JSON path
//! (`path`, `headers.x-long`, `reasons.0.message`). An entry still above the size limit drops
//! whole fields into `truncated`, in [`DROP_ORDER`] and then largest first, until it fits. This
//! happens as the fields are encoded, before anything is hashed: the stored bytes are what
//! `verify` checks. `canonical_json` itself never cuts anything (it also hashes actions).

use crate::Error as AuditError;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;

/// A string value longer than this many bytes is stored cut.
pub const MAX_STRING_BYTES: usize = 1024;
/// Bytes of a cut string that are kept (then `…`), rounded down to a UTF-8 boundary.
pub const CUT_STRING_BYTES: usize = 256;
/// The fields an entry above the size limit drops first, in this order; then any other field
/// but [`KEPT`], largest first.
pub const DROP_ORDER: [&str; 5] = ["headers", "params", "query", "path", "reasons"];
/// Fields never dropped (besides the writer's own `v`, `log`, `idx`, `ts`, `prev`).
pub const KEPT: [&str; 6] = ["kind", "request_id", "decision", "decision_idx", "approval_id", "agent"];

pub fn canonical_json(value: &Value) -> Result<Vec<u8>, AuditError> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out, None, &mut Vec::new())?;
    Ok(out)
}

/// A value stored cut (a string over [`MAX_STRING_BYTES`]) or left out (a whole field dropped to
/// fit the entry size limit): what the `truncated` map says about it.
#[derive(Debug, Clone)]
struct Cut {
    /// Index of the field (in `Fields::keys`) it belongs to.
    field: usize,
    /// JSON path: keys and array indexes joined by `.`.
    path: String,
    sha256: [u8; 32],
    len: u64,
}

impl Cut {
    fn of(field: usize, path: String, full: &[u8]) -> Cut {
        Cut { field, path, sha256: Sha256::digest(full).into(), len: full.len() as u64 }
    }
}

/// Where a value sits in the entry, for the `truncated` map; built on the stack as the encoder
/// descends and rendered only when something is cut.
#[derive(Clone, Copy)]
struct At<'a> {
    field: usize,
    seg: Seg<'a>,
    parent: Option<&'a At<'a>>,
}

#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

impl<'a> At<'a> {
    fn child(&'a self, seg: Seg<'a>) -> At<'a> {
        At { field: self.field, seg, parent: Some(self) }
    }

    fn render(&self) -> String {
        let mut segs = Vec::new();
        let mut at = Some(self);
        while let Some(a) = at {
            segs.push(match a.seg {
                Seg::Key(k) => k.to_string(),
                Seg::Index(i) => i.to_string(),
            });
            at = a.parent;
        }
        segs.reverse();
        segs.join(".")
    }
}

/// An entry's fields with each value already in canonical form, as producers hand them to the
/// writer; the writer adds `v`, `log`, `idx`, `ts` and `prev` and joins everything in key order
/// (`Fields::join`), so no JSON tree is built per entry.
#[derive(Debug, Default)]
pub struct Fields {
    buf: Vec<u8>,
    /// (key, start, end) of each value in `buf`, in insertion order.
    keys: Vec<(Cow<'static, str>, usize, usize)>,
    /// Strings stored cut, in order (empty, unallocated, for the usual entry).
    cuts: Vec<Cut>,
    /// For each field with a cut string inside: SHA-256 and length of its full value (the text
    /// of a string, the canonical JSON of anything else), what the `truncated` map says if the
    /// whole field has to be dropped.
    full: Vec<(usize, [u8; 32], u64)>,
}

impl Fields {
    pub fn new() -> Fields {
        Fields { buf: Vec::with_capacity(512), keys: Vec::with_capacity(24), cuts: Vec::new(), full: Vec::new() }
    }

    fn put(&mut self, key: impl Into<Cow<'static, str>>, value: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        value(&mut self.buf);
        self.keys.push((key.into(), start, self.buf.len()));
    }

    /// A string value (cut if longer than [`MAX_STRING_BYTES`]).
    pub fn str(&mut self, key: &'static str, v: &str) -> &mut Fields {
        if v.len() <= MAX_STRING_BYTES {
            self.put(key, |out| write_str(v, out));
            return self;
        }
        let field = self.keys.len();
        let at = At { field, seg: Seg::Key(key), parent: None };
        let (buf, cuts) = (&mut self.buf, &mut self.cuts);
        let start = buf.len();
        write_str_at(v, buf, Some(&at), cuts);
        let end = buf.len();
        self.full.push((field, Sha256::digest(v.as_bytes()).into(), v.len() as u64));
        self.keys.push((key.into(), start, end));
        self
    }

    /// A string value known to be cut: `kept` (then `…`) stands for a value of `len` bytes with
    /// SHA-256 `sha256` that the producer did not keep whole (a streamed body's first bytes).
    pub fn cut_str(&mut self, key: &'static str, kept: &str, sha256: [u8; 32], len: u64) -> &mut Fields {
        let field = self.keys.len();
        let mut text = String::with_capacity(kept.len() + 3);
        text.push_str(kept);
        text.push('…');
        self.put(key, |out| write_str(&text, out));
        self.cuts.push(Cut { field, path: key.to_string(), sha256, len });
        self.full.push((field, sha256, len));
        self
    }

    /// A boolean value.
    pub fn put_bool(&mut self, key: &'static str, v: bool) -> &mut Fields {
        self.put(key, |out| out.extend_from_slice(if v { b"true" } else { b"false" }));
        self
    }

    /// A string value, or `null`.
    pub fn opt_str(&mut self, key: &'static str, v: Option<&str>) -> &mut Fields {
        match v {
            Some(v) => self.str(key, v),
            None => {
                self.put(key, |out| out.extend_from_slice(b"null"));
                self
            }
        }
    }

    /// An integer, written as a decimal string (the log holds no JSON numbers).
    pub fn int(&mut self, key: &'static str, v: impl Into<u128>) -> &mut Fields {
        let v: u128 = v.into();
        self.put(key, |out| {
            out.push(b'"');
            out.extend_from_slice(v.to_string().as_bytes());
            out.push(b'"');
        });
        self
    }

    /// Bytes of the values so far (a size hint).
    pub fn len_hint(&self) -> usize {
        self.buf.len() + self.keys.len() * 16
    }

    /// Writes a JSON value (cutting long strings inside); nothing is kept if it is refused.
    fn try_put(&mut self, key: Cow<'static, str>, v: &Value, object: bool) -> Result<&mut Fields, AuditError> {
        let field = self.keys.len();
        let start = self.buf.len();
        let cuts_before = self.cuts.len();
        let written = {
            let at = At { field, seg: Seg::Key(&key), parent: None };
            match (object, v) {
                (true, Value::Object(m)) => write_object(m, &mut self.buf, Some(&at), &mut self.cuts),
                _ => write(v, &mut self.buf, Some(&at), &mut self.cuts),
            }
        };
        if let Err(e) = written {
            self.buf.truncate(start);
            self.cuts.truncate(cuts_before);
            return Err(e);
        }
        if self.cuts.len() > cuts_before {
            // Rare: something was cut, so the stored value is not the full one.
            let full = canonical_json(v)?;
            self.full.push((field, Sha256::digest(&full).into(), full.len() as u64));
        }
        self.keys.push((key, start, self.buf.len()));
        Ok(self)
    }

    /// Any JSON value, canonicalised.
    pub fn value(&mut self, key: impl Into<Cow<'static, str>>, v: &Value) -> Result<&mut Fields, AuditError> {
        self.try_put(key.into(), v, false)
    }

    /// A JSON value whose long strings the producer already cut (keeping their first bytes, then
    /// `…`), so it did not hold them whole: `cuts` gives each one's path below `key` (`3.path`)
    /// and its full SHA-256 and length, for the `truncated` map (`key.3.path`).
    pub fn value_precut(
        &mut self,
        key: &'static str,
        v: &Value,
        cuts: &[(String, [u8; 32], u64)],
    ) -> Result<&mut Fields, AuditError> {
        let field = self.keys.len();
        self.try_put(key.into(), v, false)?;
        if cuts.is_empty() {
            return Ok(self);
        }
        for (path, sha256, len) in cuts {
            self.cuts.push(Cut { field, path: format!("{key}.{path}"), sha256: *sha256, len: *len });
        }
        if !self.full.iter().any(|(f, ..)| *f == field) {
            // Dropped whole, the field is known by what was stored of it.
            let (_, start, end) = &self.keys[field];
            let stored = &self.buf[*start..*end];
            self.full.push((field, Sha256::digest(stored).into(), stored.len() as u64));
        }
        Ok(self)
    }

    /// A JSON object value, canonicalised (no copy of the map).
    pub fn map(&mut self, key: &'static str, m: &Map<String, Value>) -> Result<&mut Fields, AuditError> {
        let field = self.keys.len();
        let start = self.buf.len();
        let cuts_before = self.cuts.len();
        let at = At { field, seg: Seg::Key(key), parent: None };
        if let Err(e) = write_object(m, &mut self.buf, Some(&at), &mut self.cuts) {
            self.buf.truncate(start);
            self.cuts.truncate(cuts_before);
            return Err(e);
        }
        if self.cuts.len() > cuts_before {
            let mut full = Vec::with_capacity(self.buf.len() - start);
            write_object(m, &mut full, None, &mut Vec::new())?;
            self.full.push((field, Sha256::digest(&full).into(), full.len() as u64));
        }
        self.keys.push((key.into(), start, self.buf.len()));
        Ok(self)
    }

    /// The fields of a JSON object.
    pub fn from_map(m: Map<String, Value>) -> Result<Fields, AuditError> {
        let mut f = Fields::new();
        for (k, v) in m {
            f.value(k, &v)?;
        }
        Ok(f)
    }

    /// Writes the entry: these fields and `extra` (values already canonical) as one canonical
    /// object, with the `truncated` map when a string was cut. A key in `extra` wins over the
    /// same key here; of repeated keys here the last wins. No size bound: see `join_within`.
    pub fn join(&self, extra: &[(&'static str, &[u8])], out: &mut Vec<u8>) {
        self.join_dropping(extra, &[], out);
    }

    /// `join`, kept within `max` bytes if it can be: while the entry is larger, whole fields
    /// are dropped into the `truncated` map ([`DROP_ORDER`], then the largest other field but
    /// [`KEPT`] and `extra`). The result can still be larger than `max` when nothing is left to
    /// drop; the caller refuses it then.
    pub fn join_within(&self, extra: &[(&'static str, &[u8])], max: usize, out: &mut Vec<u8>) {
        let start = out.len();
        self.join_dropping(extra, &[], out);
        if out.len() - start <= max {
            return;
        }
        // Rare: drop fields one at a time, in order, until the entry fits.
        let live = self.live(extra);
        let mut candidates: Vec<usize> = Vec::with_capacity(live.len());
        for name in DROP_ORDER {
            candidates.extend(live.iter().copied().filter(|&i| self.keys[i].0 == name));
        }
        let mut rest: Vec<usize> = live
            .iter()
            .copied()
            .filter(|&i| !DROP_ORDER.contains(&self.keys[i].0.as_ref()) && !KEPT.contains(&self.keys[i].0.as_ref()))
            .collect();
        rest.sort_by_key(|&i| std::cmp::Reverse(self.keys[i].2 - self.keys[i].1));
        candidates.extend(rest);
        let mut dropped = Vec::with_capacity(candidates.len());
        for i in candidates {
            dropped.push(i);
            out.truncate(start);
            self.join_dropping(extra, &dropped, out);
            if out.len() - start <= max {
                return;
            }
        }
    }

    /// Indexes of the fields that end up in the entry (not shadowed by a later one or `extra`).
    fn live(&self, extra: &[(&'static str, &[u8])]) -> Vec<usize> {
        (0..self.keys.len())
            .filter(|&i| {
                let k = &self.keys[i].0;
                !extra.iter().any(|(e, _)| e == k) && !self.keys[i + 1..].iter().any(|(later, _, _)| later == k)
            })
            .collect()
    }

    fn join_dropping(&self, extra: &[(&'static str, &[u8])], dropped: &[usize], out: &mut Vec<u8>) {
        // (key, value, field index) — extras have none.
        let mut all: Vec<(&str, &[u8], Option<usize>)> = Vec::with_capacity(self.keys.len() + extra.len() + 1);
        all.extend(
            self.keys
                .iter()
                .enumerate()
                .filter(|(_, (k, _, _))| !dropped.iter().any(|&d| self.keys[d].0 == *k))
                .map(|(i, (k, start, end))| (k.as_ref(), &self.buf[*start..*end], Some(i))),
        );
        all.extend(extra.iter().map(|(k, v)| (*k, *v, None)));
        let truncated = self.truncated_map(extra, dropped);
        if let Some(t) = &truncated {
            all.push(("truncated", t, None));
        }
        // Stable sorts: of equal keys, the one given last stays last.
        if all.iter().any(|(k, _, _)| k.bytes().any(|b| b >= 0xEE)) {
            all.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
        } else {
            all.sort_by(|a, b| a.0.cmp(b.0));
        }
        out.push(b'{');
        let mut first = true;
        for (i, (k, v, _)) in all.iter().enumerate() {
            if all.get(i + 1).is_some_and(|next| next.0 == *k) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_str(k, out);
            out.push(b':');
            out.extend_from_slice(v);
        }
        out.push(b'}');
    }

    /// The canonical `truncated` map: each cut string of a field in the entry, and each dropped
    /// field (whose cut strings it covers); `None` when nothing was cut or dropped.
    fn truncated_map(&self, extra: &[(&'static str, &[u8])], dropped: &[usize]) -> Option<Vec<u8>> {
        if self.cuts.is_empty() && dropped.is_empty() {
            return None;
        }
        let live = self.live(extra);
        let mut m = Map::new();
        let mut add = |path: &str, sha: &[u8; 32], len: u64| {
            m.insert(path.to_string(), serde_json::json!({"sha256": hex::encode(sha), "len": len.to_string()}));
        };
        for c in &self.cuts {
            if live.contains(&c.field) && !dropped.contains(&c.field) {
                add(&c.path, &c.sha256, c.len);
            }
        }
        for &i in dropped {
            let (key, start, end) = &self.keys[i];
            match self.full.iter().find(|(f, _, _)| *f == i) {
                Some((_, sha, len)) => add(key, sha, *len),
                None => {
                    // Nothing inside was cut: the stored value is the full one (a string's
                    // entry is of its text, like a cut string's).
                    let stored = &self.buf[*start..*end];
                    match serde_json::from_slice::<String>(stored) {
                        Ok(text) => add(key, &Sha256::digest(text.as_bytes()).into(), text.len() as u64),
                        Err(_) => add(key, &Sha256::digest(stored).into(), stored.len() as u64),
                    }
                }
            }
        }
        if m.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(128 * m.len());
        write_object(&m, &mut out, None, &mut Vec::new()).ok()?;
        Some(out)
    }
}

/// A value; with `at`, strings over [`MAX_STRING_BYTES`] are cut and recorded in `cuts`.
fn write(v: &Value, out: &mut Vec<u8>, at: Option<&At<'_>>, cuts: &mut Vec<Cut>) -> Result<(), AuditError> {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            let text = if let Some(u) = n.as_u64() {
                u.to_string()
            } else if let Some(i) = n.as_i64() {
                i.to_string()
            } else {
                return Err(AuditError::Canonical(format!("non-integer number {n} (write it as a string)")));
            };
            write_str(&text, out);
        }
        Value::String(s) => write_str_at(s, out, at, cuts),
        Value::Array(a) => {
            out.push(b'[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match at {
                    Some(at) => write(item, out, Some(&at.child(Seg::Index(i))), cuts)?,
                    None => write(item, out, None, cuts)?,
                }
            }
            out.push(b']');
        }
        Value::Object(m) => write_object(m, out, at, cuts)?,
    }
    Ok(())
}

fn write_object(
    m: &Map<String, Value>,
    out: &mut Vec<u8>,
    at: Option<&At<'_>>,
    cuts: &mut Vec<Cut>,
) -> Result<(), AuditError> {
    // UTF-8 byte order is UTF-16 order unless a key holds a character at or above U+E000 (lead
    // byte 0xEE or more); the map usually iterates sorted already.
    let mut pairs: Vec<(&String, &Value)> = m.iter().collect();
    let byte_sorted = pairs.windows(2).all(|w| w[0].0 < w[1].0);
    if !byte_sorted || pairs.iter().any(|(k, _)| k.bytes().any(|b| b >= 0xEE)) {
        pairs.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
    }
    out.push(b'{');
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(k, out);
        out.push(b':');
        match at {
            Some(at) => write(v, out, Some(&at.child(Seg::Key(k))), cuts)?,
            None => write(v, out, None, cuts)?,
        }
    }
    out.push(b'}');
    Ok(())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a UTF-8 boundary.
pub fn utf8_prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A string; with `at`, cut when longer than [`MAX_STRING_BYTES`] (its full hash and length go
/// to `cuts`).
fn write_str_at(s: &str, out: &mut Vec<u8>, at: Option<&At<'_>>, cuts: &mut Vec<Cut>) {
    match at {
        Some(at) if s.len() > MAX_STRING_BYTES => {
            let mut kept = String::with_capacity(CUT_STRING_BYTES + 3);
            kept.push_str(utf8_prefix(s, CUT_STRING_BYTES));
            kept.push('…');
            write_str(&kept, out);
            cuts.push(Cut::of(at.field, at.render(), s.as_bytes()));
        }
        _ => write_str(s, out),
    }
}

/// Whether any of the eight bytes is `"`, `\` or a control character (below 0x20), by the
/// zero-byte tests of "Bit Twiddling Hacks": exact, no false positives or negatives.
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let below_0x20 = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
    below_0x20 || zero_in(w ^ (ONES * b'"' as u64)) || zero_in(w ^ (ONES * b'\\' as u64))
}

/// A JSON string in canonical form.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    // Most strings need no escape at all: skip eight bytes at a time while none of them does.
    let mut clean = 0;
    while let Some(chunk) = bytes.get(clean..clean + 8) {
        if needs_escape(u64::from_le_bytes(chunk.try_into().unwrap_or_default())) {
            break;
        }
        clean += 8;
    }
    for (i, &b) in bytes.iter().enumerate().skip(clean) {
        // Only `"`, `\` and control characters are escaped; everything else (UTF-8 included) is
        // copied as is, in runs.
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0c => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod cut_tests {
    use super::*;
    use serde_json::json;

    fn joined(f: &Fields) -> Value {
        let mut out = Vec::new();
        f.join_within(&[("idx", b"\"1\"")], crate::MAX_ENTRY_BYTES, &mut out);
        // What is stored is canonical: a fixed point of the encoder.
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(canonical_json(&v).unwrap(), out);
        v
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    #[test]
    fn strings_up_to_the_limit_are_kept_and_longer_ones_cut_with_their_hash() {
        let exact = "a".repeat(MAX_STRING_BYTES);
        let over = "b".repeat(MAX_STRING_BYTES + 1);
        let mut f = Fields::new();
        f.str("kind", "decision").str("path", &exact).str("query", &over);
        let e = joined(&f);
        assert_eq!(e["path"], exact.as_str());
        assert_eq!(e["query"], format!("{}…", "b".repeat(CUT_STRING_BYTES)).as_str());
        assert_eq!(e["truncated"], json!({"query": {"sha256": sha(over.as_bytes()), "len": "1025"}}));

        // Nothing cut: no `truncated` map at all.
        let mut f = Fields::new();
        f.str("path", &exact);
        assert!(joined(&f).get("truncated").is_none());
    }

    #[test]
    fn the_kept_prefix_ends_on_a_utf8_boundary() {
        // One ASCII byte, then two-byte characters: byte 256 falls inside a character.
        let s = format!("x{}", "é".repeat(700));
        let mut f = Fields::new();
        f.str("path", &s);
        let e = joined(&f);
        let kept = e["path"].as_str().unwrap().strip_suffix('…').unwrap();
        assert_eq!(kept.len(), 255);
        assert!(s.starts_with(kept));
        assert_eq!(e["truncated"]["path"]["len"], s.len().to_string().as_str());
        // Four-byte characters: at most three bytes short.
        let s = "😀".repeat(300);
        assert_eq!(utf8_prefix(&s, CUT_STRING_BYTES).len(), 256);
        let s = format!("ab{}", "😀".repeat(300));
        assert_eq!(utf8_prefix(&s, CUT_STRING_BYTES).len(), 254);
        // Escaped characters count by their text, not their JSON form.
        let s = "\"".repeat(MAX_STRING_BYTES);
        let mut f = Fields::new();
        f.str("path", &s);
        assert_eq!(joined(&f)["path"], s.as_str());
    }

    #[test]
    fn nested_values_are_cut_under_their_json_path() {
        let long = "v".repeat(2000);
        let mut headers = Map::new();
        headers.insert("x-long".into(), json!(long));
        headers.insert("x-short".into(), json!("s"));
        headers.insert("x-many".into(), json!(["a", long]));
        let mut f = Fields::new();
        f.map("headers", &headers).unwrap();
        f.value("params", &json!({"customer": long, "nested": {"deep": long}})).unwrap();
        f.value("reasons", &json!([{"code": "c", "message": long}])).unwrap();
        let e = joined(&f);
        let t = e["truncated"].as_object().unwrap();
        let keys: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["headers.x-long", "headers.x-many.1", "params.customer", "params.nested.deep", "reasons.0.message"]
        );
        for v in t.values() {
            assert_eq!(v, &json!({"sha256": sha(long.as_bytes()), "len": "2000"}));
        }
        assert_eq!(e["headers"]["x-short"], "s");
        assert_eq!(e["headers"]["x-many"][0], "a");
        assert!(e["params"]["nested"]["deep"].as_str().unwrap().ends_with('…'));
        // `canonical_json` (what action hashes are made of) never cuts.
        let full = canonical_json(&json!({"customer": long})).unwrap();
        assert!(full.len() > 2000);
    }

    #[test]
    fn an_entry_still_too_large_drops_whole_fields_in_order_until_it_fits() {
        let mut headers = Map::new();
        for i in 0..60 {
            headers.insert(format!("x-h-{i:02}"), json!("h".repeat(1100)));
        }
        let mut f = Fields::new();
        f.str("kind", "decision").str("request_id", "r1").str("path", &"p".repeat(5000));
        f.map("headers", &headers).unwrap();
        f.str("decision", "allow");
        let mut out = Vec::new();
        f.join_within(&[("idx", b"\"1\"")], crate::MAX_ENTRY_BYTES, &mut out);
        assert!(out.len() <= crate::MAX_ENTRY_BYTES, "{}", out.len());
        let e: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(canonical_json(&e).unwrap(), out);
        // `headers` went first (with its cut strings); the rest stays, `path` still cut.
        assert!(e.get("headers").is_none());
        let t = e["truncated"].as_object().unwrap();
        let full_headers = canonical_json(&Value::Object(headers.clone())).unwrap();
        assert_eq!(t["headers"], json!({"sha256": sha(&full_headers), "len": full_headers.len().to_string()}));
        assert!(!t.keys().any(|k| k.starts_with("headers.")), "{t:?}");
        assert_eq!(t["path"]["len"], "5000");
        assert_eq!(e["kind"], "decision");
        assert_eq!(e["decision"], "allow");
        assert_eq!(e["idx"], "1");

        // Without a bound (`join`), nothing is dropped.
        let mut unbounded = Vec::new();
        f.join(&[("idx", b"\"1\"")], &mut unbounded);
        assert!(unbounded.len() > crate::MAX_ENTRY_BYTES);

        // Several fields must go: in the documented order, then largest first; `kind` never.
        let mut f = Fields::new();
        f.str("kind", "x");
        for (i, key) in ["a", "b", "c", "d", "e", "f", "g", "h"].into_iter().enumerate() {
            // Under the string limit, so nothing is cut: only dropping helps.
            let many: Map<String, Value> = (0..3).map(|j| (format!("k{j}"), json!("z".repeat(1000 + i)))).collect();
            f.map(key, &many).unwrap();
        }
        let mut out = Vec::new();
        f.join_within(&[], crate::MAX_ENTRY_BYTES, &mut out);
        assert!(out.len() <= crate::MAX_ENTRY_BYTES);
        let e: Value = serde_json::from_slice(&out).unwrap();
        // The largest (the last ones) were dropped, the smallest kept.
        assert!(e.get("h").is_none() && e.get("a").is_some(), "{e}");
        assert_eq!(e["kind"], "x");
        let dropped: Vec<&String> = e["truncated"].as_object().unwrap().keys().collect();
        assert_eq!(dropped, ["f", "g", "h"], "{} {e}", out.len());
    }

    fn arb_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let ch = prop_oneof![Just('a'), Just('é'), Just('😀'), Just('"'), Just('\n')];
        prop_oneof![
            prop::collection::vec(ch.clone(), 0..8).prop_map(String::from_iter),
            prop::collection::vec(ch, 900..1400).prop_map(String::from_iter),
        ]
    }

    fn arb_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        arb_text().prop_map(Value::String).prop_recursive(2, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The value at a `truncated` path (keys here never contain `.`).
    fn at_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
        path.split('.').try_fold(v, |v, seg| match v {
            Value::Object(m) => m.get(seg),
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?),
            _ => None,
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the fields, the stored entry is canonical, within the limit, cuts nothing
        /// short, and its `truncated` map accounts for every value it cut or dropped.
        #[test]
        fn every_cut_and_drop_is_accounted_for(
            m in proptest::collection::btree_map("[a-z]{1,3}", arb_value(), 0..10),
        ) {
            let original: Map<String, Value> = m.into_iter().collect();
            let f = Fields::from_map(original.clone()).unwrap();
            let mut out = Vec::new();
            f.join_within(&[("idx", b"\"1\"")], crate::MAX_ENTRY_BYTES, &mut out);
            proptest::prop_assert!(out.len() <= crate::MAX_ENTRY_BYTES);
            let stored: Value = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(canonical_json(&stored).unwrap(), out.clone());
            let mut whole = original.clone();
            whole.insert("idx".into(), json!("1"));
            let original = Value::Object(whole);
            let Some(t) = stored.get("truncated") else {
                // Nothing cut or dropped: exactly the canonical JSON of the fields.
                proptest::prop_assert_eq!(out, canonical_json(&original).unwrap());
                return Ok(());
            };
            for (path, entry) in t.as_object().unwrap() {
                let full = at_path(&original, path).unwrap();
                let text = match full {
                    Value::String(s) => s.as_bytes().to_vec(),
                    other => canonical_json(other).unwrap(),
                };
                proptest::prop_assert_eq!(&entry["sha256"], &json!(sha(&text)));
                proptest::prop_assert_eq!(&entry["len"], &json!(text.len().to_string()));
                if let (Some(kept), Value::String(s)) = (at_path(&stored, path), full) {
                    let want = format!("{}…", utf8_prefix(s, CUT_STRING_BYTES));
                    proptest::prop_assert_eq!(kept, &json!(want));
                }
            }
            // Whatever is stored and not cut is the original value.
            for (k, v) in stored.as_object().unwrap() {
                if k != "truncated" && !t.as_object().unwrap().keys().any(|p| p == k || p.starts_with(&format!("{k}."))) {
                    proptest::prop_assert_eq!(Some(v), original.get(k));
                }
            }
        }
    }

    #[test]
    fn a_dropped_string_field_keeps_the_hash_of_its_text() {
        let mut f = Fields::new();
        let path = format!("\"{}", "p".repeat(1000));
        f.str("kind", "k").str("path", &path);
        let many: Map<String, Value> = (0..80).map(|j| (format!("k{j}"), json!("z".repeat(1000)))).collect();
        f.map("params", &many).unwrap();
        f.str("query", &"q".repeat(40_000));
        let mut out = Vec::new();
        // A small bound: params, query and path all go.
        f.join_within(&[], 512, &mut out);
        let e: Value = serde_json::from_slice(&out).unwrap();
        assert!(out.len() <= 512, "{e}");
        assert!(e.get("path").is_none(), "{e}");
        assert_eq!(e["truncated"]["path"], json!({"sha256": sha(path.as_bytes()), "len": "1001"}));
        assert_eq!(e["truncated"]["query"]["len"], "40000");
    }
}
