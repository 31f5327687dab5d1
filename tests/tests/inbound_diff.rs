//! The differential suite for inbound capture (see `testkit::diff`): connections from the remote namespace
//! into the pod, and the pod calling itself, under both backends; outcomes must be equal.

use std::io::ErrorKind;

use testkit::{
    POD_V4, POD_V6,
    diff::{
        APP, Expect,
        Expect::{Failed, Port},
        INJECTOR, PROXY, differential, differential_with, inbound, inbound_udp, tcp,
    },
    sa,
};

#[test]
fn injector_defaults_inbound() {
    let cases = [
        inbound("remote to app port", sa(POD_V4, 8080)),
        inbound("remote to closed port", sa(POD_V4, 9999)),
        inbound("remote to ssh port", sa(POD_V4, 22)),
        inbound("remote to tunnel port", sa(POD_V4, 15008)),
        inbound("remote to excluded stats port", sa(POD_V4, 15090)),
        inbound("remote to excluded health port (closed)", sa(POD_V4, 15021)),
        inbound("remote to the inbound port itself", sa(POD_V4, 15006)),
        inbound("remote to the outbound port", sa(POD_V4, 15001)),
        inbound_udp("remote UDP to the pod", sa(POD_V4, 9999)),
        inbound("remote to pod IPv6 (IPv6 off)", sa(POD_V6, 8080)),
        tcp("app to its own pod IP", APP, sa(POD_V4, 8080)),
        tcp("proxy to its own pod IP", PROXY, sa(POD_V4, 8080)),
        tcp("app to its own pod IP tunnel port", APP, sa(POD_V4, 15008)),
    ];
    differential(
        INJECTOR,
        &[],
        &cases,
        &[
            ("remote to app port", Port(15006)),
            ("remote to closed port", Port(15006)),
            ("remote to ssh port", Port(15006)),
            ("remote to tunnel port", Port(15008)),
            ("remote to excluded stats port", Port(15090)),
            (
                "remote to excluded health port (closed)",
                Failed(ErrorKind::ConnectionRefused),
            ),
            ("remote to the inbound port itself", Port(15006)),
            ("remote to the outbound port", Port(15006)),
            ("remote UDP to the pod", Port(9999)),
            ("remote to pod IPv6 (IPv6 off)", Port(8080)),
            ("app to its own pod IP", Port(8080)),
            ("proxy to its own pod IP", Port(15006)),
            ("app to its own pod IP tunnel port", Port(15008)),
        ],
    );
}

#[test]
fn inbound_dual_stack() {
    let cases = [
        inbound("remote to pod IPv6 app port", sa(POD_V6, 8080)),
        inbound("remote to pod IPv6 tunnel port", sa(POD_V6, 15008)),
        inbound("remote to pod IPv6 excluded port", sa(POD_V6, 15090)),
        inbound("remote to pod IPv4 app port", sa(POD_V4, 8080)),
        tcp("proxy to own pod IPv6", PROXY, sa(POD_V6, 8080)),
    ];
    differential(
        &format!("{INJECTOR} --dual-stack"),
        &[],
        &cases,
        &[
            ("remote to pod IPv6 app port", 15006),
            ("remote to pod IPv6 tunnel port", 15008),
            ("remote to pod IPv6 excluded port", 15090),
            ("remote to pod IPv4 app port", 15006),
            ("proxy to own pod IPv6", 15006),
        ],
    );
}

#[test]
fn inbound_port_lists() {
    let list = [
        inbound("listed port", sa(POD_V4, 8080)),
        inbound("unlisted port", sa(POD_V4, 15090)),
        inbound("-d port is ignored with a list", sa(POD_V4, 8080)),
        inbound("tunnel port", sa(POD_V4, 15008)),
        inbound("unlisted closed port", sa(POD_V4, 9999)),
    ];
    differential(
        "-u 1337 -i * -b 8080,9090 -d 8080",
        &[],
        &list,
        &[
            ("listed port", Port(15006)),
            ("unlisted port", Port(15090)),
            ("-d port is ignored with a list", Port(15006)),
            ("tunnel port", Port(15008)),
            ("unlisted closed port", Failed(ErrorKind::ConnectionRefused)),
        ],
    );
    let off = [
        inbound("no -b", sa(POD_V4, 8080)),
        inbound("no -b, closed port", sa(POD_V4, 9999)),
    ];
    differential(
        "-u 1337 -i * -b ''",
        &[],
        &off,
        &[
            ("no -b", Port(8080)),
            ("no -b, closed port", Failed(ErrorKind::ConnectionRefused)),
        ],
    );
    let wildcard_tunnel = [inbound("tunnel port listed in -b", sa(POD_V4, 15008))];
    differential(
        "-u 1337 -b 15008,8080 -e 15008",
        &[],
        &wildcard_tunnel,
        &[("tunnel port listed in -b", 15008)],
    );
}

