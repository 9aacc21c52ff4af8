use super::merkle::*;
use super::*;
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn hexh(s: &str) -> Hash {
    hex::decode(s).unwrap().try_into().unwrap()
}

// ---------------------------------------------------------------- canonical JSON

#[test]
fn canonical_sorts_keys_by_utf16_and_escapes_minimally() {
    // U+1F600 (surrogate pair D83D) sorts before U+FB01 in UTF-16 though not in UTF-8 / chars.
    let v =
        json!({"b": "x", "a": {"z": true, "y": null}, "\u{fb01}": "1", "\u{1f600}": "2", "c": ["\n\t\u{1}\"\\/", "é"]});
    let out = String::from_utf8(canonical_json(&v).unwrap()).unwrap();
    assert_eq!(
        out,
        "{\"a\":{\"y\":null,\"z\":true},\"b\":\"x\",\"c\":[\"\\n\\t\\u0001\\\"\\\\/\",\"é\"],\"\u{1f600}\":\"2\",\"\u{fb01}\":\"1\"}"
    );
}

#[test]
fn canonical_writes_integers_as_strings_and_refuses_floats() {
    assert_eq!(canonical_json(&json!({"n": 42, "m": -7})).unwrap(), br#"{"m":"-7","n":"42"}"#);
    assert!(matches!(canonical_json(&json!({"f": 1.5})), Err(Error::Canonical(_))));
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::Bool), ".{0,12}".prop_map(Value::String),];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    /// Strings are escaped as JSON requires, wherever in a long run the special byte falls (the
    /// writer skips clean eight-byte chunks).
    #[test]
    fn strings_escape_like_json(prefix in "[a-zé]{0,40}", special in prop::sample::select(vec!['"', '\\', '\n', '\u{1}', '\u{1f}', ' ', '\u{7f}', 'é']), suffix in ".{0,20}") {
        let s = format!("{prefix}{special}{suffix}");
        let mut out = Vec::new();
        super::canonical::write_str(&s, &mut out);
        prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&s).unwrap());
    }

    #[test]
    fn canonical_is_a_fixed_point(v in arb_json()) {
        let once = canonical_json(&v).unwrap();
        let reparsed: Value = serde_json::from_slice(&once).unwrap();
        prop_assert_eq!(canonical_json(&reparsed).unwrap(), once);
    }

    /// What the writer stores (fields in canonical form joined with its own) is exactly the
    /// canonical JSON of the merged object, the writer's keys winning.
    #[test]
    fn joined_fields_are_the_canonical_merged_object(
        m in prop::collection::btree_map("[a-z\u{e000}-\u{ffff}\u{1f600}]{0,5}", arb_json(), 0..8),
        idx in "[0-9]{1,4}",
    ) {
        let map: Map<String, Value> = m.into_iter().collect();
        let fields = canonical::Fields::from_map(map.clone()).unwrap();
        let mut out = Vec::new();
        let idx_json = serde_json::to_vec(&idx).unwrap();
        fields.join(&[("idx", &idx_json), ("v", b"\"1\"")], &mut out);
        let mut merged = map;
        merged.insert("idx".into(), Value::String(idx));
        merged.insert("v".into(), json!("1"));
        prop_assert_eq!(String::from_utf8(out).unwrap(), String::from_utf8(canonical_json(&Value::Object(merged)).unwrap()).unwrap());
    }
}

#[test]
fn fields_builders_write_canonical_values() {
    let mut f = canonical::Fields::new();
    f.str("kind", "decision").opt_str("route", None).int("port", 443u16).str("path", "/a\"b");
    f.value("params", &json!({"b": 1, "a": "x"})).unwrap();
    assert!(f.value("bad", &json!(1.5)).is_err());
    let mut out = Vec::new();
    f.join(&[("idx", b"\"7\"")], &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"{"idx":"7","kind":"decision","params":{"a":"x","b":"1"},"path":"/a\"b","port":"443","route":null}"#
    );
}

// ---------------------------------------------------------------- Merkle tree (RFC 6962 vectors)

/// The leaves of the Certificate Transparency reference test vectors.
fn ct_leaves() -> Vec<Hash> {
    ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
        .iter()
        .map(|h| leaf_hash(&hex::decode(h).unwrap()))
        .collect()
}

