//! RFC 6962 / RFC 9162 Merkle tree hashing and proofs.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// SHA-256(0x00 ‖ entry).
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry);
    h.finalize().into()
}

/// SHA-256(0x01 ‖ left ‖ right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n > 1).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// MTH over leaf hashes; the empty tree hashes to SHA-256("").
pub fn root_from_leaves(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root_from_leaves(&leaves[..k]), &root_from_leaves(&leaves[k..]))
        }
    }
}

/// The incremental tree state: one perfect-subtree root per set bit of the size, largest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.nodes.pop().expect("one node per set bit");
            node = node_hash(&left, &node);
            s >>= 1;
        }
        self.nodes.push(node);
        self.size += 1;
    }
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(last) = it.next() else { return Sha256::digest(b"").into() };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.size.to_be_bytes().to_vec();
        for n in &self.nodes {
            out.extend_from_slice(n);
        }
        out
    }
    pub fn from_bytes(b: &[u8]) -> Option<Frontier> {
        if b.len() < 8 || !(b.len() - 8).is_multiple_of(32) {
            return None;
        }
        let size = u64::from_be_bytes(b[..8].try_into().ok()?);
        let nodes: Vec<Hash> = b[8..].chunks(32).map(|c| c.try_into().expect("32 bytes")).collect();
        (nodes.len() == size.count_ones() as usize).then_some(Frontier { size, nodes })
    }
}

/// Inclusion proof of leaf `index` in the tree of the first `leaves.len()` leaves (RFC 9162 §2.1.3).
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 || index >= n {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut p = inclusion_proof(&leaves[..k], index);
        p.push(root_from_leaves(&leaves[k..]));
        p
    } else {
        let mut p = inclusion_proof(&leaves[k..], index - k);
        p.push(root_from_leaves(&leaves[..k]));
        p
    }
}

/// Checks an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &r == root
}

/// Consistency proof from the tree of the first `m` leaves to the tree of all (RFC 9162 §2.1.4).
pub fn consistency_proof(leaves: &[Hash], m: usize) -> Vec<Hash> {
    fn subproof(leaves: &[Hash], m: usize, complete: bool) -> Vec<Hash> {
        let n = leaves.len();
        if m == n {
            return if complete { Vec::new() } else { vec![root_from_leaves(leaves)] };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(&leaves[..k], m, complete);
            p.push(root_from_leaves(&leaves[k..]));
            p
        } else {
            let mut p = subproof(&leaves[k..], m - k, false);
            p.push(root_from_leaves(&leaves[..k]));
            p
        }
    }
    if m == 0 || m >= leaves.len() {
        return Vec::new();
    }
    subproof(leaves, m, true)
}

/// Checks a consistency proof (RFC 9162 §2.1.4.2).
pub fn verify_consistency(m: u64, n: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> bool {
    if m > n {
        return false;
    }
    if m == n {
        return proof.is_empty() && old_root == new_root;
    }
    if m == 0 {
        return proof.is_empty();
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if m.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let (mut fn_, mut sn) = (m - 1, n - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let Some((first, rest)) = path.split_first() else { return false };
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &fr == old_root && &sr == new_root
}
