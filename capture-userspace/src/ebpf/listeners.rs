//! Finding the proxy's listening sockets that already exist when a namespace is registered, so inbound
//! capture works even if the proxy started first (an agent registering running pods). sockops learns
//! listeners only when they start listening; these are handed to the `LISTENERS` sockhash by the loader.
//!
//! A listener is found by a sock_diag dump of the calling thread's namespace (the agent registers pods
//! from threads that entered them), its owner by its inode among the processes' descriptors, and a copy of
//! the descriptor is taken with pidfd_getfd(2) (Linux 5.6). The dump asks for listeners only, so the
//! kernel walks just its listening table: /proc/net/tcp walks the established table, which every
//! namespace of the host shares, and cost more than the rest of a registration together.

use std::{
    fs, io,
    os::fd::{FromRawFd, OwnedFd},
};

use anyhow::{Context as _, Result, bail};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

/// A listening socket of this namespace on one of the wanted ports.
#[derive(Debug, PartialEq, Eq)]
pub struct Listening {
    /// Its port.
    pub port: u16,
    /// AF_INET or AF_INET6.
    pub family: u32,
    /// Its socket inode.
    pub inode: u64,
}

/// The TCP sockets of `family` listening on `ports` in the calling thread's network namespace.
fn listening(family: u8, ports: &[u16]) -> Result<Vec<Listening>> {
    // A netlink socket belongs to the namespace of the thread that creates it.
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("open a sock_diag socket")?;
    socket.bind_auto().context("bind the sock_diag socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connect the sock_diag socket")?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::LISTEN,
        socket_id: if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        },
    });
    let mut message = NetlinkMessage::new(header, request.into());
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0).context("send the sock_diag request")?;

    let mut found = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full().context("read the sock_diag dump")?;
        let mut rest = &datagram[..];
        while !rest.is_empty() {
            let reply = NetlinkMessage::<SockDiagMessage>::deserialize(rest).context("parse the sock_diag dump")?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let port = r.header.socket_id.source_port;
                    if ports.contains(&port) {
                        found.push(Listening {
                            port,
                            family: u32::from(family),
                            inode: u64::from(r.header.inode),
                        });
                    }
                }
                NetlinkPayload::Done(_) => return Ok(found),
                NetlinkPayload::Error(e) => bail!("sock_diag: {e}"),
                _ => {}
            }
            if len == 0 || len > rest.len() {
                bail!("sock_diag: a message of {len} bytes in {} left", rest.len());
            }
            rest = &rest[len..];
        }
    }
}

/// The listening sockets on `ports` in the current network namespace, each with a descriptor of it; those
/// whose inode is in `known` are left out (and their owners not searched for).
pub fn existing(ports: &[u16], known: &[u64]) -> Result<Vec<(Listening, OwnedFd)>> {
    let mut wanted = listening(AF_INET, ports)?;
    wanted.extend(listening(AF_INET6, ports)?);
    wanted.retain(|l| !known.contains(&l.inode));
    let mut found = Vec::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    for proc in fs::read_dir("/proc").context("read /proc")?.flatten() {
        let Some(pid) = proc.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        // Processes come and go, and some are not ours to read: skip what cannot be read.
        let Ok(fds) = fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else { continue };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(at) = wanted.iter().position(|l| l.inode == inode) else {
                continue;
            };
            let Some(number) = fd.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(owned) = take(pid, number) {
                found.push((wanted.swap_remove(at), owned));
            }
            if wanted.is_empty() {
                return Ok(found);
            }
        }
    }
    Ok(found)
}

/// A copy of process `pid`'s descriptor `fd` (pidfd_open + pidfd_getfd).
fn take(pid: i32, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number in that process, and flags.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as i32) })
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::unix::fs::MetadataExt as _};

    use super::*;

    /// The inode of a socket, as the kernel reports it in /proc/self/fd.
    fn inode(fd: &impl std::os::fd::AsRawFd) -> u64 {
        fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap().ino()
    }

    #[test]
    fn the_dump_finds_listeners_on_the_wanted_ports_only() {
        let wanted = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").ok();
        let port = wanted.local_addr().unwrap().port();
        let found = listening(AF_INET, &[port]).unwrap();
        assert_eq!(
            found,
            [Listening {
                port,
                family: u32::from(AF_INET),
                inode: inode(&wanted)
            }]
        );
        assert!(!found.iter().any(|l| l.inode == inode(&other)));
        // An IPv6 listener is in the IPv6 dump (where this host has IPv6 at all).
        if let Some(v6) = v6 {
            let port = v6.local_addr().unwrap().port();
            let found = listening(AF_INET6, &[port]).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].inode, inode(&v6));
        }
    }
}
