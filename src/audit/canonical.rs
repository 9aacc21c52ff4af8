//! RFC 8785 (JCS) canonical JSON, as the log stores it: object keys sorted by UTF-16 code
//! units, no insignificant whitespace, minimal string escaping. Integers are written as decimal
//! strings (the log holds no JSON numbers); any other number is refused.

use super::AuditError;
use serde_json::Value;

pub fn canonical_json(value: &Value) -> Result<Vec<u8>, AuditError> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out)?;
    Ok(out)
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
        Value::Object(m) => {
            // UTF-8 byte order is UTF-16 order unless a key holds a character at or above
            // U+E000 (lead byte 0xEE or more); the map usually iterates sorted already.
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
        }
    }
    Ok(())
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
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
