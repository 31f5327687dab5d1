//! The differential machinery: the same connection cases under the iptables backend and under the eBPF
//! backend, each in fresh throwaway namespaces with the same flags; outcomes must be equal.
//!
//! The peer address of every accepted TCP connection is compared too: a proxy's access logs, telemetry and
//! source-based policy read it. The original destination is compared where a proxy reads it: on the capture
//! ports. On a connection that
//! was not redirected, iptables' conntrack answers `SO_ORIGINAL_DST` with the connection's own destination
//! and the eBPF backend with the socket's local address (the same thing on an accepted socket, but not on the
//! outbound capture port at loopback, where it answers nothing); the README lists the difference.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use crate::{BpfPins, Cgroup, Connect, Listeners, Pod, REMOTE_V4, REMOTE_V6, capture_with_env, exchange, sa};

pub const APP: (u32, u32) = (1000, 1000);
pub const PROXY: (u32, u32) = (1337, 1337);
/// A process with the proxy's group but not its user.
pub const PROXY_GROUP: (u32, u32) = (1000, 1337);

/// Another address of the remote namespace, outside some CIDRs the cases use.
pub const REMOTE2_V4: [u8; 4] = [192, 0, 2, 3];
pub const REMOTE2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);

/// The sidecar's ports: where a redirected connection lands and the proxy reads its original destination.
const CAPTURE_PORTS: &[u16] = &[15001, 15006, 15053];
/// Ports the pod listens on: the sidecar's, and the app's own servers.
const POD_PORTS: &[u16] = &[15001, 15006, 15053, 8080, 15008, 15090];
/// Ports the remote namespace listens on.
const REMOTE_PORTS: &[u16] = &[80, 8080, 32000, 53];
/// UDP ports on both sides.
const UDP_PORTS: &[u16] = &[53, 9999];
/// The DNS proxy listens on localhost only, as istio-agent does: a wildcard UDP socket would answer from
/// the pod IP, which conntrack does not un-NAT (`docs/istio-rules.md#observed-on-real-iptables`).
const DNS_PROXY: [SocketAddr; 2] = [
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15053),
    SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 15053),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Iptables,
    Ebpf,
}

/// Where a connection ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A TCP listener in `side` on `port` accepted it from `peer` and read this original destination.
    Accepted {
        side: &'static str,
        port: u16,
        original_dst: Option<SocketAddr>,
        /// The connection's source as the listener saw it: for a redirected connection, the address
        /// REDIRECT leaves (the one routing chose for the original destination), not loopback.
        peer: IpAddr,
    },
    /// A UDP socket in `side` on `port` got the datagram, and the probe got the echo from `reply_from`.
    Datagram {
        side: &'static str,
        port: u16,
        reply_from: Option<SocketAddr>,
    },
    /// The connect failed.
    Failed(ErrorKind),
    /// The connect succeeded but no listener reported it.
    Unseen,
}

/// One connection: who makes it, where to, how.
pub struct Case {
    name: &'static str,
    ids: (u32, u32),
    dst: SocketAddr,
    how: Connect,
    /// Made from the remote namespace (an inbound connection) rather than from the pod.
    from_remote: bool,
}

