//! The differential suite for outbound capture: every connection case runs under the iptables backend and
//! under the eBPF backend, each in fresh throwaway namespaces with the same flags, and must end the same way:
//! the same listener accepts it (15001, 15006, 15053, or the real destination) and reads the same original
//! destination, or it fails the same way.
//!
//! Cases are grouped by flag set; each group builds its namespaces anew for each backend.
//!
//! The original destination is compared where a proxy reads it: on the capture ports. On a connection that
//! was not redirected, iptables' conntrack still answers `SO_ORIGINAL_DST` (with the connection's own
//! destination) while the eBPF backend leaves the kernel's answer (none); applications do not ask, and
//! the README lists the difference.

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use tests::{
    BpfPins, Cgroup, Connect, Listeners, POD_V4, POD_V6, Pod, REMOTE_V4, REMOTE_V6, capture_with_env, connect_with, sa,
};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);
/// A process with the proxy's group but not its user.
const PROXY_GROUP: (u32, u32) = (1000, 1337);

/// Another address of the remote namespace, outside some CIDRs the cases use.
const REMOTE2_V4: [u8; 4] = [192, 0, 2, 3];
const REMOTE2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);

/// The sidecar's ports: where a redirected connection lands and the proxy reads its original destination.
const CAPTURE_PORTS: &[u16] = &[15001, 15006, 15053];
/// Ports the pod listens on: the sidecar's, and the app's own servers.
const POD_PORTS: &[u16] = &[15001, 15006, 15053, 8080, 15008];
/// Ports the remote namespace listens on.
const REMOTE_PORTS: &[u16] = &[80, 8080, 32000, 53];
/// UDP ports on both sides.
const UDP_PORTS: &[u16] = &[53, 15053, 9999];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Iptables,
    Ebpf,
}

/// Where a connection ended up.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// A TCP listener in `side` on `port` accepted it and read this original destination.
    Accepted {
        side: &'static str,
        port: u16,
        original_dst: Option<SocketAddr>,
    },
    /// A UDP socket in `side` on `port` got the datagram (and the probe got the echo).
    Datagram { side: &'static str, port: u16 },
    /// The connect failed.
    Failed(ErrorKind),
    /// The connect succeeded but no listener reported it.
    Unseen,
}

/// One connection: who makes it, where to, how.
struct Case {
    name: &'static str,
    ids: (u32, u32),
    dst: SocketAddr,
    how: Connect,
}

fn tcp(name: &'static str, ids: (u32, u32), dst: SocketAddr) -> Case {
    Case {
        name,
        ids,
        dst,
        how: Connect::default(),
    }
}

fn udp(name: &'static str, ids: (u32, u32), dst: SocketAddr) -> Case {
    Case {
        name,
        ids,
        dst,
        how: Connect {
            udp: true,
            ..Connect::default()
        },
    }
}

fn bound(name: &'static str, ids: (u32, u32), src: impl Into<IpAddr>, dst: SocketAddr) -> Case {
    Case {
        name,
        ids,
        dst,
        how: Connect {
            bind: Some(src.into()),
            ..Connect::default()
        },
    }
}

fn fastopen(name: &'static str, ids: (u32, u32), dst: SocketAddr) -> Case {
    Case {
        name,
        ids,
        dst,
        how: Connect {
            fastopen: true,
            ..Connect::default()
        },
    }
}

fn mapped(v4: [u8; 4]) -> IpAddr {
    IpAddr::V6(std::net::Ipv4Addr::from(v4).to_ipv6_mapped())
}

/// The namespaces, listeners and capture of one group under one backend. Fields drop in order: the
/// listeners stop before their cgroup goes, the pins (and so the programs) before the namespaces.
struct World {
    pod_listeners: Listeners,
    remote_listeners: Listeners,
    _pins: BpfPins,
    cgroup: Cgroup,
    pod: Pod,
}

