//! Loopback acceleration (`--loopback-accel`): sends between the app and its sidecar skip the loopback
//! TCP/IP path, and nothing else changes. Every scenario runs twice, once without acceleration and once with
//! it, and must give the same result: large transfers byte for byte, half-close, reset, many concurrent
//! pairs, TCP Fast Open, and a proxy restart. Loopback's own byte counters show the path was skipped. One
//! test pins where blocking reads do differ ([`blocking_reads`]).
//!
//! The sidecar runs on threads of this process, which must be in the attach cgroup for sockops to see its
//! sockets; scenarios therefore take turns (one process-wide cgroup at a time).

use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{Mutex, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use testkit::{
    BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, InCgroup, Netns, Pod, REMOTE_V4, capture, echo::EchoServer, sa,
    sidecar::Sidecar,
};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);
/// The remote echo server: everything it reads it writes back; at the client's EOF it closes.
const ECHO_PORT: u16 = 8080;
/// A local server in the pod (the app talking to a process beside it: also accelerated).
const LOCAL_PORT: u16 = 7001;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// One scenario at a time: the process moves into each scenario's cgroup.
static TURN: Mutex<()> = Mutex::new(());

/// A pod with capture applied (with or without acceleration), a sidecar and a remote echo server.
/// Fields drop in order: sidecar and process leave the cgroup before it is removed.
struct World {
    sidecar: Option<Sidecar>,
    _echo: EchoServer,
    _inside: InCgroup,
    pins: BpfPins,
    _cgroup: Cgroup,
    pod: Pod,
}

impl World {
    fn new(tag: &str, accel: bool) -> World {
        let tag = format!("{tag}{}", if accel { "-a" } else { "-t" });
        let pod = Pod::new(&tag);
        let cgroup = Cgroup::new(&tag);
        let pins = BpfPins::new(&tag);
        let inside = cgroup.enter_self();
        let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
        let mut args = vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin];
        args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
        if accel {
            args.push("--loopback-accel");
        }
        let out = capture(&pod.pod, &args);
        assert!(out.status.success(), "apply: {}", String::from_utf8_lossy(&out.stderr));
        let echo = EchoServer::start(&pod.remote, sa(REMOTE_V4, ECHO_PORT));
        let mut world = World {
            sidecar: None,
            _echo: echo,
            _inside: inside,
            pins,
            _cgroup: cgroup,
            pod,
        };
        world.start_sidecar();
        world
    }

    fn start_sidecar(&mut self) {
        let (tx, rx) = mpsc::channel();
        drop(rx);
        self.sidecar = Some(Sidecar::start(&self.pod.pod, PROXY, &[15001, 15006], 15006, tx));
    }

    /// `capture status` counters of the pod's namespace.
    fn counters(&self) -> HashMap<String, u64> {
        let pin = self.pins.path().display().to_string();
        let out = capture(&self.pod.pod, &["status", "--backend", "ebpf", "--pin-dir", &pin]);
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().skip_while(|l| !l.contains("(this namespace)"));
        lines.next().expect("this namespace is registered");
        lines
            .next()
            .expect("counters line")
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().expect("counter value")))
            .collect()
    }

    /// Bytes sent on the pod's loopback interface so far.
    fn loopback_bytes(&self) -> u64 {
        self.pod
            .pod
            .spawn(None, || {
                let dev = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev");
                let line = dev
                    .lines()
                    .find_map(|l| l.trim_start().strip_prefix("lo:"))
                    .expect("lo in net/dev");
                // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit bytes.
                line.split_whitespace()
                    .nth(8)
                    .expect("lo tx bytes")
                    .parse()
                    .expect("number")
            })
            .join()
            .expect("read loopback counters")
    }

    /// Runs `f` as the app (uid 1000) in the pod.
    fn app<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.pod.pod.spawn(Some(APP), f).join().expect("app thread")
    }
}