impl Case {
    /// The case's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// A TCP connection from the remote namespace into the pod (inbound).
pub fn inbound(name: &'static str, dst: SocketAddr) -> Case {
    Case {
        from_remote: true,
        ..tcp(name, (0, 0), dst)
    }
}

/// A connection from the pod made the way `how` says.
fn from_pod(name: &'static str, ids: (u32, u32), dst: SocketAddr, how: Connect) -> Case {
    Case {
        how,
        ..tcp(name, ids, dst)
    }
}

/// A TCP connection made on a socket whose first connect (to `first`) failed.
pub fn after_failure(name: &'static str, ids: (u32, u32), first: SocketAddr, dst: SocketAddr) -> Case {
    let how = Connect {
        first: Some(first),
        ..Connect::default()
    };
    from_pod(name, ids, dst, how)
}

/// A TCP connection from a socket bound with SO_REUSEPORT to a fixed local port.
pub fn reuseport(name: &'static str, ids: (u32, u32), port: u16, dst: SocketAddr) -> Case {
    let how = Connect {
        reuseport: Some(port),
        ..Connect::default()
    };
    from_pod(name, ids, dst, how)
}

/// An unconnected UDP exchange (`sendto`, `recvfrom`) from the pod.
pub fn sendto(name: &'static str, ids: (u32, u32), dst: SocketAddr) -> Case {
    let how = Connect {
        udp: true,
        sendto: true,
        ..Connect::default()
    };
    from_pod(name, ids, dst, how)
}

/// A UDP exchange from the remote namespace into the pod.
pub fn inbound_udp(name: &'static str, dst: SocketAddr) -> Case {
    Case {
        from_remote: true,
        ..udp(name, (0, 0), dst)
    }
}

/// A plain TCP connection from the pod.
pub fn tcp(name: &'static str, ids: (u32, u32), dst: SocketAddr) -> Case {
    Case {
        from_remote: false,
        name,
        ids,
        dst,
        how: Connect::default(),
    }
}

/// A connected UDP exchange from the pod.
pub fn udp(name: &'static str, ids: (u32, u32), dst: SocketAddr) -> Case {
    let how = Connect {
        udp: true,
        ..Connect::default()
    };
    from_pod(name, ids, dst, how)
}

/// A TCP connection from a socket bound to `src` first.
pub fn bound(name: &'static str, ids: (u32, u32), src: impl Into<IpAddr>, dst: SocketAddr) -> Case {
    let how = Connect {
        bind: Some(src.into()),
        ..Connect::default()
    };
    from_pod(name, ids, dst, how)
}

/// TCP Fast Open (sendto with MSG_FASTOPEN) from the pod.
pub fn fastopen(name: &'static str, ids: (u32, u32), dst: SocketAddr) -> Case {
    let how = Connect {
        fastopen: true,
        ..Connect::default()
    };
    from_pod(name, ids, dst, how)
}

/// `v4` as an IPv4-mapped IPv6 address.
pub fn mapped(v4: [u8; 4]) -> IpAddr {
    IpAddr::V6(std::net::Ipv4Addr::from(v4).to_ipv6_mapped())
}

/// The namespaces, listeners and capture of one group under one backend. Fields drop in order: the
/// listeners stop before their cgroup goes, the pins (and so the programs) before the namespaces.
struct World {
    pod_listeners: Listeners,
    /// The DNS proxy's UDP sockets, as the proxy user: istio's conntrack zones expect its replies from 1337.
    dns_proxy: Listeners,
    remote_listeners: Listeners,
    _pins: BpfPins,
    cgroup: Cgroup,
    pod: Pod,
}

/// A pod before its capture is applied, for a test to set the scene: addresses, routes, earlier applies of
/// capture under the same backend.
pub struct Scene<'a> {
    /// The pod and its remote.
    pub pod: &'a Pod,
    /// `--backend …` and, for the eBPF backend, this world's cgroup and pin directory.
    backend: &'a [String],
    env: &'a [(&'a str, &'a str)],
}

