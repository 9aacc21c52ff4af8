//! CONNECT authorities, Host headers and route patterns/paths.
#![no_main]
use libfuzzer_sys::fuzz_target;
use uapk_gateway::config::PathPattern;
use uapk_gateway::proxy::split_authority;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = split_authority(s);
    let (pattern, path) = s.split_once('\n').unwrap_or((s, "/"));
    if let Ok(p) = PathPattern::parse(pattern)
        && let Some(caps) = p.matches(path)
    {
        assert!(caps.len() <= p.segs.len());
    }
});
