//! Interface and address discovery from `ip -j addr` (pure parser + thin exec).

use crate::apply::Applier;
use crate::kernel::KernelError;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// One network interface (a link, as `ip` calls it) and its addresses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    /// Link-layer address, if any.
    pub mac: Option<String>,
    /// `UP` is among the interface flags.
    pub up: bool,
    pub loopback: bool,
    pub addresses: Vec<InterfaceAddress>,
}

/// An address with its prefix and scope as `ip` reports them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// The address with the on-link prefix length (host bits kept).
    pub net: IpNet,
    /// `global`, `link`, `host`, …
    pub scope: String,
}

impl InterfaceAddress {
    pub fn addr(&self) -> IpAddr {
        self.net.addr()
    }

    /// Usable as a group member address: not loopback, not link-local.
    pub fn is_routable(&self) -> bool {
        let a = self.addr();
        let link_local = match a {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        !a.is_loopback() && !link_local && self.scope != "host" && self.scope != "link"
    }
}

#[derive(Deserialize)]
struct RawLink {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    link_type: Option<String>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    addr_info: Vec<RawAddr>,
}

#[derive(Deserialize)]
struct RawAddr {
    #[serde(default)]
    local: Option<String>,
    #[serde(default)]
    prefixlen: Option<u8>,
    #[serde(default)]
    scope: Option<String>,
}

/// `ip -j addr` output that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot parse `ip -j addr` output: {0}")]
    Parse(#[from] serde_json::Error),
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Parses `ip -j addr`. Entries without an address (e.g. some tunnels) are kept without it;
/// an address that does not parse is skipped, nothing else is lost.
pub fn parse_ip_addr_json(text: &str) -> Result<Vec<Link>, AddressError> {
    let raw: Vec<RawLink> = serde_json::from_str(text)?;
    Ok(raw
        .into_iter()
        .map(|l| {
            let addresses = l
                .addr_info
                .iter()
                .filter_map(|a| {
                    let addr: IpAddr = a.local.as_deref()?.parse().ok()?;
                    let net = IpNet::new(addr, a.prefixlen?).ok()?;
                    Some(InterfaceAddress {
                        net,
                        scope: a.scope.clone().unwrap_or_default(),
                    })
                })
                .collect();
            Link {
                loopback: l.link_type.as_deref() == Some("loopback")
                    || l.flags.iter().any(|f| f == "LOOPBACK"),
                up: l.flags.iter().any(|f| f == "UP"),
                name: l.ifname,
                index: l.ifindex,
                mac: l.address.filter(|m| !m.is_empty()),
                addresses,
            }
        })
        .collect())
}

impl Applier {
    /// The host's interfaces and addresses.
    pub fn interfaces(&self) -> Result<Vec<Link>, AddressError> {
        parse_ip_addr_json(&self.ip_addr_json()?)
    }
}

/// All routable addresses (no loopback, no link-local) of the interfaces.
pub fn routable_addresses(ifaces: &[Link]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = ifaces
        .iter()
        .flat_map(|i| i.addresses.iter())
        .filter(|a| a.is_routable())
        .map(InterfaceAddress::addr)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"qdisc":"noqueue","operstate":"UNKNOWN","group":"default","txqlen":1000,"link_type":"loopback","address":"00:00:00:00:00:00","broadcast":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"::1","prefixlen":128,"scope":"host","noprefixroute":true,"valid_life_time":4294967295,"preferred_life_time":4294967295}]},{"ifindex":2,"link_index":3,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1500,"link_type":"ether","address":"aa:bb:cc:dd:ee:ff","link_netnsid":0,"addr_info":[{"family":"inet","local":"198.18.0.1","prefixlen":24,"broadcast":"198.18.0.255","scope":"global","label":"eth0"},{"family":"inet6","local":"fd00:d06::1","prefixlen":64,"scope":"global"},{"family":"inet6","local":"fe80::a8bb:ccff:fedd:eeff","prefixlen":64,"scope":"link"}]},{"ifindex":3,"ifname":"tun0","flags":["POINTOPOINT"],"link_type":"none","addr_info":[]}]"#;

    #[test]
    fn parses_interfaces_and_filters_routable_addresses() {
        let ifs = parse_ip_addr_json(SAMPLE).unwrap();
        assert_eq!(ifs.len(), 3);
        assert!(ifs[0].loopback && ifs[0].up);
        assert_eq!(ifs[1].name, "eth0");
        assert_eq!(ifs[1].mac.as_deref(), Some("aa:bb:cc:dd:ee:ff"));
        assert_eq!(ifs[1].addresses[0].net.to_string(), "198.18.0.1/24");
        assert!(!ifs[2].up && ifs[2].addresses.is_empty());
        let r: Vec<String> = routable_addresses(&ifs)
            .iter()
            .map(|a| a.to_string())
            .collect();
        assert_eq!(r, vec!["198.18.0.1", "fd00:d06::1"]);
        assert!(parse_ip_addr_json("{not json").is_err());
    }
}
