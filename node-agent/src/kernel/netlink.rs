//! dog's sets through the kernel's ipset netlink interface, from inside the agent: no `ipset`
//! process per change, no text to print and parse. The messages are the ones the `ipset` tool
//! itself sends (`include/uapi/linux/netfilter/ipset/ip_set.h`): a netfilter netlink message
//! of subsystem `IPSET` whose attributes name the set and carry the elements, many elements per
//! message (`IPSET_ATTR_ADT`).
//!
//! Writes are strict, like `ipset restore` without `-exist` (`NLM_F_EXCL`): adding a member
//! that is there, or deleting one that is not, fails. So a fill of a fresh set whose every
//! message was acknowledged, and whose element count is then what was sent, holds exactly what
//! was sent; and an acknowledged change added and removed exactly its members.
//!
//! The socket is opened once, inside the target network namespace when one is configured (a
//! netlink socket stays in the namespace it was created in).
//!
//! `Codec` builds and reads the messages (pure, unit-tested); [`NetlinkSets`] is the socket.

use super::KernelError;
use crate::core::members::{Members, MembersBuilder};
use crate::core::sets::{ReadSet, SetOp};
use dog_protocol::ruleset::Family;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_sys::Socket;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;

mod wire;

use wire::*;

/// The ipset netlink socket of one network namespace.
pub struct NetlinkSets {
    socket: Mutex<(Socket, u32)>,
    protocol: u8,
    /// The `hash:net` revision the kernel offers (the newest it knows).
    revision: u8,
}

impl std::fmt::Debug for NetlinkSets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetlinkSets")
            .field("protocol", &self.protocol)
            .field("revision", &self.revision)
            .finish()
    }
}

fn io(what: &str, source: std::io::Error) -> KernelError {
    KernelError::Spawn {
        command: format!("ipset netlink: {what}"),
        source,
    }
}

fn refused(what: &str, code: i32) -> KernelError {
    KernelError::Failed {
        command: format!("ipset netlink: {what}"),
        status: format!("error {code}"),
        stderr: ipset_error(code),
    }
}

