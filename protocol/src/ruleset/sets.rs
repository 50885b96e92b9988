//! ipsets: their members, canonical text and hashes (the content both sides hash alike)

use super::*;

/// One `hash:net` ipset with its members, canonical (host bits cleared, sorted, deduplicated).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    pub name: String,
    pub family: Family,
    pub members: Vec<IpNet>,
}

impl IpSet {
    /// Builds a set from arbitrary members of its family: clears host bits, sorts, dedups.
    /// Members of the other family are ignored by the caller's contract; they are filtered here
    /// too so a set can never hold a member the kernel would refuse.
    pub fn new(
        name: impl Into<String>,
        family: Family,
        members: impl IntoIterator<Item = IpNet>,
    ) -> Self {
        let mut members: Vec<IpNet> = members
            .into_iter()
            .filter(|m| Family::of(m) == family)
            .flat_map(split_zero_prefix)
            .map(|m| m.trunc())
            .collect();
        members.sort_unstable();
        members.dedup();
        IpSet {
            name: name.into(),
            family,
            members,
        }
    }

    /// Content hash over name, family and the packed members ([`SetHasher`]).
    pub fn hash(&self) -> String {
        set_hash(&self.name, self.family, self.members.iter())
    }

    /// `maxelem` sized to the content with headroom for small deltas.
    pub fn maxelem(&self) -> usize {
        maxelem_for(self.members.len())
    }
}

/// `hash:net` cannot store a /0; it is stored as the two halves of the address space.
pub(super) fn split_zero_prefix(net: IpNet) -> Vec<IpNet> {
    if net.prefix_len() == 0 {
        net.subnets(1).map(|s| s.collect()).unwrap_or_default()
    } else {
        vec![net]
    }
}

/// `maxelem` for a set of `len` members: at least 65536 (ipset's default), else the next power
/// of two above 1.5 × len so deltas fit without a swap.
pub fn maxelem_for(len: usize) -> usize {
    let want = len + len / 2;
    want.next_power_of_two().max(65536)
}

/// How `ipset save` prints a member: host routes without their prefix length.
pub fn member_text(net: &IpNet) -> String {
    let mut s = String::new();
    write_member(&mut s, net);
    s
}

/// Appends [`member_text`] of `net` to `out` without allocating a string per member.
pub fn write_member(out: &mut String, net: &IpNet) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = if net.prefix_len() == net.max_prefix_len() {
        write!(out, "{}", net.addr())
    } else {
        write!(out, "{net}")
    };
}

/// Hash of a set's content. Members must already be canonical and sorted (as in [`IpSet`] or as
/// parsed back from the kernel by [`parse_ipset_save`]).
pub fn set_hash<'a>(
    name: &str,
    family: Family,
    members: impl Iterator<Item = &'a IpNet>,
) -> String {
    let mut h = SetHasher::new(name, family);
    // packed into a buffer first: one digest update per 16 KiB, not per member
    const FULL: usize = 16 * 1024;
    let mut buf = [0u8; FULL + 17];
    let mut len = 0;
    for m in members {
        len += pack_into(m, &mut buf[len..]);
        if len >= FULL {
            h.packed(&buf[..len]);
            len = 0;
        }
    }
    h.packed(&buf[..len]);
    h.finish()
}

/// [`set_hash`] fed one member at a time, or as packed bytes (the agent's form): SHA-256 over
/// `<name> <family>\n` followed by each member, in canonical order, as its address bytes
/// (network order, 4 or 16) and its prefix length (1 byte). The packed form needs no text
/// formatting, so hashing a 1,000,000-member set costs a few milliseconds, and both sides hash
/// exactly the bytes the agent keeps.
pub struct SetHasher {
    digest: Sha256,
}

impl SetHasher {
    pub fn new(name: &str, family: Family) -> Self {
        let mut digest = Sha256::new();
        digest.update(name.as_bytes());
        digest.update(b" ");
        digest.update(family.ipset_family().as_bytes());
        digest.update(b"\n");
        SetHasher { digest }
    }

    /// The next member, in canonical order.
    pub fn member(&mut self, m: &IpNet) {
        let mut buf = [0u8; 17];
        self.digest.update(pack_member(m, &mut buf));
    }

    /// Members already packed as [`pack_member`] does, concatenated in canonical order.
    pub fn packed(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
    }

    pub fn finish(self) -> String {
        hex::encode(self.digest.finalize())
    }
}

/// A member's packed form, as hashed: address bytes in network order, then the prefix length.
/// Packed members of one family sort (as bytes) exactly like `IpNet`.
pub fn pack_member<'a>(m: &IpNet, buf: &'a mut [u8; 17]) -> &'a [u8] {
    let len = pack_into(m, buf);
    &buf[..len]
}

/// Writes `m`'s packed form at the start of `buf` (at least 17 bytes); returns its length.
fn pack_into(m: &IpNet, buf: &mut [u8]) -> usize {
    match m {
        IpNet::V4(n) => {
            buf[..4].copy_from_slice(&n.addr().octets());
            buf[4] = n.prefix_len();
            5
        }
        IpNet::V6(n) => {
            buf[..16].copy_from_slice(&n.addr().octets());
            buf[16] = n.prefix_len();
            17
        }
    }
}

/// Combined hash of a host's sets: over `name hash` lines sorted by name.
pub fn sets_hash<'a>(sets: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut sorted: Vec<(&str, &str)> = sets.collect();
    // callers mostly walk a map already ordered by name
    if !sorted.is_sorted_by(|a, b| a.0 < b.0) {
        // stable: of a name given twice, its last hash stays last
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        // a name given twice counts once, with its last hash (what a map built from them keeps)
        sorted.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                kept.1 = later.1;
            }
            same
        });
    }
    let mut h = Sha256::new();
    for (name, hash) in sorted {
        h.update(name.as_bytes());
        h.update(b" ");
        h.update(hash.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// dog's sets as read back from `ipset save` (all sets; only those named `dog…` are returned),
/// canonicalised so [`set_hash`] of the result equals the compiler's hash.
pub fn parse_ipset_save(text: &str) -> BTreeMap<String, IpSet> {
    let mut out: BTreeMap<String, (Family, Vec<IpNet>)> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("create") => {
                let Some(name) = words.next() else { continue };
                if !name.starts_with(SET_PREFIX) {
                    continue;
                }
                let rest: Vec<&str> = words.collect();
                let family = match rest.windows(2).find(|w| w[0] == "family").map(|w| w[1]) {
                    Some("inet6") => Family::V6,
                    _ => Family::V4,
                };
                out.insert(name.to_string(), (family, Vec::new()));
            }
            Some("add") => {
                let (Some(name), Some(member)) = (words.next(), words.next()) else {
                    continue;
                };
                if let Some((_, members)) = out.get_mut(name) {
                    if let Some(net) = parse_member(member) {
                        members.push(net);
                    }
                }
            }
            _ => {}
        }
    }
    out.into_iter()
        .map(|(name, (family, members))| {
            let set = IpSet::new(name.clone(), family, members);
            (name, set)
        })
        .collect()
}

/// Parses a member as `ipset` prints it: an address or a CIDR.
pub fn parse_member(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}
