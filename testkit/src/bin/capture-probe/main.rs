//! `capture-probe`: the client and server processes the integration tests start inside a pod's network
//! namespace, inside a given child cgroup, as a given uid/gid (the harness sets all three up before exec).
//!
//! It has to be a process of its own: cgroup BPF hooks only see sockets made by processes inside the
//! cgroup they are attached to, and a thread cannot live in another cgroup v2 than its process.
//!
//! ```text
//! capture-probe connect <addr:port> [--bind <ip>] [--fastopen] [--udp] [--sendto] [--first <addr:port>] [--reuseport <port>] [--timeout-ms N] [--count N]
//! capture-probe listen <addr:port>... [--udp <addr:port>]...
//! capture-probe hold <sidecar addr:port> <first destination addr:port>
//! ```
//!
//! Every line printed is a [`Line`] (`testkit::protocol`), except `hold`'s answers to its commands.
//!
//! `connect` prints `ok <local addr:port>` and exits 0, or prints `err <text>` and exits 1. Over TCP it
//! waits for the one byte every probe listener sends; with `--fastopen` it connects by `sendto` with
//! `MSG_FASTOPEN` carrying one byte; with `--udp` it sends `ping` on a connected UDP socket and waits for
//! the echo. Any `[...]` address uses an `AF_INET6` socket, so `[::ffff:192.0.2.2]:8080` is an IPv4-mapped
//! connection.
//!
//! `listen` binds everything, prints `ready`, then one line per event, flushed:
//! `accepted <listener port> <peer> <original dst or ->` for each TCP connection (which then gets one byte
//! and is closed) and `udp <listener port> <peer>` for each datagram (echoed back). It exits when its stdin
//! reaches EOF, or after ten minutes at the latest.
//!
//! `hold` is app and sidecar at once, for many connections held open: see [`hold`].

mod hold;

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsFd as _, AsRawFd as _},
    process::ExitCode,
    time::Duration,
};

use capture::sockopt::original_dst;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrLike as _, SockaddrStorage};
use testkit::protocol::{Accepted, Datagram, Line};

const USAGE: &str = "usage: capture-probe connect <addr:port> [--bind <ip>] [--fastopen] [--udp] \
                     [--sendto] [--first <addr:port>] [--reuseport <port>] [--timeout-ms N] [--count N]\n       capture-probe listen <addr:port>... [--udp <addr:port>]... [--transparent]\n       capture-probe hold <sidecar addr:port> <first destination addr:port>";
/// `connect`'s default for each step (connect, then read).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);
/// `listen` never outlives this, even if nobody closes its stdin.
const LISTEN_LIMIT: Duration = Duration::from_secs(600);
/// How long a listener waits for a client to close after sending it the byte.
const LINGER: Duration = Duration::from_secs(1);

/// Extra time a `--count` run may take per connection before the probe gives up.
const LOAD_BUDGET_PER_CONNECTION: Duration = Duration::from_millis(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("connect") => connect_args(&args[1..]).map(connect),
        Some("listen") => listen_args(&args[1..]).map(listen),
        Some("hold") => hold::hold_args(&args[1..], USAGE).map(hold_within_limit),
        _ => Err(format!("bad command line\n{USAGE}")),
    };
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            emit(Line::Err(e));
            ExitCode::from(1)
        }
        // Exit 2: the harness called us wrong, which it must not mistake for a failed connection.
        Err(usage) => {
            emit(Line::Err(usage));
            ExitCode::from(2)
        }
    }
}

/// Prints one line (a [`Line`], or `hold`'s own) and flushes; a parent that stopped listening ends the probe.
fn emit(line: impl std::fmt::Display) {
    let mut out = io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(1);
    }
}

fn parse<T: std::str::FromStr>(what: &str, value: Option<&String>) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    let value = value.ok_or_else(|| format!("{what}: missing value\n{USAGE}"))?;
    value.parse().map_err(|e| format!("{what} {value:?}: {e}"))
}