/// Byte `i` of stream `seed`: every stream and offset differ, so a lost, doubled or reordered chunk shows.
fn pattern(seed: u64, i: u64) -> u8 {
    ((i.wrapping_add(seed.wrapping_mul(0x9e37_79b9))
        .wrapping_mul(0x2545_f491_4f6c_dd1d))
        >> 56) as u8
}

/// What one echoed stream came back as.
#[derive(Debug, PartialEq, Eq)]
struct Echoed {
    /// Bytes that came back before EOF (or the error).
    received: u64,
    /// The first offset that came back wrong.
    first_mismatch: Option<u64>,
    /// The errors that ended the stream: none for a clean EOF.
    errors: Vec<ErrorKind>,
    /// Reads that returned EAGAIN early and were read again.
    early_eagain: u32,
}

impl Echoed {
    /// What the application ends up with: the bytes, whether they were right, how the stream ended.
    fn outcome(&self) -> (u64, Option<u64>, &[ErrorKind]) {
        (self.received, self.first_mismatch, &self.errors)
    }
}

/// Early EAGAINs tolerated on one stream before it counts as broken.
const MAX_EARLY_EAGAIN: u32 = 1000;

/// Reads `s` to its end (EOF or an error), checking each byte against stream `seed`. A blocking read in
/// the accelerated receive path can return EAGAIN long before its timeout (the kernel's sockmap receive
/// gives up when woken without data, as by a reset or a signal; see [`blocking_reads`]): such an early
/// `WouldBlock` is counted and read again, as a careful application would; one at the timeout ends the
/// stream.
fn read_checked(mut s: TcpStream, seed: u64) -> Echoed {
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    let mut out = Echoed {
        received: 0,
        first_mismatch: None,
        errors: Vec::new(),
        early_eagain: 0,
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let waited = Instant::now();
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => {
                if out.first_mismatch.is_none() {
                    out.first_mismatch = (0..n)
                        .find(|&j| buf[j] != pattern(seed, out.received + j as u64))
                        .map(|j| out.received + j as u64);
                }
                out.received += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && waited.elapsed() < IO_TIMEOUT / 2 => {
                out.early_eagain += 1;
                if out.early_eagain > MAX_EARLY_EAGAIN {
                    out.errors.push(e.kind());
                    return out;
                }
            }
            Err(e) => {
                out.errors.push(e.kind());
                return out;
            }
        }
    }
}

/// Sends `total` bytes of stream `seed` on `s` (in `chunk`-sized writes, then a half-close) while reading
/// the echo back and checking it.
fn echo_stream(s: TcpStream, seed: u64, total: u64, chunk: usize) -> Echoed {
    let mut writer = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let mut buf = vec![0u8; chunk];
        let mut sent = 0u64;
        while sent < total {
            let n = chunk.min((total - sent) as usize);
            for (j, b) in buf[..n].iter_mut().enumerate() {
                *b = pattern(seed, sent + j as u64);
            }
            if writer.write_all(&buf[..n]).is_err() {
                return;
            }
            sent += n as u64;
        }
        let _ = writer.shutdown(Shutdown::Write);
    });
    let out = read_checked(s, seed);
    let _ = sender.join();
    out
}

/// The app's connection to the remote echo server (captured: it goes through the sidecar).
fn via_sidecar(seed: u64, total: u64, chunk: usize) -> impl FnOnce() -> Echoed + Send + 'static {
    move || {
        let s = TcpStream::connect_timeout(&sa(REMOTE_V4, ECHO_PORT), IO_TIMEOUT).expect("connect");
        echo_stream(s, seed, total, chunk)
    }
}

fn clean_echo(total: u64) -> Echoed {
    Echoed {
        received: total,
        first_mismatch: None,
        errors: Vec::new(),
        early_eagain: 0,
    }
}

/// Runs `scenario` without and with acceleration; returns both results for the caller to compare.
fn both<T>(tag: &str, scenario: impl Fn(&mut World) -> T) -> [T; 2] {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    [false, true].map(|accel| {
        let mut world = World::new(tag, accel);
        scenario(&mut world)
    })
}

