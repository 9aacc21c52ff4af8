//! Fixtures for the limits module's unit tests.

use crate::config::{Manifest, Strictness, load_manifest};

/// A manifest for `unit-agent` with a `pay` connector (POST /refunds → payment.refund, reading an
/// amount and a currency from a form) and `policy` as the body of its `policy:` block.
pub(super) fn manifest(policy: &str) -> Manifest {
    let text = format!(
        "apiVersion: uapk/v1\nkind: Manifest\nagent: {{ id: unit-agent }}\ncapability: {{ required: false }}\nconnectors:\n  - name: pay\n    base_url: https://pay.example.com\n    routes:\n      - {{ methods: [POST], path: /refunds, action: payment.refund, params: {{ amount: {{ form: amount }}, currency: {{ form: currency }} }} }}\npolicy:\n{policy}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(&p, text).unwrap();
    load_manifest(&p, Strictness::Check).unwrap_or_else(|e| panic!("{e}")).0
}
