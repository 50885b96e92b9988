//! Address parsing for sets: Zone entries, Group extra addresses, ConfigMap lines and the
//! addresses a Host reports. Everything is parsed with `ipnet`; what cannot be parsed is
//! reported and dropped, never guessed.

use ipnet::IpNet;
use std::net::IpAddr;

/// Parses one address entry: a bare address (becomes a host route) or a CIDR. Host bits are
/// kept here; [`dog_protocol::ruleset::IpSet::new`] clears them.
pub fn parse_entry(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty address".into());
    }
    if t.contains('/') {
        t.parse::<IpNet>()
            .map_err(|e| format!("`{t}` is not a valid CIDR: {e}"))
    } else {
        t.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|e| format!("`{t}` is not a valid IP address: {e}"))
    }
}

/// Parses an address a host reports (interface addresses carry the interface's prefix length,
/// e.g. `10.0.0.5/24`): the result is always a host route. Loopback, link-local, unspecified
/// and multicast addresses are not addresses other hosts reach this host by, so they yield
/// `Ok(None)`.
pub fn parse_host_address(text: &str) -> Result<Option<IpNet>, String> {
    let t = text.trim();
    let addr_text = t.split_once('/').map(|(a, _)| a).unwrap_or(t);
    let addr: IpAddr = addr_text
        .parse()
        .map_err(|e| format!("`{t}` is not a valid IP address: {e}"))?;
    if let Some((_, len)) = t.split_once('/') {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        match len.parse::<u8>() {
            Ok(l) if l <= max => {}
            _ => return Err(format!("`{t}` has an invalid prefix length")),
        }
    }
    if !is_reachable_host_address(&addr) {
        return Ok(None);
    }
    Ok(Some(IpNet::from(addr)))
}

fn is_reachable_host_address(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_loopback() || a.is_link_local() || a.is_unspecified() || a.is_multicast())
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_reachable_host_address(&IpAddr::V4(v4));
            }
            let link_local = (a.segments()[0] & 0xffc0) == 0xfe80;
            !(a.is_loopback() || a.is_unspecified() || a.is_multicast() || link_local)
        }
    }
}

/// Address lines of a ConfigMap value: one entry per line, `#` starts a comment, blank lines
/// ignored. Yields (1-based line number, entry).
pub fn config_map_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let l = l.split('#').next().unwrap_or("").trim();
        (!l.is_empty()).then_some((i + 1, l))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_addresses_and_cidrs() {
        assert_eq!(parse_entry("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(
            parse_entry(" 2001:db8::/32 ").unwrap().to_string(),
            "2001:db8::/32"
        );
        assert!(parse_entry("10.0.0.300").is_err());
        assert!(parse_entry("10.0.0.0/33").is_err());
        assert!(parse_entry("").is_err());
    }

    #[test]
    fn host_addresses_become_host_routes_and_skip_local_ones() {
        let p = |s| parse_host_address(s).unwrap().map(|n| n.to_string());
        assert_eq!(p("198.18.0.5/24"), Some("198.18.0.5/32".into()));
        assert_eq!(p("fd00:d06::5/64"), Some("fd00:d06::5/128".into()));
        assert_eq!(p("127.0.0.1/8"), None);
        assert_eq!(p("::1/128"), None);
        assert_eq!(p("fe80::1/64"), None);
        assert_eq!(p("169.254.1.1"), None);
        assert_eq!(p("0.0.0.0"), None);
        assert!(parse_host_address("nope").is_err());
        assert!(parse_host_address("10.0.0.1/40").is_err());
    }

    #[test]
    fn config_map_lines_skip_comments_and_blanks() {
        let v: Vec<_> = config_map_lines("# head\n10.0.0.1\n\n  10.0.0.2 # x\n").collect();
        assert_eq!(v, vec![(2, "10.0.0.1"), (4, "10.0.0.2")]);
    }
}