impl NetlinkSets {
    /// Opens the socket (in `netns` when given) and asks the kernel which protocol and which
    /// `hash:net` revision it speaks; an error means the kernel has no usable ipset netlink
    /// interface here.
    pub fn open(netns: Option<&std::fs::File>) -> Result<Self, KernelError> {
        let socket = match netns {
            None => Socket::new(NETLINK_NETFILTER).map_err(|e| io("open socket", e))?,
            Some(ns) => {
                let ns = ns.try_clone().map_err(|e| io("open socket", e))?;
                // a thread of its own joins the namespace, opens the socket there and ends
                std::thread::spawn(move || {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| io("join network namespace", e.into()))?;
                    Socket::new(NETLINK_NETFILTER).map_err(|e| io("open socket", e))
                })
                .join()
                .map_err(|_| io("open socket", std::io::Error::other("thread panicked")))??
            }
        };
        let mut socket = socket;
        socket.bind_auto().map_err(|e| io("bind", e))?;
        // errors come back without a copy of the (large) request
        socket
            .set_cap_ack(true)
            .map_err(|e| io("NETLINK_CAP_ACK", e))?;
        let mut sets = NetlinkSets {
            socket: Mutex::new((socket, 1)),
            protocol: 6,
            revision: 0,
        };
        let reply = sets.request(
            CMD_PROTOCOL,
            NLM_F_REQUEST | NLM_F_ACK,
            NFPROTO_UNSPEC,
            |_| {},
        )?;
        sets.protocol = reply
            .iter()
            .find_map(|p| find(p, ATTR_PROTOCOL).and_then(|v| v.first().copied()))
            .unwrap_or(6);
        let reply = sets.request(CMD_TYPE, NLM_F_REQUEST | NLM_F_ACK, NFPROTO_IPV4, |m| {
            m.string(ATTR_TYPENAME, "hash:net");
            m.attr(ATTR_FAMILY, &[NFPROTO_IPV4]);
        })?;
        sets.revision = reply
            .iter()
            .find_map(|p| find(p, ATTR_REVISION).and_then(|v| v.first().copied()))
            .ok_or_else(|| refused("type hash:net", 4098))?;
        Ok(sets)
    }

    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// Sends one request and collects the payloads of its replies until the acknowledgement
    /// (or, for a dump, the end).
    fn request(
        &self,
        cmd: u8,
        flags: u16,
        family: u8,
        body: impl FnOnce(&mut Message),
    ) -> Result<Vec<Vec<u8>>, KernelError> {
        let mut out = Vec::new();
        self.exchange(cmd, flags, family, body, &mut |p| out.push(p.to_vec()))?;
        Ok(out)
    }

    /// Sends one request; `each` gets the payload of every reply message.
    fn exchange(
        &self,
        cmd: u8,
        flags: u16,
        family: u8,
        body: impl FnOnce(&mut Message),
        each: &mut dyn FnMut(&[u8]),
    ) -> Result<(), KernelError> {
        let mut guard = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        let (socket, seq) = &mut *guard;
        *seq = seq.wrapping_add(1);
        let mut m = Message::new(cmd, flags, *seq, family, self.protocol);
        body(&mut m);
        let msg = m.finish();
        socket.send(&msg, 0).map_err(|e| io("send", e))?;
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
        loop {
            buf.clear();
            socket.recv(&mut buf, 0).map_err(|e| io("receive", e))?;
            for r in messages(&buf) {
                if r.seq != *seq {
                    continue; // an answer to an earlier, abandoned request
                }
                match r.ty {
                    NLMSG_ERROR => {
                        let code = r
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(0);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(refused(command_name(cmd), -code))
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    _ => {
                        // skip the 4-byte netfilter header
                        each(r.payload.get(4..).unwrap_or(&[]));
                        if !dump && r.flags & NLM_F_MULTI == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }

    fn simple(&self, cmd: u8, body: impl FnOnce(&mut Message)) -> Result<(), KernelError> {
        self.exchange(
            cmd,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL,
            NFPROTO_IPV4,
            body,
            &mut |_| {},
        )
    }

    /// Adds or deletes `members` of `name`, strictly, in messages of at most [`MESSAGE_MAX`].
    fn change<'a>(
        &self,
        cmd: u8,
        name: &str,
        family: Family,
        members: impl Iterator<Item = IpNet> + 'a,
    ) -> Result<(), KernelError> {
        let mut members = members.peekable();
        while members.peek().is_some() {
            self.exchange(
                cmd,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL,
                family_code(family),
                |m| {
                    m.string(ATTR_SETNAME, name);
                    m.attr(ATTR_LINENO, &0u32.to_ne_bytes());
                    m.begin(ATTR_ADT);
                    while m.len() < MESSAGE_MAX {
                        match members.next() {
                            Some(n) => m.element(&n),
                            None => break,
                        }
                    }
                    m.end();
                },
                &mut |_| {},
            )?;
        }
        Ok(())
    }

    /// Runs one operation.
    pub fn write(&self, op: &SetOp<'_>) -> Result<(), KernelError> {
        match op {
            SetOp::Fill { name, set } => {
                let len = set.members.len();
                let family = set.family();
                self.exchange(
                    CMD_CREATE,
                    NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL,
                    family_code(family),
                    |m| {
                        m.string(ATTR_SETNAME, name);
                        m.string(ATTR_TYPENAME, "hash:net");
                        m.attr(ATTR_REVISION, &[self.revision]);
                        m.attr(ATTR_FAMILY, &[family_code(family)]);
                        m.begin(ATTR_DATA);
                        m.be32(ATTR_HASHSIZE, crate::core::sets::hashsize_for(len) as u32);
                        m.be32(ATTR_MAXELEM, set.maxelem() as u32);
                        m.end();
                    },
                    &mut |_| {},
                )?;
                self.change(CMD_ADD, name, family, set.members.iter())
            }
            SetOp::Add { name, members } => {
                let family = members.first().map_or(Family::V4, Family::of);
                self.change(CMD_ADD, name, family, members.iter().copied())
            }
            SetOp::Del { name, members } => {
                let family = members.first().map_or(Family::V4, Family::of);
                self.change(CMD_DEL, name, family, members.iter().copied())
            }
            SetOp::Swap(a, b) => self.simple(CMD_SWAP, |m| {
                m.string(ATTR_SETNAME, a);
                m.string(ATTR_SETNAME2, b);
            }),
            SetOp::Destroy(name) => self.simple(CMD_DESTROY, |m| m.string(ATTR_SETNAME, name)),
        }
    }

    /// Names of all sets in the namespace.
    pub fn names(&self) -> Result<Vec<String>, KernelError> {
        let mut names = Vec::new();
        self.exchange(
            CMD_LIST,
            NLM_F_REQUEST | NLM_F_DUMP,
            NFPROTO_UNSPEC,
            |m| m.be32(ATTR_FLAGS, FLAG_LIST_SETNAME),
            &mut |p| {
                if let Some(n) = find(p, ATTR_SETNAME) {
                    let n = name_of(n);
                    if names.last() != Some(&n) {
                        names.push(n);
                    }
                }
            },
        )?;
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// Lists `name`: its header only, or its members too.
    fn list(&self, name: &str, members: bool) -> Result<Option<ReadSet>, KernelError> {
        let mut reading: Option<Reading> = None;
        let flags = if members { 0 } else { FLAG_LIST_HEADER };
        let r = self.exchange(
            CMD_LIST,
            NLM_F_REQUEST | NLM_F_DUMP,
            NFPROTO_UNSPEC,
            |m| {
                m.string(ATTR_SETNAME, name);
                m.be32(ATTR_FLAGS, flags);
            },
            &mut |p| read_list_message(p, &mut reading),
        );
        match r {
            Ok(()) => {}
            // the set does not exist
            Err(KernelError::Failed { ref status, .. }) if status == "error 2" => return Ok(None),
            Err(e) => return Err(e),
        }
        Ok(reading.map(|r| ReadSet {
            name: name.to_string(),
            kind: r.kind,
            maxelem: r.maxelem,
            elements: r.elements,
            members: if members {
                r.members.finish()
            } else {
                Members::empty(r.family)
            },
        }))
    }

    /// The named sets with their members.
    pub fn read(&self, names: &[String]) -> Result<Vec<ReadSet>, KernelError> {
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            match self.list(n, true)? {
                Some(s) => out.push(s),
                None => return Err(refused(&format!("list {n}"), 2)),
            }
        }
        Ok(out)
    }

    /// How many members `name` holds, from its header.
    pub fn count(&self, name: &str) -> Result<Option<usize>, KernelError> {
        Ok(self.list(name, false)?.and_then(|s| s.elements))
    }
}

fn command_name(cmd: u8) -> &'static str {
    match cmd {
        CMD_PROTOCOL => "protocol",
        CMD_CREATE => "create",
        CMD_DESTROY => "destroy",
        CMD_SWAP => "swap",
        CMD_LIST => "list",
        CMD_ADD => "add",
        CMD_DEL => "del",
        CMD_TYPE => "type",
        _ => "request",
    }
}

/// Folds one message of a `list` dump into `reading`.
fn read_list_message(payload: &[u8], reading: &mut Option<Reading>) {
    if reading.is_none() {
        let family = match find(payload, ATTR_FAMILY).and_then(|f| f.first().copied()) {
            Some(NFPROTO_IPV6) => Family::V6,
            _ => Family::V4,
        };
        let kind = find(payload, ATTR_TYPENAME)
            .map(name_of)
            .unwrap_or_default();
        *reading = Some(Reading {
            kind,
            family,
            maxelem: 65536,
            elements: None,
            members: MembersBuilder::new(family),
        });
    }
    let Some(r) = reading.as_mut() else { return };
    for a in attrs(payload) {
        match a.ty {
            ATTR_DATA => {
                for h in attrs(a.data) {
                    match h.ty {
                        ATTR_MAXELEM => r.maxelem = be32_of(h.data).unwrap_or(65536) as usize,
                        ATTR_ELEMENTS => r.elements = be32_of(h.data).map(|v| v as usize),
                        _ => {}
                    }
                }
            }
            ATTR_ADT => {
                for e in attrs(a.data).filter(|e| e.ty == ATTR_DATA) {
                    if let Some(net) = element_of(e.data) {
                        r.members.push(net);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_add_message_carries_its_elements_as_the_kernel_reads_them() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "192.0.2.1/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let mut m = Message::new(
            CMD_ADD,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL,
            7,
            NFPROTO_IPV4,
            7,
        );
        m.string(ATTR_SETNAME, "dogz4-x");
        m.attr(ATTR_LINENO, &0u32.to_ne_bytes());
        m.begin(ATTR_ADT);
        for n in &nets {
            m.element(n);
        }
        m.end();
        let bytes = m.finish();
        let msgs: Vec<Received<'_>> = messages(&bytes).collect();
        assert_eq!(msgs.len(), 1);
        let r = &msgs[0];
        assert_eq!(r.ty, (NFNL_SUBSYS_IPSET << 8) | u16::from(CMD_ADD));
        assert_eq!(r.seq, 7);
        assert_eq!(r.payload[0], NFPROTO_IPV4);
        let body = &r.payload[4..];
        assert_eq!(find(body, ATTR_PROTOCOL), Some(&[7u8][..]));
        assert_eq!(name_of(find(body, ATTR_SETNAME).unwrap()), "dogz4-x");
        // every element is nested DATA with nested IP (flags as the kernel checks them)
        let adt = attrs(body).find(|a| a.ty == ATTR_ADT).unwrap();
        let raw_type = |data: &[u8]| u16::from_ne_bytes([data[2], data[3]]);
        let adt_at = body.len() - adt.data.len() - 4;
        assert_eq!(raw_type(&body[adt_at..]), ATTR_ADT | NLA_F_NESTED);
        assert_eq!(raw_type(adt.data), ATTR_DATA | NLA_F_NESTED);
        let got: Vec<IpNet> = attrs(adt.data).filter_map(|e| element_of(e.data)).collect();
        assert_eq!(got, nets);
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn a_list_dump_is_read_into_members_and_header_figures() {
        // what the kernel sends for a set: header (DATA) then elements (ADT)
        let mut m = Message::new(CMD_LIST, NLM_F_MULTI, 3, NFPROTO_IPV6, 7);
        m.string(ATTR_SETNAME, "dogz6-x");
        m.string(ATTR_TYPENAME, "hash:net");
        m.attr(ATTR_FAMILY, &[NFPROTO_IPV6]);
        m.begin(ATTR_DATA);
        m.be32(ATTR_MAXELEM, 131072);
        m.be32(ATTR_ELEMENTS, 2);
        m.end();
        m.begin(ATTR_ADT);
        m.element(&"fd00::/64".parse().unwrap());
        m.element(&"2001:db8::1/128".parse().unwrap());
        m.end();
        let bytes = m.finish();
        let mut reading = None;
        for r in messages(&bytes) {
            read_list_message(&r.payload[4..], &mut reading);
        }
        let r = reading.unwrap();
        assert_eq!(r.kind, "hash:net");
        assert_eq!(r.family, Family::V6);
        assert_eq!(r.maxelem, 131072);
        assert_eq!(r.elements, Some(2));
        let members = r.members.finish();
        assert_eq!(
            members.to_vec(),
            vec![
                "2001:db8::1/128".parse::<IpNet>().unwrap(),
                "fd00::/64".parse().unwrap()
            ]
        );
    }

    #[test]
    fn truncated_input_reads_as_nothing_rather_than_panicking() {
        assert_eq!(messages(&[1, 2, 3]).count(), 0);
        assert_eq!(attrs(&[8, 0, 1, 0, 1]).count(), 0);
        assert!(element_of(&[4, 0, 1, 0]).is_none());
        assert_eq!(
            ipset_error(4103),
            "element exists already (add) or is missing (delete)"
        );
    }
}
