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

/// MTH over leaf hashes; the empty tree hashes to SHA-256("").
pub fn root_from_leaves(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let k = split(n as u64) as usize;
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
        self.push_nodes(leaf, |_, _, _| {});
    }

    /// `push`, calling `completed(level, index, hash)` for each perfect subtree the leaf
    /// completes: the subtree of leaves `[index << level, (index + 1) << level)`, level ≥ 1.
    pub fn push_nodes(&mut self, leaf: Hash, mut completed: impl FnMut(u32, u64, &Hash)) {
        let mut node = leaf;
        let mut s = self.size;
        let mut level = 0;
        while s & 1 == 1 {
            let left = self.nodes.pop().expect("one node per set bit");
            node = node_hash(&left, &node);
            s >>= 1;
            level += 1;
            completed(level, self.size >> level, &node);
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

/// Where proofs take subtree hashes from: a slice of leaves, or the log's stored leaves read
/// range by range (so a proof over a large log needs memory for one path, not for every leaf).
pub trait LeafSource {
    type Error;
    /// MTH of the leaves `[start, end)`, `start < end`.
    fn range_root(&mut self, start: u64, end: u64) -> Result<Hash, Self::Error>;
}

impl LeafSource for &[Hash] {
    type Error = std::convert::Infallible;
    fn range_root(&mut self, start: u64, end: u64) -> Result<Hash, Self::Error> {
        Ok(root_from_leaves(&self[start as usize..end as usize]))
    }
}

/// The largest power of two smaller than `n` (n > 1).
pub fn split(n: u64) -> u64 {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// Inclusion path of leaf `index` in the tree of leaves `[0, size)` (RFC 9162 §2.1.3), leaf to
/// root order. The sibling subtrees are disjoint: each leaf is read at most once.
pub fn inclusion_path<S: LeafSource>(src: &mut S, index: u64, size: u64) -> Result<Vec<Hash>, S::Error> {
    // Walk down from the root, noting the sibling subtree at each split; the path is their roots
    // from the bottom up.
    if index >= size {
        return Ok(Vec::new());
    }
    let (mut lo, mut hi) = (0u64, size);
    let mut siblings = Vec::new();
    while hi - lo > 1 {
        let k = split(hi - lo);
        if index < lo + k {
            siblings.push((lo + k, hi));
            hi = lo + k;
        } else {
            siblings.push((lo, lo + k));
            lo += k;
        }
    }
    siblings.iter().rev().map(|&(a, b)| src.range_root(a, b)).collect()
}

/// Consistency path from the tree of the first `m` leaves to the tree of `n` (RFC 9162 §2.1.4).
pub fn consistency_path<S: LeafSource>(src: &mut S, m: u64, n: u64) -> Result<Vec<Hash>, S::Error> {
    if m == 0 || m >= n {
        return Ok(Vec::new());
    }
    // SUBPROOF(m, D[lo:hi], complete), unrolled: the nodes are pushed top-down and returned
    // bottom-up, as the recursive definition emits them.
    let (mut lo, mut hi, mut m, mut complete) = (0u64, n, m, true);
    let mut nodes = Vec::new();
    loop {
        let len = hi - lo;
        if m == len {
            if !complete {
                nodes.push((lo, hi));
            }
            break;
        }
        let k = split(len);
        if m <= k {
            nodes.push((lo + k, hi));
            hi = lo + k;
        } else {
            nodes.push((lo, lo + k));
            lo += k;
            m -= k;
            complete = false;
        }
    }
    nodes.iter().rev().map(|&(a, b)| src.range_root(a, b)).collect()
}

/// Inclusion proof of leaf `index` in the tree of the first `leaves.len()` leaves (RFC 9162 §2.1.3).
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Vec<Hash> {
    match inclusion_path(&mut { leaves }, index as u64, leaves.len() as u64) {
        Ok(p) => p,
        Err(never) => match never {},
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
    match consistency_path(&mut { leaves }, m as u64, leaves.len() as u64) {
        Ok(p) => p,
        Err(never) => match never {},
    }
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