#[test]
fn large_transfers_arrive_byte_for_byte_and_skip_loopback() {
    const TOTAL: u64 = 64 << 20;
    let [tcp, accel] = both("acc-big", |w| {
        let before = w.loopback_bytes();
        let echoed = w.app(via_sidecar(1, TOTAL, 256 << 10));
        let lo = w.loopback_bytes() - before;
        (echoed, lo, w.counters())
    });
    for (mode, (echoed, _, _)) in [("tcp", &tcp), ("accel", &accel)] {
        assert_eq!(echoed.outcome(), clean_echo(TOTAL).outcome(), "{mode}");
    }
    // Both directions of the app↔sidecar leg cross loopback without acceleration, and (almost) nothing does
    // with it: the handshake and FIN only.
    assert!(
        tcp.1 >= 2 * TOTAL,
        "without acceleration loopback carried only {} bytes",
        tcp.1
    );
    assert!(
        accel.1 < TOTAL / 100,
        "with acceleration loopback still carried {} bytes",
        accel.1
    );
    assert_eq!(tcp.2["accelerated_sockets"], 0);
    assert!(accel.2["accelerated_sockets"] >= 2, "{:?}", accel.2);
    assert_eq!(accel.2["accel_fallbacks"], 0, "{:?}", accel.2);
}

#[test]
fn many_concurrent_pairs_keep_their_own_streams() {
    const PAIRS: u64 = 32;
    const EACH: u64 = 2 << 20;
    let [tcp, accel] = both("acc-many", |w| {
        let clients: Vec<JoinHandle<Echoed>> = (0..PAIRS)
            .map(|seed| {
                w.pod
                    .pod
                    .spawn(Some(APP), via_sidecar(100 + seed, EACH, 4096 + seed as usize * 61))
            })
            .collect();
        let results: Vec<Echoed> = clients.into_iter().map(|c| c.join().expect("client")).collect();
        (results, w.counters())
    });
    for (mode, (results, _)) in [("tcp", &tcp), ("accel", &accel)] {
        for (seed, r) in results.iter().enumerate() {
            assert_eq!(r.outcome(), clean_echo(EACH).outcome(), "{mode}: pair {seed}");
        }
    }
    assert!(accel.1["accelerated_sockets"] >= 2 * PAIRS, "{:?}", accel.1);
    assert_eq!(accel.1["accel_fallbacks"], 0, "{:?}", accel.1);
}

/// SO_LINGER with a zero time: close resets the connection.
const ABORT: libc::linger = libc::linger {
    l_onoff: 1,
    l_linger: 0,
};

/// `SO_ORIGINAL_DST` asked by the app on its own redirected socket gets no answer, never a wrong address
/// (the README's differences: conntrack would answer; capture keeps the destination on the proxy's end
/// only). The proxy's end is answered: the sidecar, which reads it, still reaches the remote.
#[test]
fn the_apps_own_redirected_socket_gets_no_original_destination() {
    for (own, echoed) in both("own", |w| {
        w.app(|| {
            let mut s = TcpStream::connect_timeout(&sa(REMOTE_V4, ECHO_PORT), IO_TIMEOUT).expect("connect");
            let own = ::capture::sockopt::original_dst(s.as_fd(), false);
            s.write_all(b"x").expect("send");
            let mut back = [0u8; 1];
            s.read_exact(&mut back).expect("echo");
            (own, back[0])
        })
    }) {
        assert!(own.is_err(), "the app's own socket was answered: {own:?}");
        assert_eq!(echoed, b'x');
    }
}

/// Sets the `SOL_SOCKET` option `option` of `s` to `value`.
fn set_socket_option<T>(s: &TcpStream, option: libc::c_int, value: T) {
    // SAFETY: a valid socket and an option value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {option}: {}", std::io::Error::last_os_error());
}

