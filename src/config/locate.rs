//! Finds the line and column of a key path (`connectors[0].routes[1].path`) in block-style YAML
//! text, so that semantic errors found after parsing still point at the right place.
//! Falls back to the nearest ancestor that can be found.

#[derive(Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let mut rest = part;
        if let Some(b) = rest.find('[') {
            if b > 0 {
                out.push(Seg::Key(rest[..b].to_string()));
            }
            rest = &rest[b..];
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(e) = stripped.find(']') else { break };
                if let Ok(i) = stripped[..e].parse() {
                    out.push(Seg::Index(i));
                }
                rest = &stripped[e + 1..];
            }
        } else if !rest.is_empty() {
            out.push(Seg::Key(rest.to_string()));
        }
    }
    out
}

struct Line<'a> {
    /// Column where a key on this line starts (after indentation and any "- ").
    key_col: usize,
    /// Column of the leading "-" for sequence items.
    dash_col: Option<usize>,
    content: &'a str,
    indent: usize,
}

fn analyse(raw: &str) -> Option<Line<'_>> {
    let indent = raw.len() - raw.trim_start_matches(' ').len();
    let trimmed = raw[indent..].trim_end();
    if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
        return None;
    }
    if trimmed == "-" || trimmed.starts_with("- ") {
        let after = trimmed[1..].trim_start();
        let key_col = indent + (trimmed.len() - after.len());
        return Some(Line { key_col, dash_col: Some(indent), content: after, indent });
    }
    Some(Line { key_col: indent, dash_col: None, content: trimmed, indent })
}

fn key_matches(content: &str, key: &str) -> bool {
    let unquoted = content
        .strip_prefix('"')
        .and_then(|c| c.strip_prefix(key))
        .and_then(|c| c.strip_prefix('"'))
        .or_else(|| content.strip_prefix(key));
    matches!(unquoted, Some(rest) if rest.starts_with(':'))
}

/// Returns 1-based (line, column) of `path` in `text`.
pub(super) fn locate(text: &str, path: &str) -> (usize, usize) {
    let lines: Vec<Option<Line>> = text.lines().map(analyse).collect();
    let mut best = (1, 1);
    // The block being searched: lines [start, end) whose key column is > parent, or == parent for
    // sequence items directly under a key.
    let mut start = 0;
    let mut end = lines.len();
    let mut inline: Option<(usize, usize)> = None; // (line, col) of a value written on the key's line
    for seg in parse_path(path) {
        if let Some((l, c)) = inline {
            // Flow style: look for the key on the same line after the column.
            if let Seg::Key(k) = &seg
                && let Some(Some(line)) = lines.get(l)
            {
                let rel = c.saturating_sub(line.key_col);
                if let Some(found) = line.content.get(rel..).and_then(|s| s.find(&format!("{k}:"))) {
                    best = (l + 1, line.key_col + rel + found + 1);
                    inline = Some((l, line.key_col + rel + found + k.len()));
                    continue;
                }
            }
            return best;
        }
        let block: Vec<usize> = (start..end).filter(|&i| lines[i].is_some()).collect();
        let found = match &seg {
            Seg::Key(k) => {
                let col = block.first().map(|&i| lines[i].as_ref().map_or(0, |l| l.key_col));
                block.iter().copied().find(|&i| {
                    let l = lines[i].as_ref().expect("filtered");
                    Some(l.key_col) == col && key_matches(l.content, k)
                })
            }
            Seg::Index(n) => {
                let dash = block.iter().find_map(|&i| lines[i].as_ref().and_then(|l| l.dash_col));
                block
                    .iter()
                    .copied()
                    .filter(|&i| dash.is_some() && lines[i].as_ref().and_then(|l| l.dash_col) == dash)
                    .nth(*n)
            }
        };
        let Some(i) = found else { return best };
        let line = lines[i].as_ref().expect("filtered");
        let col = match seg {
            Seg::Index(_) => line.dash_col.unwrap_or(line.indent),
            Seg::Key(_) => line.key_col,
        };
        best = (i + 1, col + 1);
        // The block of this node: following lines indented deeper than it.
        let own = col;
        let mut j = i + 1;
        while j < lines.len() {
            if let Some(l) = &lines[j] {
                let deeper = l.indent > own || (matches!(seg, Seg::Key(_)) && l.indent == own && l.dash_col.is_some());
                if !deeper {
                    break;
                }
            }
            j += 1;
        }
        match seg {
            Seg::Key(ref k) => {
                let value = line.content[k.len()..].trim_start_matches(['"', ':']).trim();
                if !value.is_empty() && !value.starts_with('#') && !value.starts_with('|') && !value.starts_with('>') {
                    inline = Some((i, line.key_col + k.len()));
                }
                start = i + 1;
            }
            Seg::Index(_) => {
                // The item's first key is on the dash line itself.
                if line.content.is_empty() {
                    start = i + 1;
                } else {
                    start = i;
                }
            }
        }
        end = j;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::locate;

    const DOC: &str = "apiVersion: uapk/v1\nagent:\n  id: Bad\nconnectors:\n  - name: a\n    routes:\n      - path: /x\n        action: a.b\n      - path: /y\n        params:\n          amount: { json: /amount, scale: 2 }\npolicy:\n  connectors: { allow: [nope] }\n  budgets:\n  - window: day\n    scope: agent\n";

    #[test]
    fn finds_nested_keys_and_items() {
        assert_eq!(locate(DOC, "agent.id"), (3, 3));
        assert_eq!(locate(DOC, "connectors[0].name"), (5, 5));
        assert_eq!(locate(DOC, "connectors[0].routes[1].path"), (9, 9));
        assert_eq!(locate(DOC, "connectors[0].routes[1].params.amount.scale"), (11, 36));
        assert_eq!(locate(DOC, "policy.connectors.allow"), (13, 17));
        assert_eq!(locate(DOC, "policy.budgets[0].scope"), (16, 5));
    }

    #[test]
    fn falls_back_to_nearest_ancestor() {
        assert_eq!(locate(DOC, "policy.missing"), (12, 1));
        assert_eq!(locate(DOC, "connectors[7]"), (4, 1));
        assert_eq!(locate("", "a.b"), (1, 1));
    }
}
