//! Changes to the current network namespace's addresses, policy rules and routes, made over rtnetlink:
//! what istio-iptables does by running `ip`. The kernel's answer is an errno, so "already there" (EEXIST)
//! and "already gone" (ENOENT, ESRCH) are told from real failures without reading any tool's words, which
//! differ between iproute2 releases.
//!
//! A netlink socket belongs to the namespace of the thread that opens it: each call opens its own, so it
//! acts on the namespace the calling thread is in.

use std::io;

use anyhow::{Context as _, Result};
use capture_common::model::LOOPBACK_IFINDEX;
use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An address family, as `ip -4` / `ip -6` choose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    fn netlink(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// `ip addr add NET dev lo`; an address already there is success.
pub fn add_loopback_address(net: IpNet) -> Result<()> {
    let mut message = AddressMessage::default();
    message.header.family = match net {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    message.header.prefix_len = net.prefix_len();
    message.header.index = LOOPBACK_IFINDEX;
    // As iproute2 sends it: the local address, and the same as the (peer) address.
    message.attributes = vec![
        AddressAttribute::Local(net.addr()),
        AddressAttribute::Address(net.addr()),
    ];
    tolerate(
        request(RouteNetlinkMessage::NewAddress(message), NLM_F_CREATE | NLM_F_EXCL),
        &[libc::EEXIST],
    )
    .with_context(|| format!("add {net} to lo"))
}

/// `ip rule add fwmark MARK lookup TABLE`; the same rule already there is success.
pub fn add_fwmark_rule(family: Family, mark: u32, table: u32) -> Result<()> {
    tolerate(
        request(
            RouteNetlinkMessage::NewRule(fwmark_rule(family, mark, table)),
            NLM_F_CREATE | NLM_F_EXCL,
        ),
        &[libc::EEXIST],
    )
    .with_context(|| format!("add the {family} rule fwmark {mark} lookup {table}"))
}

/// `ip rule del fwmark MARK lookup TABLE`; no such rule (or no such family here) is success.
pub fn del_fwmark_rule(family: Family, mark: u32, table: u32) -> Result<()> {
    tolerate(
        request(RouteNetlinkMessage::DelRule(fwmark_rule(family, mark, table)), 0),
        &[libc::ENOENT, libc::EAFNOSUPPORT],
    )
    .with_context(|| format!("delete the {family} rule fwmark {mark} lookup {table}"))
}

/// `ip route add local default dev lo table TABLE`; the route already there is success.
pub fn add_local_default_route(family: Family, table: u32) -> Result<()> {
    let mut message = RouteMessage::default();
    message.header = RouteHeader {
        address_family: family.netlink(),
        table: table_byte(table),
        protocol: RouteProtocol::Boot,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    message.attributes = vec![RouteAttribute::Table(table), RouteAttribute::Oif(LOOPBACK_IFINDEX)];
    tolerate(
        request(RouteNetlinkMessage::NewRoute(message), NLM_F_CREATE | NLM_F_EXCL),
        &[libc::EEXIST],
    )
    .with_context(|| format!("add the {family} route local default dev lo table {table}"))
}

/// `ip route flush table TABLE`: deletes every route of `family` in `table`; none is success.
pub fn flush_table(family: Family, table: u32) -> Result<()> {
    let what = || format!("flush the {family} routing table {table}");
    let mut query = RouteMessage::default();
    query.header.address_family = family.netlink();
    let routes = match dump(RouteNetlinkMessage::GetRoute(query)) {
        Ok(routes) => routes,
        Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => return Ok(()),
        Err(e) => return Err(e).with_context(what),
    };
    for reply in routes {
        let RouteNetlinkMessage::NewRoute(route) = reply else {
            continue;
        };
        if route_table(&route) != table {
            continue;
        }
        tolerate(
            request(RouteNetlinkMessage::DelRoute(route), 0),
            &[libc::ESRCH, libc::ENOENT],
        )
        .with_context(what)?;
    }
    Ok(())
}

fn fwmark_rule(family: Family, mark: u32, table: u32) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = family.netlink();
    message.header.table = table_byte(table);
    message.header.action = RuleAction::ToTable;
    message.attributes = vec![RuleAttribute::FwMark(mark), RuleAttribute::Table(table)];
    message
}

/// The header's one-byte table field: the table itself if it fits, else `RT_TABLE_UNSPEC` and the table in
/// the attribute only (as iproute2 does).
fn table_byte(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC)
}

/// A dumped route's table: the attribute if there is one, else the header's byte.
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// `result`, with the errnos in `ok` taken as success.
fn tolerate(result: io::Result<()>, ok: &[i32]) -> io::Result<()> {
    match result {
        Err(e) if e.raw_os_error().is_some_and(|code| ok.contains(&code)) => Ok(()),
        other => other,
    }
}

/// A socket of the calling thread's namespace, connected to the kernel.
fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn send(socket: &Socket, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(message));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// Reads the kernel's answers until the dump's end (or, with `done_on_ack`, the acknowledgement); hands every
/// inner message to `each`; an error answer is returned as its errno.
fn receive(socket: &Socket, mut each: impl FnMut(RouteNetlinkMessage), done_on_ack: bool) -> io::Result<()> {
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink answer: {e}")))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => each(m),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => match e.code {
                    None if done_on_ack => return Ok(()),
                    None => {}
                    Some(_) => return Err(e.to_io()),
                },
                _ => {}
            }
            if len == 0 || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("rtnetlink: a message of {len} bytes in {} left", rest.len()),
                ));
            }
            rest = &rest[len..];
        }
    }
}

/// Sends one change and waits for the kernel's acknowledgement.
fn request(message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let socket = open()?;
    send(&socket, message, flags | NLM_F_ACK)?;
    receive(&socket, |_| {}, true)
}

/// Sends one dump request and collects the answers.
fn dump(message: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    let socket = open()?;
    send(&socket, message, NLM_F_DUMP)?;
    let mut out = Vec::new();
    receive(&socket, |m| out.push(m), false)?;
    Ok(out)
}