/// A local server in the pod (uid 1000, in the cgroup) that accepts one connection and, after `delay`, reads
/// it to its end (see [`read_checked`]).
fn local_reader(w: &World, seed: u64, delay: Duration) -> JoinHandle<Echoed> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let handle = w.pod.pod.spawn(Some(APP), move || {
        let listener = TcpListener::bind(sa(Ipv4Addr::LOCALHOST, LOCAL_PORT)).expect("local: listen");
        ready_tx.send(()).expect("ready");
        let (conn, _) = listener.accept().expect("local: accept");
        std::thread::sleep(delay);
        read_checked(conn, seed)
    });
    ready_rx.recv_timeout(IO_TIMEOUT).expect("local server did not start");
    handle
}

#[test]
fn half_close_and_reset_end_streams_as_tcp_does() {
    const TOTAL: u64 = 4 << 20;
    let [tcp, accel] = both("acc-end", |w| {
        // Half-close through the sidecar: the echo of everything sent comes back after the app's FIN.
        let half_closed = w.app(via_sidecar(7, TOTAL, 65536));
        // Reset: the app writes, then aborts (SO_LINGER 0); the local peer reads what arrived, then the reset.
        let server = local_reader(w, 8, Duration::ZERO);
        w.app(|| {
            let mut s = TcpStream::connect_timeout(&sa(Ipv4Addr::LOCALHOST, LOCAL_PORT), IO_TIMEOUT).expect("connect");
            let data: Vec<u8> = (0..TOTAL).map(|i| pattern(8, i)).collect();
            s.write_all(&data).expect("write");
            // Let the reader drain the data before the reset arrives: a reset may drop unread data.
            std::thread::sleep(Duration::from_millis(500));
            set_socket_option(&s, libc::SO_LINGER, ABORT);
        });
        let reset = server.join().expect("local server");
        (half_closed, reset, w.counters())
    });
    assert_eq!(tcp.0, clean_echo(TOTAL), "tcp: half-close");
    assert_eq!(accel.0.outcome(), tcp.0.outcome(), "accel: half-close");
    assert_eq!(
        tcp.1,
        Echoed {
            received: TOTAL,
            first_mismatch: None,
            errors: vec![ErrorKind::ConnectionReset],
            early_eagain: 0,
        },
        "tcp: reset"
    );
    // Every byte, then the reset (the accelerated receive path may say EAGAIN first, counted apart).
    assert_eq!(accel.1.outcome(), tcp.1.outcome(), "accel: reset");
    // The sidecar pair and the local pair: four sockets.
    assert!(accel.2["accelerated_sockets"] >= 4, "{:?}", accel.2);
}

#[test]
fn fast_open_data_keeps_its_place_in_the_stream() {
    const TOTAL: u64 = 1 << 20;
    const FIRST: usize = 1000;
    let [tcp, accel] = both("acc-tfo", |w| {
        // Data in the SYN with no cookie (0x4), and the server taking it without one on any listener
        // (0x200 | 0x400): the first bytes arrive before either socket is established.
        testkit::run(w.pod.pod.command("sysctl").args(["-qw", "net.ipv4.tcp_fastopen=1543"]));
        // The reader waits until everything has arrived, so any bytes that overtook others would be read
        // first.
        let server = local_reader(w, 9, Duration::from_millis(500));
        w.app(|| {
            use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrLike as _, socket};
            let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).expect("socket");
            let data: Vec<u8> = (0..TOTAL).map(|i| pattern(9, i)).collect();
            let to = SockaddrIn::from(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, LOCAL_PORT));
            // connect, with the first bytes in the SYN.
            // SAFETY: a valid socket, buffer and address of the lengths passed.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    data.as_ptr().cast(),
                    FIRST,
                    libc::MSG_FASTOPEN,
                    to.as_ptr().cast(),
                    to.len(),
                )
            };
            assert_eq!(
                n,
                FIRST as isize,
                "sendto MSG_FASTOPEN: {}",
                std::io::Error::last_os_error()
            );
            let mut s = TcpStream::from(fd);
            s.write_all(&data[FIRST..]).expect("write the rest");
        });
        server.join().expect("local server")
    });
    assert_eq!(tcp, clean_echo(TOTAL), "tcp");
    assert_eq!(accel.outcome(), tcp.outcome(), "accel");
}

