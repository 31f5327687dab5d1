//! A small transparent forwarding proxy, the stand-in for Envoy in the demo and the tests: it accepts on
//! the capture ports, asks the kernel for the original destination (`SO_ORIGINAL_DST`) like a real proxy,
//! connects there as the proxy user, and copies bytes both ways.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::Sender,
    },
    thread::JoinHandle,
    time::Duration,
};

use capture::sockopt::original_dst;

use crate::{Netns, connect_timeout};

/// The address the proxy's inbound passthrough connects from (istio's 127.0.0.6 / ::6), so that capture
/// lets the forwarded connection reach the app.
const PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// One connection the sidecar handled.
#[derive(Clone, Debug)]
pub struct Forwarded {
    /// The capture port it arrived on.
    pub listener: u16,
    /// The client.
    pub peer: SocketAddr,
    /// Where the client was going, as the kernel told the sidecar.
    pub original_dst: Option<SocketAddr>,
    /// Whether forwarding there worked.
    pub result: Result<(), String>,
}

/// A running sidecar; stops on drop.
pub struct Sidecar {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Its namespace and ports, to wake the blocked accepts when it stops.
    ns: std::fs::File,
    ports: Vec<u16>,
}

impl Sidecar {
    /// Listens on `[::]:port` (dual-stack) for each of `ports` inside `ns`, as `ids`; reports each connection
    /// on `events`. `inbound` is the port whose forwarded connections start from the passthrough address.
    pub fn start(ns: &Netns, ids: (u32, u32), ports: &[u16], inbound: u16, events: Sender<Forwarded>) -> Sidecar {
        Self::start_with_fallback(ns, ids, ports, inbound, events, None)
    }

    /// As [`Sidecar::start`]; a connection with no original destination (one that was not redirected, as
    /// in the benchmark's no-capture floor) is forwarded to `fallback` if given.
    pub fn start_with_fallback(
        ns: &Netns,
        ids: (u32, u32),
        ports: &[u16],
        inbound: u16,
        events: Sender<Forwarded>,
        fallback: Option<SocketAddr>,
    ) -> Sidecar {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let threads = ports
            .iter()
            .map(|&port| {
                let (stop, events, ready) = (stop.clone(), events.clone(), ready_tx.clone());
                ns.spawn(Some(ids), move || {
                    let listener = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                        .unwrap_or_else(|e| panic!("sidecar: listen on {port}: {e}"));
                    ready.send(()).expect("ready");
                    // Blocking accepts (a benchmark measures this proxy too); a stop is a flag plus one
                    // connection that wakes the accept.
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok(_) if stop.load(Ordering::Relaxed) => return,
                            Ok((conn, peer)) => {
                                let events = events.clone();
                                // Threads inherit this thread's namespace and credentials.
                                std::thread::spawn(move || {
                                    let event = handle(conn, peer, port, port == inbound, fallback);
                                    let _ = events.send(event);
                                });
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(1)),
                        }
                    }
                })
            })
            .collect();
        for _ in ports {
            ready_rx.recv_timeout(connect_timeout()).expect("sidecar did not start");
        }
        Sidecar {
            stop,
            threads,
            ns: std::fs::File::open(ns.path()).expect("open the sidecar's namespace"),
            ports: ports.to_vec(),
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let (ports, ns) = (self.ports.clone(), self.ns.try_clone());
        // From inside the namespace, as root: local traffic, never captured.
        let waker = std::thread::spawn(move || {
            let Ok(ns) = ns else { return };
            if nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                for port in ports {
                    let _ = TcpStream::connect_timeout(
                        &SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port),
                        connect_timeout(),
                    );
                }
            }
        });
        let _ = waker.join();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// An IPv4 client on a dual-stack socket shows up as `::ffff:a.b.c.d`; the kernel keeps its state as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

fn handle(conn: TcpStream, peer: SocketAddr, listener: u16, inbound: bool, fallback: Option<SocketAddr>) -> Forwarded {
    let peer = canonical(peer);
    let original_dst = original_dst(conn.as_fd(), peer.is_ipv6()).ok();
    let result = match original_dst.or(fallback) {
        None => Err("no original destination".to_owned()),
        Some(dst) => forward(conn, dst, inbound).map_err(|e| e.to_string()),
    };
    Forwarded {
        listener,
        peer,
        original_dst,
        result,
    }
}

fn forward(client: TcpStream, dst: SocketAddr, inbound: bool) -> io::Result<()> {
    let upstream = if inbound {
        let source: IpAddr = if dst.is_ipv6() {
            PASSTHROUGH_V6.into()
        } else {
            PASSTHROUGH_V4.into()
        };
        connect_from(source, dst)?
    } else {
        TcpStream::connect_timeout(&dst, connect_timeout())?
    };
    for s in [&client, &upstream] {
        s.set_read_timeout(Some(connect_timeout()))?;
    }
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

/// Connects to `dst` from `source` (port chosen by the kernel).
fn connect_from(source: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};
    let family = if dst.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(SocketAddr::new(source, 0)),
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(dst))?;
    Ok(TcpStream::from(fd))
}
