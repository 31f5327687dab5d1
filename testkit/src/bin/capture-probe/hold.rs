//! `capture-probe hold`: many captured connections held open at once, app and sidecar in one process.
//!
//! ```text
//! capture-probe hold <sidecar addr:port> <first destination addr:port>
//! ```
//!
//! It listens on the sidecar address with `SO_REUSEPORT` (so several `hold` processes of one pod share the
//! sidecar port, as a proxy's worker threads do; the kernel spreads new connections over them) and a backlog
//! as large as `net.core.somaxconn` allows, prints `ready`, then takes commands on stdin, one a line, and
//! answers each with one line:
//!
//! - `connect FROM N`: connections `FROM` to `FROM + N - 1`, one after the other. Connection `i` goes to
//!   the first destination's address plus `i`, same port, from a source address and port that also follow
//!   from `i` ([`source`]): so whichever process of the pod accepts it knows where it was going. Nothing is
//!   accepted: with capture, each lands in an accept queue of the sidecar port. Answers `connected N`.
//! - `accept`: accepts every connection waiting at this process's listener, reads `SO_ORIGINAL_DST` on each
//!   like a proxy and compares it with where that connection was going. Answers
//!   `checked <n> right <r> wrong <w> none <m>` for this round, and `first-wrong <peer> <got> <expected>`
//!   before it if any was wrong.
//! - `recheck`: reads `SO_ORIGINAL_DST` again on every socket this process accepted (a proxy may ask at any
//!   time while the connection lives) and answers the same way.
//!
//! Every socket stays open until stdin reaches EOF; then the probe exits, closing them all. IPv4 only. It
//! raises its open-file limit to the hard limit; the caller keeps each process within it (two descriptors a
//! connection) and raises the namespace's `somaxconn`.

use std::{
    io::{self, BufRead as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    time::Duration,
};

use capture::sockopt::original_dst;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, sockopt};
use testkit::protocol::Line;

use crate::emit;

/// Source ports used per source address: from [`FIRST_PORT`] on, clear of the sidecar's ports.
const PORTS_PER_SOURCE: u32 = 40_000;
/// The first source port.
const FIRST_PORT: u32 = 20_000;
/// The first source address; the next ones follow it.
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 1, 1);
/// One connect may take this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `accept` stops once nothing has been waiting for this long.
const QUIET: Duration = Duration::from_millis(200);

/// What `hold` was asked to do.
pub struct HoldArgs {
    sidecar: SocketAddrV4,
    first: SocketAddrV4,
}

pub fn hold_args(args: &[String], usage: &str) -> Result<HoldArgs, String> {
    let [sidecar, first] = args else {
        return Err(format!("hold takes a sidecar address and a first destination\n{usage}"));
    };
    let v4 = |what: &str, s: &String| match s.parse::<SocketAddr>() {
        Ok(SocketAddr::V4(a)) => Ok(a),
        Ok(SocketAddr::V6(_)) => Err(format!("hold: {what} {s:?}: IPv4 only")),
        Err(e) => Err(format!("hold: {what} {s:?}: {e}")),
    };
    Ok(HoldArgs {
        sidecar: v4("sidecar", sidecar)?,
        first: v4("first destination", first)?,
    })
}

/// The source address and port of connection `i`.
fn source(i: u32) -> SocketAddrV4 {
    let ip = Ipv4Addr::from(u32::from(FIRST_SOURCE) + i / PORTS_PER_SOURCE);
    SocketAddrV4::new(ip, (FIRST_PORT + i % PORTS_PER_SOURCE) as u16)
}

/// The connection whose source is `peer`, if it is one of ours.
fn index_of(peer: SocketAddr) -> Option<u32> {
    let SocketAddr::V4(peer) = peer else { return None };
    let nth_source = u32::from(*peer.ip()).checked_sub(u32::from(FIRST_SOURCE))?;
    let port = u32::from(peer.port()).checked_sub(FIRST_PORT)?;
    (port < PORTS_PER_SOURCE).then(|| nth_source * PORTS_PER_SOURCE + port)
}

/// One process's share: the listener, and every socket it holds.
struct Held {
    listener: TcpListener,
    first: SocketAddrV4,
    /// The application's sockets this process connected.
    app: Vec<TcpStream>,
    /// The sidecar's sockets this process accepted.
    accepted: Vec<TcpStream>,
}