#[test]
fn a_restarted_proxy_is_accelerated_again_and_nothing_is_lost() {
    const TOTAL: u64 = 1 << 20;
    let [tcp, accel] = both("acc-restart", |w| {
        let first = w.app(via_sidecar(11, TOTAL, 8192));
        // The proxy goes away: connections fail closed (refused), as without acceleration.
        w.sidecar = None;
        let down = w.app(|| TcpStream::connect_timeout(&sa(REMOTE_V4, ECHO_PORT), IO_TIMEOUT).map_err(|e| e.kind()));
        w.start_sidecar();
        let again: Vec<Echoed> = (0..4).map(|i| w.app(via_sidecar(12 + i, TOTAL, 8192))).collect();
        (first, down.err(), again, w.counters())
    });
    for (mode, (first, down, again, _)) in [("tcp", &tcp), ("accel", &accel)] {
        assert_eq!(
            first.outcome(),
            clean_echo(TOTAL).outcome(),
            "{mode}: before the restart"
        );
        assert_eq!(
            down,
            &Some(ErrorKind::ConnectionRefused),
            "{mode}: while the proxy is down"
        );
        for (i, r) in again.iter().enumerate() {
            assert_eq!(
                r.outcome(),
                clean_echo(TOTAL).outcome(),
                "{mode}: connection {i} after the restart"
            );
        }
    }
    // 5 connections through the sidecar, both ends each.
    assert!(accel.3["accelerated_sockets"] >= 10, "{:?}", accel.3);
    assert_eq!(accel.3["accel_fallbacks"], 0, "{:?}", accel.3);
}

#[test]
fn acceleration_is_refused_with_the_iptables_backend() {
    let ns = Netns::new("acc-ipt");
    let out = capture(&ns, &["--backend", "iptables", "--loopback-accel"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--loopback-accel"), "{err}");
    assert!(
        ns.iptables_rules().is_empty(),
        "rules were applied: {:?}",
        ns.iptables_rules()
    );
}

/// What one `recv(2)` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Bytes(usize),
    Eof,
    Errno(i32),
}

/// One `recv(2)` of up to `len` bytes with `flags` on `s`.
fn recv_once(s: &TcpStream, len: usize, flags: i32) -> Got {
    let mut buf = vec![0u8; len];
    // SAFETY: a valid socket and a buffer of the length passed.
    let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), len, flags) };
    match n {
        0 => Got::Eof,
        n if n > 0 => Got::Bytes(n as usize),
        _ => Got::Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
    }
}

/// Blocking reads of `s` (no timeout) until EOF or an error other than EAGAIN, at most 64: the first of
/// `first_len` bytes with `first_flags`, the others of 64 KiB without flags.
fn recv_all(s: &TcpStream, first_len: usize, first_flags: i32) -> Vec<Got> {
    let mut got = vec![recv_once(s, first_len, first_flags)];
    while got.len() < 64 && matches!(got.last(), Some(Got::Bytes(_) | Got::Errno(libc::EAGAIN))) {
        got.push(recv_once(s, 64 << 10, 0));
    }
    got
}

/// A connection between two sockets of the pod (both accelerated when the namespace asks for it, as the
/// app's and the sidecar's are): `peer` runs on the accepted end, `reader` on the connecting one, a
/// blocking socket without a read timeout; returns what `reader` returns.
fn local_pair<T: Send + 'static>(
    w: &World,
    peer: impl FnOnce(TcpStream) + Send + 'static,
    reader: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> T {
    let (ready_tx, ready_rx) = mpsc::channel();
    let server = w.pod.pod.spawn(Some(APP), move || {
        let listener = TcpListener::bind(sa(Ipv4Addr::LOCALHOST, LOCAL_PORT)).expect("peer: listen");
        ready_tx.send(()).expect("ready");
        let (conn, _) = listener.accept().expect("peer: accept");
        peer(conn);
    });
    ready_rx.recv_timeout(IO_TIMEOUT).expect("peer did not start");
    let out = w.app(move || {
        let s = TcpStream::connect_timeout(&sa(Ipv4Addr::LOCALHOST, LOCAL_PORT), IO_TIMEOUT).expect("connect");
        s.set_read_timeout(None).expect("no read timeout");
        reader(s)
    });
    server.join().expect("peer");
    out
}