/// What `connect` was asked to do.
struct ConnectArgs {
    dst: SocketAddr,
    bind: Option<IpAddr>,
    fastopen: bool,
    udp: bool,
    /// UDP without connect: `sendto`.
    sendto: bool,
    /// TCP: first a connect here that must fail, then the real one on the same socket.
    first: Option<SocketAddr>,
    /// TCP: bind this local port with SO_REUSEPORT first.
    reuseport: Option<u16>,
    timeout: Duration,
    /// Connections to make one after the other (load); the first failure stops the run.
    count: u32,
}

fn connect_args(args: &[String]) -> Result<ConnectArgs, String> {
    let mut dst = None;
    let (mut bind, mut fastopen, mut udp, mut timeout, mut count) = (None, false, false, DEFAULT_TIMEOUT, 1);
    let mut sendto = false;
    let mut first = None;
    let mut reuseport = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--bind" => bind = Some(parse("--bind", it.next())?),
            "--fastopen" => fastopen = true,
            "--udp" => udp = true,
            "--first" => first = Some(parse("--first", it.next())?),
            "--reuseport" => reuseport = Some(parse("--reuseport", it.next())?),
            "--sendto" => {
                udp = true;
                sendto = true;
            }
            "--timeout-ms" => timeout = Duration::from_millis(parse("--timeout-ms", it.next())?),
            "--count" => count = parse("--count", it.next())?,
            _ if dst.is_none() && !arg.starts_with("--") => dst = Some(parse("destination", Some(arg))?),
            _ => return Err(format!("unexpected argument {arg:?}\n{USAGE}")),
        }
    }
    let dst = dst.ok_or_else(|| format!("no destination\n{USAGE}"))?;
    if fastopen && udp {
        return Err("--fastopen and --udp exclude each other".to_owned());
    }
    Ok(ConnectArgs {
        dst,
        bind,
        fastopen,
        udp,
        sendto,
        first,
        reuseport,
        timeout,
        count,
    })
}

fn connect(args: ConnectArgs) -> Result<(), String> {
    // Each step is bounded by `timeout`; this bounds the whole probe even if the kernel does not honour one.
    // The budget per connection is this machine's, stretched where the tests run slower (the harness's time scale).
    let budget = LOAD_BUDGET_PER_CONNECTION * testkit::time_scale() * args.count;
    let limit = args.timeout * 3 + Duration::from_secs(1) + budget;
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        emit(Line::Err(format!("probe: no result after {limit:?}")));
        std::process::exit(1);
    });
    if args.udp {
        let (local, from) = connect_udp(&args)?;
        emit(Line::Ok {
            local,
            from: Some(from),
        });
        return Ok(());
    }
    let mut local = None;
    for _ in 0..args.count.max(1) {
        local = Some(connect_tcp(&args)?);
    }
    emit(Line::Ok {
        local: local.expect("at least one connection"),
        from: None,
    });
    Ok(())
}

/// `err` with context; a step that ran out of time says so (not "Resource temporarily unavailable").
fn step(what: &str) -> impl Fn(io::Error) -> String + '_ {
    move |e| {
        let e = match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINPROGRESS) => io::Error::from_raw_os_error(libc::ETIMEDOUT),
            _ => e,
        };
        format!("{what}: {e}")
    }
}

/// The address to bind for a socket of the destination's family (IPv4 becomes IPv4-mapped on IPv6).
fn local_for(bind: Option<IpAddr>, dst: SocketAddr) -> SocketAddr {
    let ip = match (bind, dst) {
        (None, SocketAddr::V4(_)) => IpAddr::from([0, 0, 0, 0]),
        (None, SocketAddr::V6(_)) => Ipv6Addr::UNSPECIFIED.into(),
        (Some(IpAddr::V4(v4)), SocketAddr::V6(_)) => v4.to_ipv6_mapped().into(),
        (Some(IpAddr::V6(v6)), SocketAddr::V4(_)) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        (Some(ip), _) => ip,
    };
    SocketAddr::new(ip, 0)
}

