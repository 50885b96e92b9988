//! Port lists of a rule: parsing (`443`, `8000-8100`), validation and rendering as the
//! `-m tcp --dport …` / `-m multiport --dports …` matches iptables-save prints.

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    fn text(self) -> String {
        if self.lo == self.hi {
            self.lo.to_string()
        } else {
            format!("{}:{}", self.lo, self.hi)
        }
    }
    /// Weight in multiport's limit of 15 (a range uses two slots).
    fn weight(self) -> usize {
        if self.lo == self.hi {
            1
        } else {
            2
        }
    }
}

/// multiport accepts at most this many ports, a range counting as two.
pub const MULTIPORT_MAX: usize = 15;

pub fn parse_port(text: &str) -> Result<PortRange, String> {
    let num = |s: &str| -> Result<u16, String> {
        let n: u32 = s
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not a port or a range like 8000-8100"))?;
        if !(1..=65535).contains(&n) {
            return Err(format!("port {n} in `{text}` is outside 1..=65535"));
        }
        Ok(n as u16)
    };
    let r = match text.split_once('-') {
        Some((a, b)) => PortRange {
            lo: num(a)?,
            hi: num(b)?,
        },
        None => {
            let p = num(text)?;
            PortRange { lo: p, hi: p }
        }
    };
    if r.lo > r.hi {
        return Err(format!("range `{text}` runs backwards"));
    }
    Ok(r)
}

/// The destination-port matches for `proto` (tcp, udp or sctp), one string per rule line:
/// a single port or one range uses the protocol's own match, several use multiport in chunks
/// of at most 15 slots. Ports keep the order the user wrote them in.
pub fn port_matches(proto: &str, ports: &[PortRange]) -> Vec<String> {
    match ports {
        [] => vec![],
        [one] => vec![format!("-m {proto} --dport {}", one.text())],
        many => {
            let mut chunks: Vec<Vec<String>> = Vec::new();
            let mut cur: Vec<String> = Vec::new();
            let mut weight = 0;
            for p in many {
                if weight + p.weight() > MULTIPORT_MAX {
                    chunks.push(std::mem::take(&mut cur));
                    weight = 0;
                }
                cur.push(p.text());
                weight += p.weight();
            }
            if !cur.is_empty() {
                chunks.push(cur);
            }
            chunks
                .into_iter()
                .map(|c| format!("-m multiport --dports {}", c.join(",")))
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        assert_eq!(parse_port("80"), Ok(PortRange { lo: 80, hi: 80 }));
        assert_eq!(
            parse_port("1000-2000"),
            Ok(PortRange { lo: 1000, hi: 2000 })
        );
        assert!(parse_port("0").is_err());
        assert!(parse_port("65536").is_err());
        assert!(parse_port("20-10").is_err());
        assert!(parse_port("x").is_err());
        assert!(parse_port("").is_err());
    }

    #[test]
    fn renders_single_range_and_chunked_multiport() {
        let p = |v: &[&str]| v.iter().map(|s| parse_port(s).unwrap()).collect::<Vec<_>>();
        assert_eq!(port_matches("tcp", &p(&["80"])), vec!["-m tcp --dport 80"]);
        assert_eq!(
            port_matches("udp", &p(&["1000-2000"])),
            vec!["-m udp --dport 1000:2000"]
        );
        assert_eq!(
            port_matches("tcp", &p(&["80", "443", "8000-8100"])),
            vec!["-m multiport --dports 80,443,8000:8100"]
        );
        let many: Vec<String> = (1..=14).map(|i| i.to_string()).collect();
        let mut many: Vec<&str> = many.iter().map(String::as_str).collect();
        many.push("100-200");
        let out = port_matches("tcp", &p(&many));
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], "-m multiport --dports 100:200");
    }
}
