//! Stage 1, the target: where a request is going, read the way the upstream will read it (host
//! lower-case without a trailing dot, one port, a path with no dot segments, path parameters
//! or encoded separators), before anything about the agent is known.

use super::{Arrival, Facts, Stop};
use crate::config::Scheme;
use crate::policy::{At, Code, Decision};
use http::{Method, header, request::Parts};

/// What the request names before its agent is known.
pub(crate) struct Target {
    /// The connector named by a base-URL path (`/<connector>/...`); `None` when the host says.
    pub base_connector: Option<String>,
    /// The path below the connector's base (base-URL) or as sent.
    pub path: String,
    /// The token presented on the tunnel's CONNECT, reused for each request inside it.
    pub preset_token: Option<(Option<String>, String)>,
}

impl Target {
    /// A call of the gateway's own agent API (`/uapk/v1/...`), never forwarded.
    pub(super) fn is_agent_api(&self) -> bool {
        self.base_connector.as_deref() == Some(super::AGENT_API)
    }
}

/// Reads the target from the request line, `Host` and how the request arrived; fills in
/// `facts.{scheme,host,port}`. Requests that cannot be read are refused before identification
/// (not recorded: nobody is identified yet); a tunnel request naming another host, or a path
/// the gateway refuses to interpret, is recorded.
pub(crate) fn parse(parts: &Parts, arrival: &Arrival, facts: &mut Facts) -> Result<Target, Stop> {
    // Both framings at once is how requests are smuggled past proxies (RFC 9112 §6.3): refuse.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) && parts.headers.contains_key(header::CONTENT_LENGTH) {
        return Err(Stop::unrecorded(Decision::deny(
            Code::MalformedRequest,
            "Content-Length and Transfer-Encoding together",
        )));
    }
    if parts.method == Method::CONNECT {
        return Err(Stop::unrecorded_at(
            Decision::deny(Code::MalformedRequest, "CONNECT is not allowed here"),
            At::WrongMethod,
        ));
    }
    let malformed = |why: &str| Stop::unrecorded(Decision::deny(Code::MalformedRequest, why));
    let mut target = Target { base_connector: None, path: parts.uri.path().to_string(), preset_token: None };
    match arrival {
        Arrival::Tunnel(t) => {
            facts.line.aim(Scheme::Https, t.host.clone(), t.port);
            facts.caller.agent = t.agent.clone();
            target.preset_token = t.token.clone();
            // Every request must name the tunnel's host (Host or :authority).
            let named = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string));
            let tunnel_host = normalize_host(&t.host);
            let same = named
                .as_deref()
                .and_then(split_authority)
                .is_some_and(|(h, p)| Some(&h) == tunnel_host.as_ref() && p.is_none_or(|p| p == t.port));
            if !same {
                return Err(Stop::refuse(Decision::deny(
                    Code::MisdirectedRequest,
                    "the request names another host than the tunnel",
                )));
            }
        }
        Arrival::Transparent(orig) => {
            let Some((host, _)) =
                parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).and_then(split_authority)
            else {
                return Err(malformed("a Host header is required"));
            };
            facts.line.aim(Scheme::Http, host, orig.port());
        }
        Arrival::Explicit => {
            if parts.uri.scheme_str() != Some("http") {
                return Err(malformed("absolute-form requests must use http://; use CONNECT for https"));
            }
            let Some(host) =
                normalize_host(parts.uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']'))
            else {
                return Err(malformed("the request target names no host"));
            };
            let port = parts.uri.port_u16().unwrap_or(80);
            // The Host header must agree with the absolute-form target.
            if let Some(h) = parts.headers.get(header::HOST) {
                let same = h
                    .to_str()
                    .ok()
                    .and_then(split_authority)
                    .is_some_and(|(hh, hp)| hh == host && hp.unwrap_or(80) == port);
                if !same {
                    return Err(malformed("the Host header does not match the request target"));
                }
            }
            facts.line.aim(Scheme::Http, host, port);
        }
        Arrival::BaseUrl => {
            let raw = parts.uri.path();
            let rest = raw.strip_prefix('/').unwrap_or(raw);
            let (name, tail) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            if name.is_empty() {
                return Err(Stop::unrecorded_at(
                    Decision::deny(Code::RouteNotAllowed, "name a connector: /<connector>/<path>"),
                    At::NoSuchPath,
                ));
            }
            target.base_connector = Some(name.to_string());
            target.path = tail.to_string();
        }
    }
    if ambiguous_path(&target.path) {
        return Err(Stop::refuse(Decision::deny(
            Code::MalformedRequest,
            "the path has dot segments, path parameters (;) or encoded separators",
        )));
    }
    Ok(target)
}

/// Agent-supplied text shown in messages: bounded and printable.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}

/// A path the gateway refuses to interpret: dot segments or encoded separators could make the
/// upstream see another path than the one the routes matched.
pub(crate) fn ambiguous_path(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    // Encoded separators, encoded dots and double encoding (`%25`) could decode, at the upstream
    // or a server behind it, into a path other than the one the routes matched. A `;` starts
    // path parameters (`;jsessionid=`, `..;/`) that some servers strip before routing and others
    // keep, raw or encoded.
    ["%2f", "%5c", "%2e", "%25", "%3b", "\\", ";"].iter().any(|bad| lower.contains(bad))
        || path.split('/').any(|s| s == "." || s == "..")
}

/// A host as the gateway compares it: lower-case, without the one trailing dot that names the
/// same host (`API.Example.com.` is `api.example.com`). Empty or doubly dotted names are none.
pub(crate) fn normalize_host(h: &str) -> Option<String> {
    let h = h.strip_suffix('.').unwrap_or(h);
    (!h.is_empty() && !h.ends_with('.')).then(|| h.to_ascii_lowercase())
}

/// Host and optional port of an authority such as `api.example.com:443` or `[::1]:8443`; the
/// host is normalised by `normalize_host`.
pub fn split_authority(a: &str) -> Option<(String, Option<u16>)> {
    let a = a.trim();
    if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if tail.is_empty() => None,
            None => return None,
        };
        return Some((normalize_host(h)?, port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((normalize_host(h)?, Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((normalize_host(a)?, None)),
    }
}

#[cfg(test)]
mod tests {
    use super::{ambiguous_path, normalize_host, split_authority};

    #[test]
    fn path_parameters_are_refused_like_dot_segments() {
        for p in [
            "/v1/refunds;jsessionid=abc",
            "/v1/charges/..;/refunds",
            "/v1/charges/x%3b/y",
            "/v1/charges/x%3B",
            "/v1;/charges",
            "/v1/../x",
            "/v1/%2e%2e/x",
        ] {
            assert!(ambiguous_path(p), "{p}");
        }
        for p in ["/v1/refunds", "/v1/charges/ch_1", "/v1/charges/x.", "/v1/a%20b"] {
            assert!(!ambiguous_path(p), "{p}");
        }
    }

    #[test]
    fn hosts_are_lower_case_without_a_trailing_dot() {
        assert_eq!(split_authority("API.Stripe.com.:443"), Some(("api.stripe.com".into(), Some(443))));
        assert_eq!(split_authority("api.stripe.com."), Some(("api.stripe.com".into(), None)));
        assert_eq!(split_authority("[::1]:8443"), Some(("::1".into(), Some(8443))));
        assert_eq!(split_authority("api.stripe.com..:443"), None);
        assert_eq!(split_authority(".:443"), None);
        assert_eq!(split_authority(":443"), None);
        assert_eq!(normalize_host("Shop.Test."), Some("shop.test".into()));
    }
}