/// A UDP exchange: `ping` out, the echo back. Connected (`connect` + `send`), or with `--sendto` unconnected
/// (`sendto`); either way the reply is read with `recvfrom`, whose source address is reported: a resolver
/// checks that the answer comes from the server it asked.
fn connect_udp(args: &ConnectArgs) -> Result<(SocketAddr, SocketAddr), String> {
    let sock = UdpSocket::bind(local_for(args.bind, args.dst)).map_err(step("bind"))?;
    sock.set_read_timeout(Some(args.timeout)).map_err(step("SO_RCVTIMEO"))?;
    if args.sendto {
        sock.send_to(b"ping", args.dst).map_err(step("sendto"))?;
    } else {
        sock.connect(args.dst).map_err(step("connect"))?;
        sock.send(b"ping").map_err(step("send"))?;
    }
    let mut buf = [0; 64];
    let (_, from) = sock.recv_from(&mut buf).map_err(step("recvfrom"))?;
    Ok((sock.local_addr().map_err(step("getsockname"))?, from))
}

fn connect_tcp(args: &ConnectArgs) -> Result<SocketAddr, String> {
    let family = if args.dst.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = nix::sys::socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| step("socket")(e.into()))?;
    // An unconnected socket is still a fine TcpStream for setting timeouts and, later, reading.
    let mut stream = TcpStream::from(fd);
    // SO_SNDTIMEO bounds a blocking connect (and MSG_FASTOPEN's implicit one); SO_RCVTIMEO the read.
    stream
        .set_write_timeout(Some(args.timeout))
        .map_err(step("SO_SNDTIMEO"))?;
    stream
        .set_read_timeout(Some(args.timeout))
        .map_err(step("SO_RCVTIMEO"))?;
    let raw = stream.as_raw_fd();
    if let Some(port) = args.reuseport {
        // SO_REUSEPORT on a fixed local port, as a process sharing a port with another would.
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::ReusePort, &true)
            .map_err(|e| step("SO_REUSEPORT")(e.into()))?;
        let mut local = local_for(args.bind, args.dst);
        local.set_port(port);
        nix::sys::socket::bind(raw, &SockaddrStorage::from(local)).map_err(|e| step("bind")(e.into()))?;
    } else if args.bind.is_some() {
        let local = SockaddrStorage::from(local_for(args.bind, args.dst));
        nix::sys::socket::bind(raw, &local).map_err(|e| step("bind")(e.into()))?;
    }
    if let Some(first) = args.first {
        // A connect that fails (the caller picks a destination that refuses), then the real one on the
        // same socket: a second connect must be judged again.
        if nix::sys::socket::connect(raw, &SockaddrStorage::from(first)).is_ok() {
            return Err(format!("connect to {first} (meant to fail) succeeded"));
        }
    }
    let dst = SockaddrStorage::from(args.dst);
    if args.fastopen {
        // SAFETY: the buffer and the address are valid for the lengths given, for the whole call.
        let n = unsafe {
            libc::sendto(
                raw,
                [1u8].as_ptr().cast(),
                1,
                libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL,
                dst.as_ptr().cast(),
                dst.len(),
            )
        };
        if n != 1 {
            return Err(step("sendto(MSG_FASTOPEN)")(io::Error::last_os_error()));
        }
    } else {
        nix::sys::socket::connect(raw, &dst).map_err(|e| step("connect")(e.into()))?;
    }
    let local = stream.local_addr().map_err(step("getsockname"))?;
    let mut byte = [0];
    stream.read_exact(&mut byte).map_err(step("read"))?;
    Ok(local)
}

/// What `listen` was asked to do.
struct ListenArgs {
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
    /// IP_TRANSPARENT on the TCP listeners, as a proxy in TPROXY mode sets it.
    transparent: bool,
}