#[test]
fn roots_match_the_rfc6962_reference_vectors() {
    let roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    let leaves = ct_leaves();
    let mut f = Frontier::new();
    for (i, want) in roots.iter().enumerate() {
        f.push(leaves[i]);
        assert_eq!(root_from_leaves(&leaves[..=i]), hexh(want), "size {}", i + 1);
        assert_eq!(f.root(), hexh(want), "frontier size {}", i + 1);
    }
    assert_eq!(hex::encode(root_from_leaves(&[])), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

#[test]
fn proofs_match_the_rfc6962_reference_vectors() {
    let leaves = ct_leaves();
    // Inclusion of leaf 0 in the tree of 8 (RFC 6962 test data).
    let p = inclusion_proof(&leaves, 0);
    let want = [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ];
    assert_eq!(p, want.iter().map(|h| hexh(h)).collect::<Vec<_>>());
    // Consistency from 1 → 8 and 6 → 8.
    let c = consistency_proof(&leaves, 1);
    assert_eq!(c, want.iter().map(|h| hexh(h)).collect::<Vec<_>>());
    let c = consistency_proof(&leaves, 6);
    let want6 = [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ];
    assert_eq!(c, want6.iter().map(|h| hexh(h)).collect::<Vec<_>>());
}

proptest! {
    #[test]
    fn inclusion_proofs_verify_and_altered_ones_fail(n in 1usize..70, seed in any::<u64>(), flip in any::<usize>()) {
        let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(format!("{seed}-{i}").as_bytes())).collect();
        let root = root_from_leaves(&leaves);
        let i = (seed as usize) % n;
        let proof = inclusion_proof(&leaves, i);
        prop_assert!(verify_inclusion(i as u64, n as u64, &leaves[i], &proof, &root));
        prop_assert!(!verify_inclusion(i as u64, n as u64, &leaf_hash(b"other"), &proof, &root));
        if !proof.is_empty() {
            let mut bad = proof.clone();
            let k = flip % bad.len();
            bad[k][0] ^= 1;
            prop_assert!(!verify_inclusion(i as u64, n as u64, &leaves[i], &bad, &root));
        }
        if n > 1 {
            prop_assert!(!verify_inclusion(((i + 1) % n) as u64, n as u64, &leaves[i], &proof, &root));
        }
    }

    #[test]
    fn consistency_proofs_verify_and_altered_ones_fail(n in 2usize..70, seed in any::<u64>(), flip in any::<usize>()) {
        let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(format!("{seed}-{i}").as_bytes())).collect();
        let m = 1 + (seed as usize) % (n - 1);
        let (old, new) = (root_from_leaves(&leaves[..m]), root_from_leaves(&leaves));
        let proof = consistency_proof(&leaves, m);
        prop_assert!(verify_consistency(m as u64, n as u64, &old, &new, &proof));
        let mut bad = proof.clone();
        let k = flip % bad.len();
        bad[k][31] ^= 0x80;
        prop_assert!(!verify_consistency(m as u64, n as u64, &old, &new, &bad));
        prop_assert!(!verify_consistency(m as u64, n as u64, &leaf_hash(b"fork"), &new, &proof));
    }
}

#[test]
fn frontier_serialises() {
    let mut f = Frontier::new();
    for i in 0..13u8 {
        f.push(leaf_hash(&[i]));
    }
    assert_eq!(Frontier::from_bytes(&f.to_bytes()), Some(f.clone()));
    assert_eq!(Frontier::from_bytes(&f.to_bytes()[..40]), None);
}

// ---------------------------------------------------------------- signed notes

#[test]
fn checkpoints_sign_and_parse_and_refuse_tampering() {
    let key = SigningKey::from_bytes(&[3u8; 32]);
    let keys = vec![("example.com/log".to_string(), key.verifying_key())];
    let cp = Checkpoint { origin: "example.com/log".into(), size: 42, root: leaf_hash(b"x") };
    let note = cp.sign("example.com/log", &key);
    assert!(note.starts_with("example.com/log\n42\n"));
    assert!(note.contains("\n\n\u{2014} example.com/log "));
    assert_eq!(parse_checkpoint(&note, &keys).unwrap(), cp);
    assert!(parse_checkpoint(&note.replace("\n42\n", "\n43\n"), &keys).is_err());
    assert!(parse_checkpoint(&note.replace("example.com/log\n", "other/log\n"), &keys).is_err());
    let other = vec![("example.com/log".to_string(), SigningKey::from_bytes(&[4u8; 32]).verifying_key())];
    assert!(parse_checkpoint(&note, &other).is_err());
    assert!(parse_checkpoint("garbage", &keys).is_err());
    assert!(parse_checkpoint("", &keys).is_err());
}