/// Pauses between the peer's steps: long enough for the reader to be waiting in `recv` at each.
const PAUSE: Duration = Duration::from_millis(200);

/// The peer writes 8 pieces of 1000 bytes, each after a pause, then closes: a reply written in pieces.
fn in_pieces(mut s: TcpStream) {
    for _ in 0..8 {
        std::thread::sleep(PAUSE);
        s.write_all(&[7u8; 1000]).expect("peer: write");
    }
}

extern "C" fn do_nothing(_: libc::c_int) {}

/// What blocking reads without a timeout returned, in the shapes an application meets.
#[derive(Debug, PartialEq, Eq)]
struct BlockingReads {
    /// The reply written in pieces: (bytes, early EAGAINs, how it ended).
    pieces: (usize, usize, Got),
    /// The first read of the same reply with `recv(8000, MSG_WAITALL)`.
    waitall: Got,
    /// The first read of the same reply with SO_RCVLOWAT 8000.
    rcvlowat: Got,
    /// The peer closes (FIN) while the read waits.
    fin: Vec<Got>,
    /// The peer resets while the read waits.
    reset: Vec<Got>,
    /// The same with SO_RCVTIMEO 10 s, and whether the first read returned within a second.
    reset_rcvtimeo: (Vec<Got>, bool),
    /// A signal with an `SA_RESTART` handler arrives while the read waits; the reply comes later.
    signal: Vec<Got>,
    /// Another thread sends 16 MiB (more than TCP's socket buffers take) on the reader's socket while the
    /// read waits for the reply; and whether those sends waited for the peer to read.
    own_sends: (Vec<Got>, bool),
}