fn world(backend: Backend, flags: &str, env: &[(&str, &str)]) -> World {
    let pod = Pod::new("diff");
    pod.remote.ip(&["addr", "add", "192.0.2.3/24", "dev", "eth0"]);
    pod.remote
        .ip(&["addr", "add", "2001:db8::3/64", "dev", "eth0", "nodad"]);
    let cgroup = Cgroup::new("diff");
    let pins = BpfPins::new("diff");
    let any = |p: u16| sa(Ipv6Addr::UNSPECIFIED, p);
    let pod_tcp: Vec<_> = POD_PORTS.iter().map(|&p| any(p)).collect();
    let udp: Vec<_> = UDP_PORTS.iter().map(|&p| any(p)).collect();
    let pod_listeners = Listeners::start_with_udp(&pod.pod, Some(&cgroup), None, &pod_tcp, &udp);
    let remote_tcp: Vec<_> = REMOTE_PORTS.iter().map(|&p| any(p)).collect();
    let remote_listeners = Listeners::start_with_udp(&pod.remote, None, None, &remote_tcp, &udp);

    let mut args: Vec<String> = match backend {
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
    args.extend(
        flags
            .split_whitespace()
            .map(|w| if w == "''" { String::new() } else { w.to_owned() }),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = capture_with_env(&pod.pod, &argv, env);
    assert!(
        out.status.success(),
        "{backend:?} capture {flags}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    World {
        pod,
        cgroup,
        _pins: pins,
        pod_listeners,
        remote_listeners,
    }
}

/// Waits briefly for whichever side reports the connection.
fn observe(w: &World, udp: bool) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        for (side, listeners) in [("pod", &w.pod_listeners), ("remote", &w.remote_listeners)] {
            if udp {
                if let Some(d) = listeners.drain_datagrams().into_iter().next() {
                    return Outcome::Datagram { side, port: d.listener };
                }
            } else if let Some(a) = listeners.drain().into_iter().next() {
                let asked = side == "pod" && CAPTURE_PORTS.contains(&a.listener);
                return Outcome::Accepted {
                    side,
                    port: a.listener,
                    original_dst: a.original_dst.filter(|_| asked),
                };
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Outcome::Unseen
}

fn run_case(w: &World, case: &Case) -> Outcome {
    let result = connect_with(&w.pod.pod, Some(&w.cgroup), case.ids, case.dst, case.how);
    let outcome = match result {
        Ok(_) => observe(w, case.how.udp),
        Err(e) => Outcome::Failed(e.kind()),
    };
    // Nothing from this case may linger into the next.
    std::thread::sleep(Duration::from_millis(5));
    w.pod_listeners.drain();
    w.remote_listeners.drain();
    w.pod_listeners.drain_datagrams();
    w.remote_listeners.drain_datagrams();
    outcome
}

/// Runs `cases` under both backends with `flags`; returns the mismatches, and asserts `expect` (case name →
/// listener port) for the cases that pin an absolute outcome, so the suite cannot pass by both backends
/// failing alike.
fn differential(flags: &str, env: &[(&str, &str)], cases: &[Case], expect: &[(&str, u16)]) {
    let outcomes: Vec<Vec<Outcome>> = [Backend::Iptables, Backend::Ebpf]
        .iter()
        .map(|&backend| {
            let w = world(backend, flags, env);
            cases.iter().map(|c| run_case(&w, c)).collect()
        })
        .collect();
    let mut mismatches = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let (ipt, bpf) = (&outcomes[0][i], &outcomes[1][i]);
        if ipt != bpf {
            mismatches.push(format!(
                "  {}: {} → {}\n    iptables: {ipt:?}\n    ebpf:     {bpf:?}",
                case.name,
                format_ids(case.ids),
                case.dst
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "flags {flags} {env:?}: {} of {} cases differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
    for (name, port) in expect {
        let i = cases
            .iter()
            .position(|c| c.name == *name)
            .unwrap_or_else(|| panic!("no case {name}"));
        let got = &outcomes[0][i];
        let listener = match got {
            Outcome::Accepted { port, .. } | Outcome::Datagram { port, .. } => Some(*port),
            _ => None,
        };
        assert_eq!(
            listener,
            Some(*port),
            "{name}: expected listener {port}, both backends gave {got:?}"
        );
    }
    eprintln!("{flags}: {} cases, identical under both backends", cases.len());
}

fn format_ids((uid, gid): (u32, u32)) -> String {
    format!("uid {uid} gid {gid}")
}

const INJECTOR: &str = "-p 15001 -z 15006 -u 1337 -m REDIRECT -i * -x '' -b * -d 15090,15021,15020";

#[test]
fn injector_defaults() {
    let cases = [
        tcp("app to remote", APP, sa(REMOTE_V4, 8080)),
        tcp("app to remote port 80", APP, sa(REMOTE_V4, 80)),
        tcp("app to second remote", APP, sa(REMOTE2_V4, 80)),
        tcp("app to localhost app", APP, sa([127, 0, 0, 1], 8080)),
        tcp("app to own pod IP", APP, sa(POD_V4, 8080)),
        tcp("app to 127.0.0.5", APP, sa([127, 0, 0, 5], 8080)),
        tcp("app to closed remote port", APP, sa(REMOTE_V4, 9)),
        tcp("proxy to remote", PROXY, sa(REMOTE_V4, 8080)),
        tcp("proxy to own pod IP", PROXY, sa(POD_V4, 8080)),
        tcp("proxy to localhost", PROXY, sa([127, 0, 0, 1], 8080)),
        tcp("proxy to 127.0.0.5 probe port", PROXY, sa([127, 0, 0, 5], 15002)),
        tcp("proxy to own tunnel port", PROXY, sa(POD_V4, 15008)),
        bound(
            "proxy passthrough from 127.0.0.6",
            PROXY,
            [127, 0, 0, 6],
            sa(POD_V4, 8080),
        ),
        bound(
            "app bound to 127.0.0.6 to pod IP",
            APP,
            [127, 0, 0, 6],
            sa(POD_V4, 8080),
        ),
        tcp("proxy-group process to remote", PROXY_GROUP, sa(REMOTE_V4, 8080)),
        tcp("proxy-group process to own pod IP", PROXY_GROUP, sa(POD_V4, 8080)),
        bound("app bound to pod IP first", APP, POD_V4, sa(REMOTE_V4, 8080)),
        fastopen("app TCP Fast Open", APP, sa(REMOTE_V4, 8080)),
        tcp("app to IPv4-mapped remote", APP, sa(mapped(REMOTE_V4.octets()), 8080)),
        tcp("app to IPv4-mapped localhost", APP, sa(mapped([127, 0, 0, 1]), 8080)),
        tcp(
            "proxy to IPv4-mapped remote",
            PROXY,
            sa(mapped(REMOTE_V4.octets()), 8080),
        ),
        udp("app connected UDP to remote", APP, sa(REMOTE_V4, 9999)),
        udp("app connected UDP to remote DNS", APP, sa(REMOTE_V4, 53)),
        tcp("app to remote IPv6 (IPv6 off)", APP, sa(REMOTE_V6, 8080)),
        tcp("root to remote", (0, 0), sa(REMOTE_V4, 8080)),
    ];
    differential(
        INJECTOR,
        &[],
        &cases,
        &[
            ("app to remote", 15001),
            ("proxy to remote", 8080),
            ("proxy to own pod IP", 15006),
            ("app to own pod IP", 8080),
        ],
    );
}

#[test]
fn dual_stack() {
    let cases = [
        tcp("app to remote IPv6", APP, sa(REMOTE_V6, 8080)),
        tcp("app to second remote IPv6", APP, sa(REMOTE2_V6, 80)),
        tcp("app to ::1", APP, sa(Ipv6Addr::LOCALHOST, 8080)),
        tcp("app to own pod IPv6", APP, sa(POD_V6, 8080)),
        tcp("proxy to remote IPv6", PROXY, sa(REMOTE_V6, 8080)),
        tcp("proxy to own pod IPv6", PROXY, sa(POD_V6, 8080)),
        tcp("proxy to ::1", PROXY, sa(Ipv6Addr::LOCALHOST, 8080)),
        bound(
            "proxy passthrough from ::6",
            PROXY,
            Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6),
            sa(POD_V6, 8080),
        ),
        bound("app bound to pod IPv6 first", APP, POD_V6, sa(REMOTE_V6, 8080)),
        fastopen("app TCP Fast Open IPv6", APP, sa(REMOTE_V6, 8080)),
        tcp("app to IPv4 remote", APP, sa(REMOTE_V4, 8080)),
        tcp("app to IPv4-mapped remote", APP, sa(mapped(REMOTE_V4.octets()), 8080)),
        udp("app connected UDP IPv6", APP, sa(REMOTE_V6, 9999)),
    ];
    differential(
        &format!("{INJECTOR} --dual-stack"),
        &[],
        &cases,
        &[("app to remote IPv6", 15001), ("proxy to own pod IPv6", 15006)],
    );
}

#[test]
fn port_and_cidr_exclusions() {
    // -o beats everything; -x applies even with -i *; -x before -i with an explicit -i.
    let o = [
        tcp("app to excluded port", APP, sa(REMOTE_V4, 8080)),
        tcp("app to other port", APP, sa(REMOTE_V4, 80)),
        tcp("proxy to own pod IP excluded port", PROXY, sa(POD_V4, 8080)),
        udp("app UDP to excluded port", APP, sa(REMOTE_V4, 53)),
        tcp("app to excluded port on localhost", APP, sa([127, 0, 0, 1], 8080)),
    ];
    differential(
        "-u 1337 -i * -o 8080,53",
        &[],
        &o,
        &[("app to excluded port", 8080), ("app to other port", 15001)],
    );
    let x = [
        tcp("app to excluded host", APP, sa(REMOTE_V4, 8080)),
        tcp("app to included host", APP, sa(REMOTE2_V4, 8080)),
        tcp("proxy to own pod IP in -x", PROXY, sa(POD_V4, 8080)),
        tcp("app to excluded host mapped", APP, sa(mapped(REMOTE_V4.octets()), 8080)),
    ];
    differential(
        "-u 1337 -i * -x 192.0.2.2/32,192.0.2.1/32",
        &[],
        &x,
        &[("app to excluded host", 8080), ("app to included host", 15001)],
    );
    let xi = [
        tcp("in -i and -x", APP, sa(REMOTE_V4, 80)),
        tcp("in -i only", APP, sa(REMOTE2_V4, 80)),
        tcp("outside -i", APP, sa([192, 0, 2, 9], 80)),
    ];
    differential(
        "-u 1337 -i 192.0.2.0/24 -x 192.0.2.2/32",
        &[],
        &xi,
        &[("in -i only", 15001), ("in -i and -x", 80)],
    );
    let wide_x = [
        tcp("narrow -i inside wide -x", APP, sa(REMOTE_V4, 80)),
        tcp("wide -x only", APP, sa(REMOTE2_V4, 80)),
    ];
    differential(
        "-u 1337 -i 192.0.2.2/32 -x 192.0.2.0/24",
        &[],
        &wide_x,
        &[("narrow -i inside wide -x", 80)],
    );
}

#[test]
fn outbound_ports_without_cidrs() {
    let cases = [
        tcp("app to -q port", APP, sa(REMOTE_V4, 32000)),
        tcp("app to other port", APP, sa(REMOTE_V4, 8080)),
        tcp("app to -q port in -x", APP, sa(REMOTE2_V4, 32000)),
        tcp("proxy to -q port", PROXY, sa(REMOTE_V4, 32000)),
        tcp("proxy to own pod IP", PROXY, sa(POD_V4, 8080)),
        tcp("app to -q port IPv4-mapped", APP, sa(mapped(REMOTE_V4.octets()), 32000)),
    ];
    differential(
        "-u 1337 -q 32000 -x 192.0.2.3/32",
        &[],
        &cases,
        &[
            ("app to -q port", 15001),
            ("app to other port", 8080),
            ("proxy to own pod IP", 15006),
        ],
    );
}

#[test]
fn several_proxy_uids_and_gids() {
    let cases = [
        tcp("uid 3 to own pod IP", (3, 3), sa(POD_V4, 8080)),
        tcp("uid 4 to own pod IP", (4, 4), sa(POD_V4, 8080)),
        tcp("uid 4 to remote", (4, 4), sa(REMOTE_V4, 8080)),
        tcp("gid 2 to remote", (9, 2), sa(REMOTE_V4, 8080)),
        tcp("gid 1 to own pod IP", (9, 1), sa(POD_V4, 8080)),
        tcp("other to remote", (9, 9), sa(REMOTE_V4, 8080)),
        tcp("other to localhost", (9, 9), sa([127, 0, 0, 1], 8080)),
        tcp("uid 3 to 127.0.0.5", (3, 3), sa([127, 0, 0, 5], 8080)),
    ];
    differential(
        "-u 3,4 -g 1,2 -i *",
        &[],
        &cases,
        &[
            ("uid 3 to own pod IP", 15006),
            ("uid 4 to own pod IP", 8080),
            ("other to remote", 15001),
        ],
    );
}

#[test]
fn owner_groups() {
    let include = [
        tcp("listed group", (1000, 100), sa(REMOTE_V4, 8080)),
        tcp("unlisted group", (1000, 300), sa(REMOTE_V4, 8080)),
        tcp("unlisted group to own pod IP", (1000, 300), sa(POD_V4, 8080)),
    ];
    differential(
        "-u 1337 -i *",
        &[("ISTIO_OUTBOUND_OWNER_GROUPS", "100,200")],
        &include,
        &[("listed group", 15001), ("unlisted group", 8080)],
    );
    let exclude = [
        tcp("excluded group", (1000, 300), sa(REMOTE_V4, 8080)),
        tcp("other group", (1000, 100), sa(REMOTE_V4, 8080)),
    ];
    differential(
        "-u 1337 -i *",
        &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "300")],
        &exclude,
        &[("excluded group", 8080), ("other group", 15001)],
    );
}

#[test]
fn loopback_variants() {
    let include_loopback = [
        tcp("app to loopback in -i", APP, sa([127, 1, 2, 3], 8080)),
        tcp("app to localhost", APP, sa([127, 0, 0, 1], 8080)),
        tcp("app to own pod IP", APP, sa(POD_V4, 8080)),
        tcp("proxy to own pod IP", PROXY, sa(POD_V4, 8080)),
    ];
    differential(
        "-u 1337 -i 127.1.2.3/32",
        &[],
        &include_loopback,
        &[("app to loopback in -i", 15001), ("app to localhost", 8080)],
    );
    let wide = [
        tcp("proxy to 127.0.0.5", PROXY, sa([127, 0, 0, 5], 8080)),
        tcp("proxy to own pod IP", PROXY, sa(POD_V4, 8080)),
        tcp("app to 127.0.0.5", APP, sa([127, 0, 0, 5], 8080)),
    ];
    differential(
        "-u 1337 -i *",
        &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")],
        &wide,
        &[("proxy to 127.0.0.5", 8080), ("proxy to own pod IP", 15006)],
    );
}

#[test]
fn excluded_interface_subnet() {
    // -c eth0: iptables skips everything routed out of eth0; the connect hook, which has no route, skips
    // eth0's subnet. For destinations on that subnet (the only ones reachable here) they agree.
    let cases = [
        tcp("app to remote on eth0", APP, sa(REMOTE_V4, 8080)),
        tcp("app to localhost", APP, sa([127, 0, 0, 1], 8080)),
        tcp("proxy to own pod IP", PROXY, sa(POD_V4, 8080)),
    ];
    differential("-u 1337 -i * -c eth0", &[], &cases, &[("app to remote on eth0", 8080)]);
}

#[test]
fn dns_over_tcp_with_capture_all() {
    let cases = [
        tcp("app TCP DNS", APP, sa(REMOTE_V4, 53)),
        tcp("proxy TCP DNS", PROXY, sa(REMOTE_V4, 53)),
        tcp("app TCP to another port", APP, sa(REMOTE_V4, 8080)),
        tcp("app TCP DNS to own pod IP", APP, sa(POD_V4, 53)),
    ];
    differential(
        "-u 1337 -i * --redirect-dns --capture-all-dns",
        &[],
        &cases,
        &[
            ("app TCP DNS", 15053),
            ("proxy TCP DNS", 53),
            ("app TCP to another port", 15001),
        ],
    );
}