impl Scene<'_> {
    /// Runs `capture [SUBCOMMAND] <backend> <flags>` in the pod; asserts that it exits 0.
    pub fn capture(&self, subcommand: Option<&str>, flags: &str) {
        let args: Vec<String> = subcommand
            .map(str::to_owned)
            .into_iter()
            .chain(self.backend.iter().cloned())
            .chain(flag_words(flags))
            .collect();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = capture_with_env(&self.pod.pod, &argv, self.env);
        assert!(
            out.status.success(),
            "capture {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// [`crate::capture::INJECTOR_DEFAULT_FLAGS`] as a flags line, the form the differential suites take (a test
/// below keeps the two alike).
pub const INJECTOR: &str = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x '' -b * -d 15090,15021,15020";

/// A flags line as words; `''` stands for an empty value.
fn flag_words(flags: &str) -> impl Iterator<Item = String> + '_ {
    flags
        .split_whitespace()
        .map(|w| if w == "''" { String::new() } else { w.to_owned() })
}

fn world(backend: Backend, prepare: &dyn Fn(&Scene), flags: &str, env: &[(&str, &str)], pod_ports: &[u16]) -> World {
    let pod = Pod::new("diff");
    pod.remote.ip(&["addr", "add", "192.0.2.3/24", "dev", "eth0"]);
    pod.remote
        .ip(&["addr", "add", "2001:db8::3/64", "dev", "eth0", "nodad"]);
    let cgroup = Cgroup::new("diff");
    let pins = BpfPins::new("diff");
    let backend_args: Vec<String> = match backend {
        Backend::Iptables => vec!["--backend".into(), "iptables".into()],
        Backend::Ebpf => vec![
            "--backend".into(),
            "ebpf".into(),
            "--cgroup".into(),
            cgroup.path().display().to_string(),
            "--pin-dir".into(),
            pins.path().display().to_string(),
        ],
    };
    let scene = Scene {
        pod: &pod,
        backend: &backend_args,
        env,
    };
    prepare(&scene);
    scene.capture(None, flags);
    // Listeners start after capture, as the proxy starts after istio-init: the eBPF backend learns the
    // proxy's listening sockets when they start listening.
    let any = |p: u16| sa(Ipv6Addr::UNSPECIFIED, p);
    let pod_tcp: Vec<_> = pod_ports.iter().map(|&p| any(p)).collect();
    let udp: Vec<_> = UDP_PORTS.iter().map(|&p| any(p)).collect();
    // A TPROXY-mode proxy's listeners are transparent (istio's Envoy sets it); iptables' TPROXY needs it.
    let pod_listeners = if flags.contains("TPROXY") {
        Listeners::start_transparent(&pod.pod, Some(&cgroup), &pod_tcp, &udp)
    } else {
        Listeners::start_with_udp(&pod.pod, Some(&cgroup), None, &pod_tcp, &udp)
    };
    let dns_proxy = Listeners::start_with_udp(&pod.pod, Some(&cgroup), Some(PROXY), &[], &DNS_PROXY);
    let remote_tcp: Vec<_> = REMOTE_PORTS.iter().map(|&p| any(p)).collect();
    // The remote's UDP echo binds each of its addresses: a wildcard socket answers from the address the
    // kernel picks for the reply (with two IPv6 addresses, the newer one), which a connected client drops.
    let remote_addrs: [IpAddr; 4] = [REMOTE_V4.into(), REMOTE2_V4.into(), REMOTE_V6.into(), REMOTE2_V6.into()];
    let remote_udp: Vec<_> = UDP_PORTS
        .iter()
        .flat_map(|&p| remote_addrs.iter().map(move |&a| sa(a, p)))
        .collect();
    let remote_listeners = Listeners::start_with_udp(&pod.remote, None, None, &remote_tcp, &remote_udp);

    World {
        pod,
        cgroup,
        _pins: pins,
        pod_listeners,
        dns_proxy,
        remote_listeners,
    }
}

/// How long a case's connection may take to be reported, before it counts as [`Outcome::Unseen`].
const OBSERVE_WAIT: Duration = Duration::from_secs(2);

/// Waits until a listener on either side reports the connection made from local port `client_port` (at
/// most [`OBSERVE_WAIT`]). Reports of other connections (a late one of an earlier case) are dropped, never
/// taken for this one: the port is the client's own, which neither iptables' REDIRECT nor the eBPF backend
/// rewrites.
fn observe(w: &World, udp: Option<Option<SocketAddr>>, client_port: u16) -> Outcome {
    let deadline = Instant::now() + OBSERVE_WAIT;
    while Instant::now() < deadline {
        for (side, listeners) in [
            ("pod", &w.pod_listeners),
            ("pod", &w.dns_proxy),
            ("remote", &w.remote_listeners),
        ] {
            if let Some(reply_from) = udp {
                let mut ours = listeners
                    .drain_datagrams()
                    .into_iter()
                    .filter(|d| d.peer.port() == client_port);
                if let Some(d) = ours.next() {
                    return Outcome::Datagram {
                        side,
                        port: d.listener,
                        reply_from,
                    };
                }
            } else if let Some(a) = listeners.drain().into_iter().find(|a| a.peer.port() == client_port) {
                let asked = side == "pod" && CAPTURE_PORTS.contains(&a.listener);
                return Outcome::Accepted {
                    side,
                    port: a.listener,
                    original_dst: a.original_dst.filter(|_| asked),
                    peer: a.peer.ip(),
                };
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Outcome::Unseen
}

fn run_case(w: &World, case: &Case) -> Outcome {
    let result = if case.from_remote {
        exchange(&w.pod.remote, None, case.ids, case.dst, case.how)
    } else {
        exchange(&w.pod.pod, Some(&w.cgroup), case.ids, case.dst, case.how)
    };
    match result {
        Ok(e) => observe(w, case.how.udp.then_some(e.reply_from), e.local.port()),
        Err(e) => Outcome::Failed(e.kind()),
    }
}

/// How a case must end, under both backends: every case a suite pins is checked against it, so a suite
/// cannot pass by both backends going wrong alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Accepted by the TCP listener (or, for UDP, received by the socket) on this port, in either
    /// namespace.
    Port(u16),
    /// The connect (or send) failed with this error: refused, unreachable, timed out.
    Failed(ErrorKind),
    /// Connected, but no listener reported it within the wait.
    Unseen,
    /// A difference between the backends that is kept on purpose (the README's differences table says
    /// why): each backend's own outcome.
    Differs {
        /// Under iptables.
        iptables: Pin,
        /// Under the eBPF backend.
        ebpf: Pin,
    },
}

/// One backend's outcome in [`Expect::Differs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// As [`Expect::Port`].
    Port(u16),
    /// As [`Expect::Failed`].
    Failed(ErrorKind),
}

impl From<u16> for Expect {
    fn from(port: u16) -> Self {
        Expect::Port(port)
    }
}

impl From<Pin> for Expect {
    fn from(pin: Pin) -> Self {
        match pin {
            Pin::Port(port) => Expect::Port(port),
            Pin::Failed(kind) => Expect::Failed(kind),
        }
    }
}

impl Expect {
    /// What `backend` must give.
    fn under(self, backend: Backend) -> Expect {
        match (self, backend) {
            (Expect::Differs { iptables, .. }, Backend::Iptables) => iptables.into(),
            (Expect::Differs { ebpf, .. }, Backend::Ebpf) => ebpf.into(),
            (same, _) => same,
        }
    }

    fn matches(self, outcome: &Outcome) -> bool {
        match (self, outcome) {
            (Expect::Port(want), Outcome::Accepted { port, .. } | Outcome::Datagram { port, .. }) => want == *port,
            (Expect::Failed(want), Outcome::Failed(kind)) => want == *kind,
            (Expect::Unseen, Outcome::Unseen) => true,
            _ => false,
        }
    }
}

/// Runs `cases` under both backends with `flags`; fails on any mismatch and on any outcome other than
/// `expect` pins for the case (case name → outcome, a bare port meaning [`Expect::Port`]). Every case must
/// be pinned, so the suite cannot pass by both backends failing alike.
pub fn differential<E: Copy + Into<Expect>>(
    flags: &str,
    env: &[(&str, &str)],
    cases: &[Case],
    expect: &[(&str, E)],
) -> Outcomes {
    differential_in(&|_| {}, flags, env, POD_PORTS, cases, expect)
}

/// As [`differential`], with only `pod_ports` listening in the pod (to test what happens when the proxy
/// is not listening).
pub fn differential_with<E: Copy + Into<Expect>>(
    flags: &str,
    env: &[(&str, &str)],
    pod_ports: &[u16],
    cases: &[Case],
    expect: &[(&str, E)],
) -> Outcomes {
    differential_in(&|_| {}, flags, env, pod_ports, cases, expect)
}

/// As [`differential`], after `prepare` has set the pod's scene before capture is applied (an address
/// removed, an earlier apply, say).
pub fn differential_after(prepare: &dyn Fn(&Scene), flags: &str, cases: &[Case], every: &[(&str, Expect)]) -> Outcomes {
    differential_in(prepare, flags, &[], POD_PORTS, cases, every)
}

fn differential_in<E: Copy + Into<Expect>>(
    prepare: &dyn Fn(&Scene),
    flags: &str,
    env: &[(&str, &str)],
    pod_ports: &[u16],
    cases: &[Case],
    expect: &[(&str, E)],
) -> Outcomes {
    // Every case pinned: a suite must not pass by both backends going wrong alike.
    for case in cases {
        assert!(
            expect.iter().any(|(name, _)| *name == case.name),
            "{flags}: case {:?} has no pinned outcome",
            case.name
        );
    }
    let backends = [Backend::Iptables, Backend::Ebpf];
    let outcomes: Vec<Vec<Outcome>> = backends
        .iter()
        .map(|&backend| {
            let w = world(backend, prepare, flags, env, pod_ports);
            cases.iter().map(|c| run_case(&w, c)).collect()
        })
        .collect();
    let pin = |name: &str| expect.iter().find(|(n, _)| *n == name).map(|(_, e)| (*e).into());
    let mut wrong = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (ipt, bpf) = (&outcomes[0][i], &outcomes[1][i]);
        let differs_on_purpose = matches!(pin(case.name), Some(Expect::Differs { .. }));
        if ipt != bpf && !differs_on_purpose {
            wrong.push(format!(
                "  {}: {} → {}\n    iptables: {ipt:?}\n    ebpf:     {bpf:?}",
                case.name,
                format_ids(case.ids),
                case.dst
            ));
        }
        if let Some(expected) = pin(case.name) {
            for (b, backend) in backends.iter().enumerate() {
                let want = expected.under(*backend);
                let got = &outcomes[b][i];
                if !want.matches(got) {
                    wrong.push(format!(
                        "  {}: {} → {}\n    {backend:?} gave {got:?}, expected {want:?}",
                        case.name,
                        format_ids(case.ids),
                        case.dst
                    ));
                }
            }
        }
    }
    for (name, _) in expect {
        assert!(cases.iter().any(|c| c.name == *name), "no case {name}");
    }
    assert!(
        wrong.is_empty(),
        "flags {flags} {env:?}: {} findings in {} cases:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
    eprintln!(
        "{flags}: {} cases, as pinned and identical under both backends",
        cases.len()
    );
    let [iptables, ebpf]: [Vec<Outcome>; 2] = outcomes.try_into().expect("two backends");
    Outcomes { iptables, ebpf }
}

/// Each backend's outcomes of a differential run, in the order of its cases.
pub struct Outcomes {
    /// Under the iptables backend.
    pub iptables: Vec<Outcome>,
    /// Under the eBPF backend.
    pub ebpf: Vec<Outcome>,
}

fn format_ids((uid, gid): (u32, u32)) -> String {
    format!("uid {uid} gid {gid}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_injector_line_is_the_injector_flags() {
        let words: Vec<String> = flag_words(INJECTOR).collect();
        assert_eq!(words, crate::capture::INJECTOR_DEFAULT_FLAGS);
    }
}