#[test]
fn interfaces() {
    // -k: inbound from a virt interface is treated as outbound (to 15001), -x not consulted.
    let virt = [
        inbound("from a virt interface", sa(POD_V4, 8080)),
        inbound("virt, excluded port", sa(POD_V4, 15090)),
    ];
    differential(
        "-u 1337 -i * -x 192.0.2.0/24 -b * -k eth0",
        &[],
        &virt,
        &[("from a virt interface", 15001), ("virt, excluded port", 15001)],
    );
    let virt_not_included = [inbound("virt, outside -i", sa(POD_V4, 8080))];
    differential(
        "-u 1337 -i 10.0.0.0/8 -b * -k eth0",
        &[],
        &virt_not_included,
        &[("virt, outside -i", 8080)],
    );
    // -c: nothing on the interface is captured.
    let excluded = [inbound("from an excluded interface", sa(POD_V4, 8080))];
    differential(
        "-u 1337 -i * -b * -c eth0",
        &[],
        &excluded,
        &[("from an excluded interface", 8080)],
    );
}

#[test]
fn fail_closed_when_the_proxy_is_not_listening() {
    // Only the app listens: a captured connection must fail, never reach the app.
    let cases = [
        inbound("captured port, no proxy", sa(POD_V4, 8080)),
        inbound("excluded port, no proxy", sa(POD_V4, 15090)),
    ];
    differential_with(
        INJECTOR,
        &[],
        &[8080, 15090],
        &cases,
        &[
            // A reset, never the app.
            ("captured port, no proxy", Failed(ErrorKind::ConnectionRefused)),
            ("excluded port, no proxy", Port(15090)),
        ],
    );
    let ipv6 = [inbound("captured IPv6 port, no proxy", sa(POD_V6, 8080))];
    differential_with(
        &format!("{INJECTOR} --dual-stack"),
        &[],
        &[8080],
        &ipv6,
        &[("captured IPv6 port, no proxy", Failed(ErrorKind::ConnectionRefused))],
    );
}

#[test]
fn tproxy_mode() {
    // istio's TPROXY mode (-m TPROXY, -t, -r): the same ports captured, the original destination kept as
    // the accepted socket's local address. The tunnel port is captured too: istio's RETURN for it is in
    // the nat table only, and TPROXY captures in mangle.
    let cases = [
        inbound("remote to app port", sa(POD_V4, 8080)),
        inbound("remote to closed port", sa(POD_V4, 9999)),
        inbound("remote to excluded port", sa(POD_V4, 15090)),
        inbound("remote to tunnel port", sa(POD_V4, 15008)),
        inbound("remote to pod IPv6 app port", sa(POD_V6, 8080)),
        inbound("remote to pod IPv6 tunnel port", sa(POD_V6, 15008)),
        tcp("app to its own pod IP", APP, sa(POD_V4, 8080)),
        tcp(
            "app to remote (outbound is REDIRECT in TPROXY mode too)",
            APP,
            sa(testkit::REMOTE_V4, 8080),
        ),
    ];
    let expect: [(&str, Expect); 8] = [
        ("remote to app port", Port(15006)),
        ("remote to closed port", Port(15006)),
        ("remote to excluded port", Port(15090)),
        ("remote to tunnel port", Port(15006)),
        ("remote to pod IPv6 app port", Port(15006)),
        ("remote to pod IPv6 tunnel port", Port(15006)),
        ("app to its own pod IP", Port(8080)),
        ("app to remote (outbound is REDIRECT in TPROXY mode too)", Port(15001)),
    ];
    differential(
        "-p 15001 -z 15006 -u 1337 -g 1337 -m TPROXY -t 1337 -r 133 -i * -b * -d 15090 --dual-stack",
        &[],
        &cases,
        &expect,
    );
}