fn listen_args(args: &[String]) -> Result<ListenArgs, String> {
    let (mut tcp, mut udp, mut transparent) = (Vec::new(), Vec::new(), false);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--udp" => udp.push(parse::<SocketAddr>("--udp", it.next())?),
            "--transparent" => transparent = true,
            _ if !arg.starts_with("--") => tcp.push(parse::<SocketAddr>("listen address", Some(arg))?),
            _ => return Err(format!("unexpected argument {arg:?}\n{USAGE}")),
        }
    }
    if tcp.is_empty() && udp.is_empty() {
        return Err(format!("nothing to listen on\n{USAGE}"));
    }
    Ok(ListenArgs { tcp, udp, transparent })
}

/// `IP_TRANSPARENT` (linux/in.h) and `IPV6_TRANSPARENT` (linux/in6.h).
const IP_TRANSPARENT: libc::c_int = 19;
const IPV6_TRANSPARENT: libc::c_int = 75;

fn set_transparent(listener: &TcpListener, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::SOL_IPV6, IPV6_TRANSPARENT)
    } else {
        (libc::SOL_IP, IP_TRANSPARENT)
    };
    let one: libc::c_int = 1;
    // SAFETY: the pointer and length describe `one`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(listener),
            level,
            name,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn listen(ListenArgs { tcp, udp, transparent }: ListenArgs) -> Result<(), String> {
    let tcp = tcp
        .iter()
        .map(|&a| {
            let listener = TcpListener::bind(a).map_err(|e| format!("listen on {a}: {e}"))?;
            if transparent {
                set_transparent(&listener, a.is_ipv6()).map_err(|e| format!("IP_TRANSPARENT on {a}: {e}"))?;
            }
            Ok(listener)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let udp = udp
        .iter()
        .map(|&a| UdpSocket::bind(a).map_err(|e| format!("udp on {a}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    std::thread::spawn(|| {
        std::thread::sleep(LISTEN_LIMIT);
        std::process::exit(0);
    });
    for listener in tcp {
        std::thread::spawn(move || serve_tcp(listener));
    }
    for sock in udp {
        std::thread::spawn(move || serve_udp(sock));
    }
    emit(Line::Ready);
    // Until the parent closes our stdin (or dies).
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
    Ok(())
}

/// `hold`, ended after [`LISTEN_LIMIT`] at the latest like `listen`.
fn hold_within_limit(args: hold::HoldArgs) -> Result<(), String> {
    std::thread::spawn(|| {
        std::thread::sleep(LISTEN_LIMIT);
        std::process::exit(0);
    });
    hold::hold(args)
}

fn port_of(local: io::Result<SocketAddr>) -> u16 {
    local.map_or(0, |a| a.port())
}

fn serve_tcp(listener: TcpListener) {
    let port = port_of(listener.local_addr());
    let v6_listener = listener.local_addr().is_ok_and(|a| a.is_ipv6());
    loop {
        let (mut conn, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("capture-probe: accept on {port}: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let fd = conn.as_fd();
        let mapped = matches!(peer, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some());
        let dst = if !v6_listener {
            original_dst(fd, false)
        } else if mapped {
            original_dst(fd, false).or_else(|_| original_dst(fd, true))
        } else {
            original_dst(fd, true)
        };
        emit(Line::Accepted(Accepted {
            listener: port,
            peer,
            original_dst: dst.ok(),
        }));
        std::thread::spawn(move || {
            let _ = conn.write_all(&[1]);
            let _ = conn.shutdown(std::net::Shutdown::Write);
            // Read what the client sent (a fast-open byte) until it closes, so closing sends no RST.
            let _ = conn.set_read_timeout(Some(LINGER));
            let mut buf = [0; 512];
            for _ in 0..64 {
                if !matches!(conn.read(&mut buf), Ok(n) if n > 0) {
                    break;
                }
            }
        });
    }
}

fn serve_udp(sock: UdpSocket) {
    let port = port_of(sock.local_addr());
    let mut buf = [0; 2048];
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                emit(Line::Udp(Datagram { listener: port, peer }));
                let _ = sock.send_to(&buf[..n], peer);
            }
            Err(e) => {
                eprintln!("capture-probe: udp recv on {port}: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