pub fn hold(args: HoldArgs) -> Result<(), String> {
    raise_file_limit().map_err(|e| format!("raise RLIMIT_NOFILE: {e}"))?;
    let listener = listen(args.sidecar).map_err(|e| format!("listen on {}: {e}", args.sidecar))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("O_NONBLOCK on the listener: {e}"))?;
    let mut held = Held {
        listener,
        first: args.first,
        app: Vec::new(),
        accepted: Vec::new(),
    };
    emit(Line::Ready);
    for line in io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["connect", from, n] => {
                let number = |s: &str| s.parse::<u32>().map_err(|e| format!("connect {s:?}: {e}"));
                let n = number(n)?;
                held.connect(number(from)?, n)?;
                emit(format!("connected {n}"));
            }
            ["accept"] => {
                let start = held.accepted.len();
                held.accept()?;
                emit(held.check(start));
            }
            ["recheck"] => emit(held.check(0)),
            _ => return Err(format!("hold: unknown command {line:?}")),
        }
    }
    Ok(())
}

/// The soft open-file limit up to the hard one (no privilege needed).
fn raise_file_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the kernel to fill, then to read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A listener sharing its port with the pod's other `hold` processes, with a backlog as large as the
/// namespace allows (the kernel caps it at `somaxconn`).
fn listen(addr: SocketAddrV4) -> io::Result<TcpListener> {
    let fd = nix::sys::socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    nix::sys::socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    // SAFETY: a socket this function owns; listen only reads its arguments.
    if unsafe { libc::listen(fd.as_raw_fd(), libc::c_int::MAX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(fd))
}

impl Held {
    /// Where connection `i` goes: the first destination's address plus `i`.
    fn destination(&self, i: u32) -> SocketAddrV4 {
        let ip = u32::from(*self.first.ip()).wrapping_add(i);
        SocketAddrV4::new(Ipv4Addr::from(ip), self.first.port())
    }

    fn connect(&mut self, from: u32, n: u32) -> Result<(), String> {
        for i in from..from.saturating_add(n) {
            let (src, dst) = (source(i), self.destination(i));
            let stream = connect_one(src, dst).map_err(|e| format!("connection {i} to {dst} from {src}: {e}"))?;
            self.app.push(stream);
        }
        Ok(())
    }

    /// Accepts until nothing has been waiting for [`QUIET`].
    fn accept(&mut self) -> Result<(), String> {
        let mut quiet = Duration::ZERO;
        let pause = Duration::from_millis(5);
        while quiet < QUIET {
            match self.listener.accept() {
                Ok((conn, _)) => {
                    self.accepted.push(conn);
                    quiet = Duration::ZERO;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(pause);
                    quiet += pause;
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
        Ok(())
    }

    /// Compares the original destination of each accepted socket from `start` on with where its connection
    /// was going; the answer line.
    fn check(&self, start: usize) -> String {
        let (mut right, mut wrong, mut none) = (0u32, 0u32, 0u32);
        let mut first_wrong = None;
        for conn in &self.accepted[start..] {
            let peer = conn.peer_addr().ok();
            let expected = peer.and_then(index_of).map(|i| SocketAddr::V4(self.destination(i)));
            match original_dst(conn.as_fd(), false).ok() {
                None => none += 1,
                Some(got) if Some(got) == expected => right += 1,
                Some(got) => {
                    wrong += 1;
                    first_wrong.get_or_insert((peer, got, expected));
                }
            }
        }
        if let Some((peer, got, expected)) = first_wrong {
            let show = |a: Option<SocketAddr>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
            emit(format!("first-wrong {} {got} {}", show(peer), show(expected)));
        }
        format!(
            "checked {} right {right} wrong {wrong} none {none}",
            self.accepted.len() - start
        )
    }
}

/// One blocking connect from `src` to `dst`, bounded by [`CONNECT_TIMEOUT`].
fn connect_one(src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<TcpStream> {
    let fd = nix::sys::socket::socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn::from(src))?;
    let stream = TcpStream::from(fd);
    // SO_SNDTIMEO bounds a blocking connect.
    stream.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    nix::sys::socket::connect(stream.as_raw_fd(), &SockaddrIn::from(dst))?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_is_found_again_from_its_source() {
        for i in [0, 1, PORTS_PER_SOURCE - 1, PORTS_PER_SOURCE, 3 * PORTS_PER_SOURCE + 7] {
            assert_eq!(index_of(SocketAddr::V4(source(i))), Some(i), "{i}");
        }
        assert_eq!(index_of("127.0.0.1:30000".parse().unwrap()), None);
        assert_eq!(index_of("127.0.1.1:15001".parse().unwrap()), None);
    }
}
