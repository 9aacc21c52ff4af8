//! The export bundle as a POSIX ustar stream (`POST /v1/export`) and back (`export --admin`).
//! Only what a bundle needs: regular files at the top level, names without `/`.

use super::AuditError;

const BLOCK: usize = 512;

/// The files of a bundle in the order they are streamed.
pub(crate) const TAR_FILES: [&str; 6] =
    ["manifest.json", "manifest.json.sig", "checkpoint", "prefix.json", "gateway.pub.pem", "entries.jsonl"];

fn octal(field: &mut [u8], value: u64) {
    let width = field.len() - 1;
    let s = format!("{value:0width$o}");
    field[..width].copy_from_slice(&s.as_bytes()[s.len() - width..]);
    field[width] = 0;
}

/// The 512-byte ustar header of a regular file.
pub(crate) fn header(name: &str, size: u64, mtime: u64) -> Result<[u8; BLOCK], AuditError> {
    if name.is_empty() || name.len() > 100 || name.contains('/') || name == ".." {
        return Err(AuditError::Io(format!("{name:?} cannot be a bundle file name")));
    }
    if size >= 8u64.pow(11) {
        return Err(AuditError::Io(format!("{name} is too large for a ustar entry")));
    }
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], mtime.min(8u64.pow(11) - 1));
    h[148..156].copy_from_slice(b"        ");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// Zero bytes that pad `size` bytes of data to a whole block.
pub(crate) fn padding(size: u64) -> usize {
    (BLOCK - (size as usize % BLOCK)) % BLOCK
}

/// The end of an archive: two zero blocks.
pub(crate) const END: [u8; 2 * BLOCK] = [0u8; 2 * BLOCK];

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Extracts a bundle tar into `out` (created 0700). Refuses anything but regular files with
/// plain names (no paths, no links), checksums that do not match, and truncated archives.
pub fn extract(mut tar: &[u8], out: &std::path::Path) -> Result<Vec<String>, AuditError> {
    let bad = |m: &str| AuditError::Io(format!("the export archive is malformed: {m}"));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(out)
            .map_err(|e| AuditError::Io(format!("{}: {e}", out.display())))?;
    }
    let mut names = Vec::new();
    loop {
        if tar.len() < BLOCK {
            return Err(bad("it ends before its end marker"));
        }
        let (h, rest) = tar.split_at(BLOCK);
        if h.iter().all(|&b| b == 0) {
            return Ok(names);
        }
        let stored = parse_octal(&h[148..156]).ok_or_else(|| bad("bad checksum field"))?;
        let sum: u64 =
            h.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u64::from(b) }).sum();
        if stored != sum {
            return Err(bad("a header checksum does not match"));
        }
        if !(h[156] == b'0' || h[156] == 0) {
            return Err(bad("an entry is not a regular file"));
        }
        let end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = std::str::from_utf8(&h[..end]).map_err(|_| bad("a file name is not UTF-8"))?.to_string();
        if !TAR_FILES.contains(&name.as_str()) {
            return Err(bad(&format!("unexpected file {name:?}")));
        }
        let size = parse_octal(&h[124..136]).ok_or_else(|| bad("bad size field"))?;
        let size = usize::try_from(size).map_err(|_| bad("size too large"))?;
        let padded = size.checked_add(padding(size as u64)).ok_or_else(|| bad("size too large"))?;
        if rest.len() < padded {
            return Err(bad("it is truncated"));
        }
        std::fs::write(out.join(&name), &rest[..size]).map_err(|e| AuditError::Io(format!("{name}: {e}")))?;
        names.push(name);
        tar = &rest[padded..];
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bundle_tars_round_trip_and_malformed_ones_are_refused() {
        use super::{END, TAR_FILES, extract, header, padding};
        let mut t = Vec::new();
        for (i, name) in TAR_FILES.iter().enumerate() {
            let body = vec![b'a' + i as u8; 700 * i];
            t.extend_from_slice(&header(name, body.len() as u64, 1_700_000_000).unwrap());
            t.extend_from_slice(&body);
            t.extend(std::iter::repeat_n(0u8, padding(body.len() as u64)));
        }
        t.extend_from_slice(&END);
        let dir = tempfile::tempdir().unwrap();
        let names = extract(&t, &dir.path().join("out")).unwrap();
        assert_eq!(names, TAR_FILES.to_vec());
        assert_eq!(std::fs::read(dir.path().join("out/entries.jsonl")).unwrap(), vec![b'f'; 3500]);
        // Cut short, a bad checksum, an unexpected name: refused.
        assert!(extract(&t[..t.len() - 1100], &dir.path().join("a")).is_err());
        let mut bad = t.clone();
        bad[5] ^= 1;
        assert!(extract(&bad, &dir.path().join("b")).is_err());
        let mut evil = header("checkpoint", 0, 0).unwrap().to_vec();
        evil[..10].copy_from_slice(b"../escape\0");
        assert!(extract(&[evil, END.to_vec()].concat(), &dir.path().join("c")).is_err());
        assert!(header("a/b", 1, 0).is_err());
    }
}
