//! The differential suite for DNS capture (see `testkit::diff`): UDP (connected and unconnected) and TCP DNS
//! from the pod under both backends. A captured query reaches the DNS proxy on 15053, and its answer must
//! appear to come from the server the application asked, as resolvers check.

use std::net::Ipv6Addr;

use testkit::{
    POD_V4, REMOTE_V4, REMOTE_V6, ResolvConf,
    diff::{APP, INJECTOR, PROXY, REMOTE2_V4, differential, mapped, sendto, tcp, udp},
    sa,
};

#[test]
fn dns_to_the_listed_server() {
    let resolv = ResolvConf::new("listed", &["192.0.2.2"]);
    let cases = [
        udp("app connected UDP to the server", APP, sa(REMOTE_V4, 53)),
        sendto("app sendto the server", APP, sa(REMOTE_V4, 53)),
        sendto("app sendto another server", APP, sa(REMOTE2_V4, 53)),
        sendto("app sendto the server, not port 53", APP, sa(REMOTE_V4, 9999)),
        sendto("app sendto the server mapped", APP, sa(mapped(REMOTE_V4.octets()), 53)),
        tcp("app TCP DNS to the server", APP, sa(REMOTE_V4, 53)),
        tcp("app TCP DNS to another server", APP, sa(REMOTE2_V4, 53)),
        sendto("proxy sendto the server", PROXY, sa(REMOTE_V4, 53)),
        tcp("proxy TCP DNS to the server", PROXY, sa(REMOTE_V4, 53)),
        tcp("app TCP DNS to its own pod IP", APP, sa(POD_V4, 53)),
    ];
    differential(
        &format!("{INJECTOR} --redirect-dns {}", resolv.flag()),
        &[],
        &cases,
        &[
            ("app connected UDP to the server", 15053),
            ("app sendto the server", 15053),
            ("app sendto another server", 53),
            ("app sendto the server, not port 53", 9999),
            ("app sendto the server mapped", 15053),
            ("app TCP DNS to the server", 15053),
            // Not a listed server: DNS capture passes it on, and -i * captures TCP.
            ("app TCP DNS to another server", 15001),
            ("proxy sendto the server", 53),
            ("proxy TCP DNS to the server", 53),
            // Local, but c2's DNS form lets port 53 go on down the chain: -i * captures it.
            ("app TCP DNS to its own pod IP", 15001),
        ],
    );
}

#[test]
fn dns_capture_all_and_exclusions() {
    let resolv = ResolvConf::new("all", &[]);
    let all = [
        sendto("any server", APP, sa(REMOTE2_V4, 53)),
        udp("any server connected", APP, sa(REMOTE2_V4, 53)),
        tcp("any server over TCP", APP, sa(REMOTE2_V4, 53)),
    ];
    differential(
        &format!("{INJECTOR} --redirect-dns --capture-all-dns {}", resolv.flag()),
        &[],
        &all,
        &[
            ("any server", 15053),
            ("any server connected", 15053),
            ("any server over TCP", 15053),
        ],
    );
    let excluded = [
        sendto("-o 53 wins", APP, sa(REMOTE_V4, 53)),
        tcp("-o 53 wins over TCP", APP, sa(REMOTE_V4, 53)),
    ];
    differential(
        &format!("{INJECTOR} -o 53 --redirect-dns --capture-all-dns {}", resolv.flag()),
        &[],
        &excluded,
        &[("-o 53 wins", 53), ("-o 53 wins over TCP", 53)],
    );
    let off = [sendto("no server, no capture-all", APP, sa(REMOTE_V4, 53))];
    differential(
        &format!("{INJECTOR} --redirect-dns {}", resolv.flag()),
        &[],
        &off,
        &[("no server, no capture-all", 53)],
    );
}

#[test]
fn dns_over_ipv6() {
    let resolv = ResolvConf::new("v6", &["2001:db8::2", "192.0.2.2"]);
    let cases = [
        sendto("app sendto the IPv6 server", APP, sa(REMOTE_V6, 53)),
        udp("app connected UDP to the IPv6 server", APP, sa(REMOTE_V6, 53)),
        tcp("app TCP DNS to the IPv6 server", APP, sa(REMOTE_V6, 53)),
        sendto("app sendto the IPv4 server", APP, sa(REMOTE_V4, 53)),
        sendto(
            "app sendto another IPv6 server",
            APP,
            sa(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3), 53),
        ),
    ];
    differential(
        &format!("{INJECTOR} --dual-stack --redirect-dns {}", resolv.flag()),
        &[],
        &cases,
        &[
            ("app sendto the IPv6 server", 15053),
            ("app connected UDP to the IPv6 server", 15053),
            ("app TCP DNS to the IPv6 server", 15053),
            ("app sendto the IPv4 server", 15053),
            ("app sendto another IPv6 server", 53),
        ],
    );
}
