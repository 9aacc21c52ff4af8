//! The TLS ClientHello SNI reader of the transparent listener (peer bytes).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = uapk_gateway::proxy::tls::client_hello_sni(data);
});
