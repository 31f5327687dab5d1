//! The proxy's peer for a redirected connection: the pod's own address, as under iptables' REDIRECT, which
//! rewrites only the destination after routing chose the source for the original one. The eBPF backend
//! binds the app's socket to the pod's address before it rewrites the destination to loopback (a socket
//! connected to loopback would otherwise come from loopback). Envoy's access logs, `source.ip` and
//! source-based policy read this address.
//!
//! Every differential suite compares the peers of the two backends; this one pins them, for each family
//! and way of connecting, under both backends, with the original destination the proxy reads beside it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use testkit::{
    POD_V4, POD_V6, REMOTE_V4, REMOTE_V6,
    diff::{APP, Expect, INJECTOR, Outcome, PROXY, Pin, bound, differential, fastopen, mapped, tcp},
    sa,
};

/// One case's pins: where it lands, the original destination read there (on a capture port), and the peer
/// under each backend.
struct Peer {
    name: &'static str,
    port: u16,
    original_dst: Option<SocketAddr>,
    iptables: IpAddr,
    ebpf: IpAddr,
}

const fn same(name: &'static str, port: u16, original_dst: Option<SocketAddr>, peer: IpAddr) -> Peer {
    Peer {
        name,
        port,
        original_dst,
        iptables: peer,
        ebpf: peer,
    }
}

#[test]
fn the_proxy_sees_the_pods_address_as_its_peer() {
    let (pod4, pod6) = (IpAddr::V4(POD_V4), IpAddr::V6(POD_V6));
    let remote4 = sa(REMOTE_V4, 8080);
    let remote6 = sa(REMOTE_V6, 8080);
    let cases = [
        tcp("IPv4", APP, remote4),
        tcp("IPv6", APP, remote6),
        tcp(
            "IPv4-mapped on an IPv6 socket",
            APP,
            sa(mapped(REMOTE_V4.octets()), 8080),
        ),
        fastopen("TCP Fast Open", APP, remote4),
        fastopen("TCP Fast Open over IPv6", APP, remote6),
        bound("bound to the pod IP first", APP, POD_V4, remote4),
        bound("bound to the pod IPv6 first", APP, POD_V6, remote6),
        bound("bound to the wildcard first", APP, [0, 0, 0, 0], remote4),
        tcp("the proxy to its own pod IP", PROXY, sa(POD_V4, 8080)),
        tcp("the proxy to its own pod IPv6", PROXY, sa(POD_V6, 8080)),
        tcp("the proxy to the remote (not redirected)", PROXY, remote4),
    ];
    let pins = [
        same("IPv4", 15001, Some(remote4), pod4),
        same("IPv6", 15001, Some(remote6), pod6),
        same(
            "IPv4-mapped on an IPv6 socket",
            15001,
            Some(sa(mapped(REMOTE_V4.octets()), 8080)),
            pod4,
        ),
        same("TCP Fast Open", 15001, Some(remote4), pod4),
        same("TCP Fast Open over IPv6", 15001, Some(remote6), pod6),
        same("bound to the pod IP first", 15001, Some(remote4), pod4),
        same("bound to the pod IPv6 first", 15001, Some(remote6), pod6),
        // Bound with a port already, the socket cannot be bound to the pod's address: it comes from
        // loopback (the README's differences table).
        Peer {
            name: "bound to the wildcard first",
            port: 15001,
            original_dst: Some(remote4),
            iptables: pod4,
            ebpf: IpAddr::V4(Ipv4Addr::LOCALHOST),
        },
        same("the proxy to its own pod IP", 15006, Some(sa(POD_V4, 8080)), pod4),
        same("the proxy to its own pod IPv6", 15006, Some(sa(POD_V6, 8080)), pod6),
        same("the proxy to the remote (not redirected)", 8080, None, pod4),
    ];
    let expect: Vec<(&str, Expect)> = pins
        .iter()
        .map(|p| match p.iptables == p.ebpf {
            true => (p.name, Expect::Port(p.port)),
            false => (
                p.name,
                Expect::Differs {
                    iptables: Pin::Port(p.port),
                    ebpf: Pin::Port(p.port),
                },
            ),
        })
        .collect();
    let outcomes = differential(&format!("{INJECTOR} --dual-stack"), &[], &cases, &expect);
    let mut wrong = Vec::new();
    for (i, pin) in pins.iter().enumerate() {
        assert_eq!(cases[i].name(), pin.name, "cases and pins in the same order");
        for (backend, outcome, want) in [
            ("iptables", &outcomes.iptables[i], pin.iptables),
            ("ebpf", &outcomes.ebpf[i], pin.ebpf),
        ] {
            let Outcome::Accepted { peer, original_dst, .. } = outcome else {
                wrong.push(format!("{}: {backend}: {outcome:?}", pin.name));
                continue;
            };
            // A dual-stack listener reports an IPv4 peer IPv4-mapped.
            if peer.to_canonical() != want || original_dst.map(canonical) != pin.original_dst.map(canonical) {
                wrong.push(format!(
                    "{}: {backend}: peer {peer}, original destination {original_dst:?}; expected {want}, {:?}",
                    pin.name, pin.original_dst
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
