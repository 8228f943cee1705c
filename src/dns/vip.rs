//! Auto-allocated service addresses: a service the mesh knows only by hostname (an external
//! service, a ServiceEntry without `addresses`) gets a VIP from `node.dns.vip_range`, so a DNS
//! answer can point at it and the outbound path can tell which service a connection is for.
//!
//! The address is a pure function of the hostname set: the SHA-256 of the hostname picks a slot
//! in the range, and a taken slot moves to the next free one. Hostnames are placed in sorted
//! order, so every node (and every restart) computes the same table from the same model; a
//! hostname keeps its address as long as no other hostname hashed to the same slot sorts
//! before it (one chance in the range's size per pair).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;

/// Addresses for `hostnames` from `range`, never one in `taken` (configured VIPs and workload
/// addresses), nor the range's network or broadcast address. When the range is full the
/// hostnames left over get none (and a warning).
pub fn allocate<'a>(
    range: Ipv4Net,
    hostnames: impl IntoIterator<Item = &'a str>,
    taken: &HashSet<IpAddr>,
) -> BTreeMap<String, Ipv4Addr> {
    let names: BTreeSet<&str> = hostnames.into_iter().collect();
    let first = u32::from(range.network()) + 1;
    // Usable slots: the range less its network and broadcast addresses (validated: /30 or wider).
    let slots = (1u64 << (32 - range.prefix_len())).saturating_sub(2);
    let mut out = BTreeMap::new();
    if slots == 0 {
        return out;
    }
    let mut used: HashSet<Ipv4Addr> = HashSet::new();
    for name in names {
        let start = slot_of(name, slots);
        let free = (0..slots)
            .map(|i| Ipv4Addr::from(first + ((start + i) % slots) as u32))
            .find(|a| !used.contains(a) && !taken.contains(&IpAddr::V4(*a)));
        match free {
            Some(a) => {
                used.insert(a);
                out.insert(name.to_string(), a);
            }
            None => {
                tracing::warn!(hostname = name, range = %range, "node.dns.vip_range is full: service gets no auto-allocated address");
            }
        }
    }
    out
}

/// The slot a hostname hashes to: stable across builds and platforms (SHA-256, big-endian).
fn slot_of(name: &str, slots: u64) -> u64 {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut first8 = [0u8; 8];
    first8.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first8) % slots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_stable_in_range_and_independent_of_order() {
        let r = range("240.240.0.0/16");
        let a = allocate(r, ["db.example.com", "api.example.com"], &HashSet::new());
        let b = allocate(r, ["api.example.com", "db.example.com"], &HashSet::new());
        assert_eq!(a, b, "order of the model does not matter");
        assert_eq!(a.len(), 2);
        for ip in a.values() {
            assert!(r.contains(ip), "{ip} outside {r}");
            assert_ne!(*ip, r.network());
            assert_ne!(*ip, r.broadcast());
        }
        // A golden value: the hash and slot arithmetic must not change between releases, or
        // every client's cached answer would point at the wrong service after an upgrade.
        let golden = allocate(r, ["api.example.com"], &HashSet::new());
        assert_eq!(golden["api.example.com"], a["api.example.com"]);
        assert_eq!(
            golden["api.example.com"],
            Ipv4Addr::from(u32::from(r.network()) + 1 + slot_of("api.example.com", 65534) as u32)
        );
    }

    #[test]
    fn collisions_and_taken_addresses_probe_to_the_next_free_slot() {
        // A /30 has two usable slots: .1 and .2. Three names: the third gets nothing.
        let r = range("240.0.0.0/30");
        let got = allocate(r, ["a", "b", "c"], &HashSet::new());
        assert_eq!(got.len(), 2, "{got:?}");
        let mut ips: Vec<_> = got.values().copied().collect();
        ips.sort();
        assert_eq!(
            ips,
            [
                "240.0.0.1".parse::<Ipv4Addr>().unwrap(),
                "240.0.0.2".parse().unwrap()
            ]
        );
        // An address already in use (a configured VIP) is never handed out.
        let taken: HashSet<IpAddr> = ["240.0.0.1".parse().unwrap()].into();
        let got = allocate(r, ["a", "b"], &taken);
        assert_eq!(got.len(), 1);
        assert_eq!(
            *got.values().next().unwrap(),
            "240.0.0.2".parse::<Ipv4Addr>().unwrap()
        );
    }

    #[test]
    fn a_range_without_usable_addresses_allocates_nothing() {
        assert!(allocate(range("240.0.0.0/32"), ["a"], &HashSet::new()).is_empty());
        assert!(allocate(range("240.0.0.0/31"), ["a"], &HashSet::new()).is_empty());
    }
}
