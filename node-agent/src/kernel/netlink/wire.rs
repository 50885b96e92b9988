//! The ipset netlink wire format: message and attribute numbers, a message builder, and the
//! parsing of the kernel's answers.

use super::*;

pub(super) const NETLINK_NETFILTER: isize = 12;
pub(super) const NFNL_SUBSYS_IPSET: u16 = 6;

pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 0x01;
pub(super) const NLM_F_MULTI: u16 = 0x02;
pub(super) const NLM_F_ACK: u16 = 0x04;
pub(super) const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLM_F_EXCL: u16 = 0x200;
pub(super) const NLA_F_NESTED: u16 = 1 << 15;
pub(super) const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
pub(super) const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

pub(super) const NFPROTO_UNSPEC: u8 = 0;
pub(super) const NFPROTO_IPV4: u8 = 2;
pub(super) const NFPROTO_IPV6: u8 = 10;

// commands
pub(super) const CMD_PROTOCOL: u8 = 1;
pub(super) const CMD_CREATE: u8 = 2;
pub(super) const CMD_DESTROY: u8 = 3;
pub(super) const CMD_SWAP: u8 = 6;
pub(super) const CMD_LIST: u8 = 7;
pub(super) const CMD_ADD: u8 = 9;
pub(super) const CMD_DEL: u8 = 10;
pub(super) const CMD_TYPE: u8 = 13;

// attributes at command level
pub(super) const ATTR_PROTOCOL: u16 = 1;
pub(super) const ATTR_SETNAME: u16 = 2;
pub(super) const ATTR_TYPENAME: u16 = 3;
pub(super) const ATTR_SETNAME2: u16 = 3;
pub(super) const ATTR_REVISION: u16 = 4;
pub(super) const ATTR_FAMILY: u16 = 5;
pub(super) const ATTR_FLAGS: u16 = 6;
pub(super) const ATTR_DATA: u16 = 7;
pub(super) const ATTR_ADT: u16 = 8;
pub(super) const ATTR_LINENO: u16 = 9;
// attributes inside DATA
pub(super) const ATTR_IP: u16 = 1;
pub(super) const ATTR_CIDR: u16 = 3;
pub(super) const ATTR_HASHSIZE: u16 = 18;
pub(super) const ATTR_MAXELEM: u16 = 19;
pub(super) const ATTR_ELEMENTS: u16 = 24;
// inside IP
pub(super) const ATTR_IPADDR_IPV4: u16 = 1;
pub(super) const ATTR_IPADDR_IPV6: u16 = 2;

pub(super) const FLAG_LIST_SETNAME: u32 = 1 << 1;
pub(super) const FLAG_LIST_HEADER: u32 = 1 << 2;

/// Kernel ipset error numbers worth a word (`enum ipset_errno`).
pub(super) fn ipset_error(code: i32) -> String {
    let text = match code {
        4097 => "protocol error",
        4098 => "set type not supported by the kernel",
        4099 => "maximal number of sets reached",
        4100 => "set is busy",
        4101 => "set to swap with does not exist",
        4102 => "sets are of different types",
        4103 => "element exists already (add) or is missing (delete)",
        4104 => "invalid CIDR",
        4106 => "invalid family",
        4108 => "set is referenced",
        4352 => "hash is full",
        _ => return std::io::Error::from_raw_os_error(code).to_string(),
    };
    text.to_string()
}

/// The element payload of a message stays under this size (the kernel's send limit is the
/// socket buffer, about 200 KiB by default).
pub(super) const MESSAGE_MAX: usize = 64 * 1024;

/// Builds one netfilter netlink message.
pub(super) struct Message {
    pub(super) buf: Vec<u8>,
    pub(super) nests: Vec<usize>,
}

