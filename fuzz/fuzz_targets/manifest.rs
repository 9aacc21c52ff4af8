//! Manifest YAML: parsing, validation and the line:column locator must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use uapk_gateway::config::{Strictness, parse_manifest};

fuzz_target!(|data: &[u8]| {
    let _ = parse_manifest(Path::new("fuzz.yaml"), data, Path::new("/nonexistent"), Strictness::Run);
});
