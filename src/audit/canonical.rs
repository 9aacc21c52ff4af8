//! RFC 8785 (JCS) canonical JSON, as the log stores it: object keys sorted by UTF-16 code
//! units, no insignificant whitespace, minimal string escaping. Integers are written as decimal
//! strings (the log holds no JSON numbers); any other number is refused.

use super::AuditError;
use serde_json::{Map, Value};
use std::borrow::Cow;

pub fn canonical_json(value: &Value) -> Result<Vec<u8>, AuditError> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out)?;
    Ok(out)
}

/// An entry's fields with each value already in canonical form, as producers hand them to the
/// writer; the writer adds `v`, `log`, `idx`, `ts` and `prev` and joins everything in key order
/// (`Fields::join`), so no JSON tree is built per entry.
#[derive(Debug, Default)]
pub struct Fields {
    buf: Vec<u8>,
    /// (key, start, end) of each value in `buf`, in insertion order.
    keys: Vec<(Cow<'static, str>, usize, usize)>,
}

impl Fields {
    pub fn new() -> Fields {
        Fields { buf: Vec::with_capacity(512), keys: Vec::with_capacity(24) }
    }

    fn put(&mut self, key: impl Into<Cow<'static, str>>, value: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        value(&mut self.buf);
        self.keys.push((key.into(), start, self.buf.len()));
    }

    /// A string value.
    pub fn str(&mut self, key: &'static str, v: &str) -> &mut Fields {
        self.put(key, |out| write_str(v, out));
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

    /// Like `put`, for a writer that can refuse its value (nothing is kept then).
    fn try_put(
        &mut self,
        key: impl Into<Cow<'static, str>>,
        value: impl FnOnce(&mut Vec<u8>) -> Result<(), AuditError>,
    ) -> Result<&mut Fields, AuditError> {
        let start = self.buf.len();
        if let Err(e) = value(&mut self.buf) {
            self.buf.truncate(start);
            return Err(e);
        }
        self.keys.push((key.into(), start, self.buf.len()));
        Ok(self)
    }

    /// Any JSON value, canonicalised.
    pub fn value(&mut self, key: impl Into<Cow<'static, str>>, v: &Value) -> Result<&mut Fields, AuditError> {
        self.try_put(key, |out| write(v, out))
    }

    /// A JSON object value, canonicalised (no copy of the map).
    pub fn map(&mut self, key: &'static str, m: &Map<String, Value>) -> Result<&mut Fields, AuditError> {
        self.try_put(key, |out| write_object(m, out))
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
    /// object. A key in `extra` wins over the same key here; of repeated keys here the last wins.
    pub fn join(&self, extra: &[(&'static str, &[u8])], out: &mut Vec<u8>) {
        let mut all: Vec<(&str, &[u8])> = Vec::with_capacity(self.keys.len() + extra.len());
        all.extend(self.keys.iter().map(|(k, start, end)| (k.as_ref(), &self.buf[*start..*end])));
        all.extend(extra.iter().map(|(k, v)| (*k, *v)));
        // Stable sorts: of equal keys, the one given last stays last.
        if all.iter().any(|(k, _)| k.bytes().any(|b| b >= 0xEE)) {
            all.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
        } else {
            all.sort_by(|a, b| a.0.cmp(b.0));
        }
        out.push(b'{');
        let mut first = true;
        for (i, (k, v)) in all.iter().enumerate() {
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
}

fn write(v: &Value, out: &mut Vec<u8>) -> Result<(), AuditError> {
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
        Value::String(s) => write_str(s, out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(m) => write_object(m, out)?,
    }
    Ok(())
}

fn write_object(m: &Map<String, Value>, out: &mut Vec<u8>) -> Result<(), AuditError> {
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
        write(v, out)?;
    }
    out.push(b'}');
    Ok(())
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
pub(crate) fn write_str(s: &str, out: &mut Vec<u8>) {
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