impl Message {
    pub(super) fn new(cmd: u8, flags: u16, seq: u32, family: u8, protocol: u8) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&((NFNL_SUBSYS_IPSET << 8) | u16::from(cmd)).to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend_from_slice(&[family, 0, 0, 0]); // nfgenmsg: family, version 0, res_id 0
        let mut m = Message {
            buf,
            nests: Vec::new(),
        };
        m.attr(ATTR_PROTOCOL, &[protocol]);
        m
    }

    pub(super) fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub(super) fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len() as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    pub(super) fn string(&mut self, ty: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(ty, &v);
    }

    pub(super) fn be32(&mut self, ty: u16, v: u32) {
        self.attr(ty | NLA_F_NET_BYTEORDER, &v.to_be_bytes());
    }

    pub(super) fn begin(&mut self, ty: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    }

    pub(super) fn end(&mut self) {
        if let Some(at) = self.nests.pop() {
            let len = (self.buf.len() - at) as u16;
            self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// One element of a `hash:net` set (`IPSET_ATTR_DATA`).
    pub(super) fn element(&mut self, net: &IpNet) {
        self.begin(ATTR_DATA);
        self.begin(ATTR_IP);
        match net {
            IpNet::V4(n) => self.attr(ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &n.addr().octets()),
            IpNet::V6(n) => self.attr(ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &n.addr().octets()),
        }
        self.end();
        self.attr(ATTR_CIDR, &[net.prefix_len()]);
        self.end();
    }

    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One netlink attribute of a received message.
#[derive(Clone, Copy, Debug)]
pub(super) struct Attr<'a> {
    pub(super) ty: u16,
    pub(super) data: &'a [u8],
}

/// The attributes in `data`, in order.
pub(super) fn attrs(mut data: &[u8]) -> impl Iterator<Item = Attr<'_>> {
    std::iter::from_fn(move || {
        if data.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let ty = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            return None;
        }
        let a = Attr {
            ty,
            data: &data[4..len],
        };
        data = &data[((len + 3) & !3).min(data.len())..];
        Some(a)
    })
}

pub(super) fn find(data: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(data).find(|a| a.ty == ty).map(|a| a.data)
}

pub(super) fn be32_of(data: &[u8]) -> Option<u32> {
    data.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

pub(super) fn name_of(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// An element (`IPSET_ATTR_DATA`) of a `hash:net` set.
pub(super) fn element_of(data: &[u8]) -> Option<IpNet> {
    let ip = find(data, ATTR_IP)?;
    let cidr = find(data, ATTR_CIDR).and_then(|c| c.first().copied());
    match attrs(ip).next()? {
        Attr {
            ty: ATTR_IPADDR_IPV4,
            data: a,
        } if a.len() == 4 => {
            let addr = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Ipv4Net::new(addr, cidr.unwrap_or(32)).ok().map(IpNet::V4)
        }
        Attr {
            ty: ATTR_IPADDR_IPV6,
            data: a,
        } if a.len() == 16 => {
            let mut o = [0u8; 16];
            o.copy_from_slice(a);
            Ipv6Net::new(Ipv6Addr::from(o), cidr.unwrap_or(128))
                .ok()
                .map(IpNet::V6)
        }
        _ => None,
    }
}

/// One received netlink message: its type, flags, sequence number and payload after the
/// netfilter header.
pub(super) struct Received<'a> {
    pub(super) ty: u16,
    pub(super) flags: u16,
    pub(super) seq: u32,
    pub(super) payload: &'a [u8],
}

pub(super) fn messages(mut data: &[u8]) -> impl Iterator<Item = Received<'_>> {
    std::iter::from_fn(move || {
        if data.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < 16 || len > data.len() {
            return None;
        }
        let m = Received {
            ty: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
            payload: &data[16..len],
        };
        data = &data[((len + 3) & !3).min(data.len())..];
        Some(m)
    })
}

pub(super) fn family_code(f: Family) -> u8 {
    match f {
        Family::V4 => NFPROTO_IPV4,
        Family::V6 => NFPROTO_IPV6,
    }
}

/// A set being read from a dump.
pub(super) struct Reading {
    pub(super) kind: String,
    pub(super) family: Family,
    pub(super) maxelem: usize,
    pub(super) elements: Option<usize>,
    pub(super) members: MembersBuilder,
}
