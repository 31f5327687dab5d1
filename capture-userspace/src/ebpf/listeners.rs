//! Finding the proxy's listening sockets that already exist when a namespace is registered, so inbound
//! capture works even if the proxy started first (an agent registering running pods). sockops learns
//! listeners only when they start listening; these are handed to the `LISTENERS` sockhash by the loader.
//!
//! A listener is found by its inode in this namespace's /proc/thread-self/net/tcp{,6} (the calling
//! thread's namespace: the agent registers pods from threads that entered them), its owner by that inode
//! among the processes' descriptors, and a copy of the descriptor is taken with pidfd_getfd(2) (Linux 5.6).

use std::{
    fs, io,
    os::fd::{FromRawFd, OwnedFd},
};

use anyhow::{Context as _, Result};

/// `TCP_LISTEN` in /proc/net/tcp's `st` column.
const TCP_LISTEN_STATE: &str = "0A";
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

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

/// Parses /proc/net/tcp or tcp6 text: the listening sockets on `ports`.
pub fn parse_proc_net_tcp(text: &str, family: u32, ports: &[u16]) -> Vec<Listening> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            (*state == TCP_LISTEN_STATE && ports.contains(&port)).then_some(())?;
            Some(Listening {
                port,
                family,
                inode: inode.parse().ok()?,
            })
        })
        .collect()
}

/// The listening sockets on `ports` in the current network namespace, each with a descriptor of it.
pub fn existing(ports: &[u16]) -> Result<Vec<(Listening, OwnedFd)>> {
    let mut wanted = Vec::new();
    for (path, family) in [
        ("/proc/thread-self/net/tcp", AF_INET),
        ("/proc/thread-self/net/tcp6", AF_INET6),
    ] {
        match fs::read_to_string(path) {
            Ok(text) => wanted.extend(parse_proc_net_tcp(&text, family, ports)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("read {path}")),
        }
    }
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
    use super::*;

    #[test]
    fn listening_sockets_on_the_wanted_ports_are_picked_from_proc_net_tcp() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 00000000:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4242 1 0\n\
            1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4243 1 0\n\
            2: 0100007F:3A9E 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1000        0 4244 1 0\n";
        let got = parse_proc_net_tcp(text, AF_INET, &[15006, 15001]);
        assert_eq!(
            got,
            [
                Listening {
                    port: 15006,
                    family: AF_INET,
                    inode: 4242
                },
                Listening {
                    port: 15001,
                    family: AF_INET,
                    inode: 4243
                }
            ]
        );
    }
}