/// Blocking reads in the shapes an app uses them, pinned on the kernel this runs on (measured on 6.18; the
/// source of 5.10, 6.1, 6.6 and 2026's bpf-next reads the same, see the README). An accelerated socket
/// reads through `tcp_bpf_recvmsg` (net/ipv4/tcp_bpf.c), which copies what the peer's sends queued and,
/// with nothing there, waits once (`tcp_msg_wait_data`): woken without data it returns EAGAIN, and with
/// some data it returns that at once. So a reset or a signal makes a blocking read fail with EAGAIN, even
/// with SO_RCVTIMEO set (over TCP: ECONNRESET, and the interrupted read restarts); MSG_WAITALL and
/// SO_RCVLOWAT come back short; a reply in pieces, a FIN, and sends of the reader's own socket read as
/// over TCP. Those sends do not wait for the peer to read when accelerated (nothing wakes the reader when
/// buffer space frees), where TCP's do.
#[test]
fn blocking_reads() {
    // SAFETY: a handler that does nothing, for a signal nothing else in this process uses.
    unsafe {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        let action = SigAction::new(SigHandler::Handler(do_nothing), SaFlags::SA_RESTART, SigSet::empty());
        sigaction(Signal::SIGUSR1, &action).expect("sigaction");
    }
    let [tcp, accel] = both("acc-block", |w| BlockingReads {
        pieces: local_pair(w, in_pieces, |s| {
            let got = recv_all(&s, 64 << 10, 0);
            let bytes = got.iter().map(|g| if let Got::Bytes(n) = g { *n } else { 0 }).sum();
            let eagain = got.iter().filter(|g| **g == Got::Errno(libc::EAGAIN)).count();
            (bytes, eagain, *got.last().expect("a read"))
        }),
        // The rest of the reply is read too, so that the peer's writes succeed.
        waitall: local_pair(w, in_pieces, |s| recv_all(&s, 8000, libc::MSG_WAITALL)[0]),
        rcvlowat: local_pair(w, in_pieces, |s| {
            set_socket_option(&s, libc::SO_RCVLOWAT, 8000 as libc::c_int);
            recv_all(&s, 64 << 10, 0)[0]
        }),
        fin: local_pair(
            w,
            |s| {
                std::thread::sleep(PAUSE);
                drop(s);
            },
            |s| recv_all(&s, 64 << 10, 0),
        ),
        reset: local_pair(
            w,
            |s| {
                std::thread::sleep(PAUSE);
                set_socket_option(&s, libc::SO_LINGER, ABORT);
            },
            |s| recv_all(&s, 64 << 10, 0),
        ),
        reset_rcvtimeo: local_pair(
            w,
            |s| {
                std::thread::sleep(PAUSE);
                set_socket_option(&s, libc::SO_LINGER, ABORT);
            },
            |s| {
                s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
                let started = Instant::now();
                let first = recv_once(&s, 64 << 10, 0);
                let early = started.elapsed() < Duration::from_secs(1);
                let mut got = vec![first];
                if first == Got::Errno(libc::EAGAIN) {
                    got.extend(recv_all(&s, 64 << 10, 0));
                }
                (got, early)
            },
        ),
        signal: local_pair(
            w,
            |mut s| {
                std::thread::sleep(3 * PAUSE);
                s.write_all(&[7u8; 1000]).expect("peer: write");
            },
            |s| {
                // SAFETY: the calling thread's own id.
                let me = unsafe { libc::pthread_self() };
                let kicker = std::thread::spawn(move || {
                    std::thread::sleep(PAUSE);
                    // SAFETY: `me` is alive: it joins this thread before it returns.
                    unsafe { libc::pthread_kill(me, libc::SIGUSR1) }
                });
                let got = recv_all(&s, 64 << 10, 0);
                assert_eq!(kicker.join().expect("kicker"), 0, "pthread_kill");
                got
            },
        ),
        own_sends: local_pair(
            w,
            |mut s| {
                // Reads the 16 MiB after a pause, then replies. The pause is scaled with the harness's
                // time scale: on an emulated CPU (`cargo xtask vm`) queueing 16 MiB alone can take longer
                // than 200 ms, which would read as the sends having waited.
                std::thread::sleep(testkit::patient(PAUSE));
                let mut buf = vec![0u8; 64 << 10];
                let mut left = 16usize << 20;
                while left > 0 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
                s.write_all(&[7u8; 1000]).expect("peer: reply");
            },
            |s| {
                let mut writer = s.try_clone().expect("clone");
                let sender = std::thread::spawn(move || {
                    let started = Instant::now();
                    writer.write_all(&vec![1u8; 16 << 20]).expect("own sends");
                    started.elapsed() >= testkit::patient(PAUSE)
                });
                let got = recv_all(&s, 64 << 10, 0);
                (got, sender.join().expect("sender"))
            },
        ),
    });
    let eagain = Got::Errno(libc::EAGAIN);
    let reset = Got::Errno(libc::ECONNRESET);
    assert_eq!(
        tcp,
        BlockingReads {
            pieces: (8000, 0, Got::Eof),
            waitall: Got::Bytes(8000),
            rcvlowat: Got::Bytes(8000),
            fin: vec![Got::Eof],
            reset: vec![reset],
            reset_rcvtimeo: (vec![reset], true),
            signal: vec![Got::Bytes(1000), Got::Eof],
            own_sends: (vec![Got::Bytes(1000), Got::Eof], true),
        },
        "tcp"
    );
    // Each of the first reads returns as soon as any piece is there (how many depends on timing).
    for (what, got) in [("MSG_WAITALL", accel.waitall), ("SO_RCVLOWAT", accel.rcvlowat)] {
        assert!(
            matches!(got, Got::Bytes(n) if n < 8000),
            "accel: {what} read {got:?}, not short"
        );
    }
    assert_eq!(
        accel,
        BlockingReads {
            waitall: accel.waitall,
            rcvlowat: accel.rcvlowat,
            reset: vec![eagain, reset],
            reset_rcvtimeo: (vec![eagain, reset], true),
            signal: vec![eagain, Got::Bytes(1000), Got::Eof],
            own_sends: (vec![Got::Bytes(1000), Got::Eof], false),
            ..tcp
        },
        "accel"
    );
}
