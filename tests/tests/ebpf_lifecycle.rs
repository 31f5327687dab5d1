//! The eBPF backend's life: several namespaces on one attachment, re-applying, status, clean, the last clean
//! detaching everything; a real third-party proxy as the sidecar; and original-destination entries that do
//! not outlive their connections.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use capture_common::maps::{ConnKey, OrigDst, SetKey, names};
use testkit::{
    BpfPins, Cgroup, Connect, INJECTOR_DEFAULT_FLAGS, Listeners, POD_V4, Pod, REMOTE_V4, capture, connect_as,
    connect_with, sa,
};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);

/// `capture --backend ebpf` with the attachment and pins of this test, then `extra`.
fn ebpf_args<'a>(cgroup: &'a str, pins: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--backend", "ebpf", "--cgroup", cgroup, "--pin-dir", pins];
    args.extend_from_slice(extra);
    args
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Entries in a pinned hash map.
fn entries<K: aya::Pod, V: aya::Pod>(pins: &BpfPins, name: &str) -> usize {
    let data = MapData::from_pin(pins.path().join(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
    let map: HashMap<_, K, V> = Map::from_map_data(data).unwrap().try_into().unwrap();
    map.keys().count()
}

/// Where an app connection to `dst` from `pod` lands: (listener port, original destination).
fn lands(
    pod: &Pod,
    cgroup: &Cgroup,
    sidecar: &Listeners,
    remote: &Listeners,
    dst: SocketAddr,
) -> (u16, Option<SocketAddr>) {
    connect_as(&pod.pod, Some(cgroup), APP, dst).unwrap_or_else(|e| panic!("connect to {dst}: {e}"));
    let deadline = Instant::now() + testkit::patient(Duration::from_secs(3));
    while Instant::now() < deadline {
        if let Some(a) = sidecar.drain().into_iter().chain(remote.drain()).next() {
            return (a.listener, a.original_dst);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no listener saw the connection to {dst}");
}

#[test]
fn pods_applied_at_once_each_get_their_own_configuration_and_inbound_capture() {
    // Init containers of pods that start together run `capture` at the same moment: each must end up with
    // its own configuration and its own sk_lookup copy, as if they had run one after another.
    const PODS: usize = 4;
    let pods: Vec<Pod> = (0..PODS).map(|i| Pod::new(&format!("life-c{i}"))).collect();
    let cgroup = Cgroup::new("life-c");
    let pins = BpfPins::new("life-c");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let any = |p| sa(Ipv6Addr::UNSPECIFIED, p);
    let sidecars: Vec<Listeners> = pods
        .iter()
        .map(|p| Listeners::start(&p.pod, Some(&cgroup), None, &[any(15006)]))
        .collect();
    let apps: Vec<Listeners> = pods
        .iter()
        .map(|p| Listeners::start(&p.pod, None, None, &[any(8080)]))
        .collect();
    // Even pods capture every inbound port, odd ones only 9090: a configuration given to the wrong
    // namespace shows.
    let flags = |i: usize| -> Vec<&str> {
        let mut f = INJECTOR_DEFAULT_FLAGS.to_vec();
        let b = f.iter().position(|a| *a == "-b").unwrap();
        if i % 2 == 1 {
            f[b + 1] = "9090";
        }
        ebpf_args(&cg, &pin, &f)
    };
    std::thread::scope(|scope| {
        let runs: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, pod)| {
                let args = flags(i);
                scope.spawn(move || capture(&pod.pod, &args))
            })
            .collect();
        for run in runs {
            ok(run.join().expect("apply thread"), "apply");
        }
    });
    let dst = sa(POD_V4, 8080);
    for (i, pod) in pods.iter().enumerate() {
        connect_as(&pod.remote, None, (0, 0), dst).unwrap_or_else(|e| panic!("pod {i}: connect: {e}"));
        let deadline = Instant::now() + testkit::patient(Duration::from_secs(3));
        let landed = loop {
            if let Some(a) = sidecars[i].drain().into_iter().chain(apps[i].drain()).next() {
                break (a.listener, a.original_dst);
            }
            assert!(Instant::now() < deadline, "pod {i}: nobody accepted the connection");
            std::thread::sleep(Duration::from_millis(5));
        };
        let expected = if i % 2 == 0 { (15006, Some(dst)) } else { (8080, None) };
        assert_eq!(landed, expected, "pod {i}");
    }
    let status = ok(
        capture(&pods[0].pod, &["status", "--backend", "ebpf", "--pin-dir", &pin]),
        "status",
    );
    assert_eq!(status.matches("\nnetns ").count(), PODS, "{status}");
}

#[test]
fn captured_dns_is_counted_as_dns() {
    // `--redirect-dns`: queries to the resolv.conf server go to the DNS proxy on 15053, and `capture status`
    // (and the agent's metrics, which read the same counters) count them as dns as well as redirected.
    let pod = Pod::new("life-dns");
    let cgroup = Cgroup::new("life-dns");
    let pins = BpfPins::new("life-dns");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let resolv = std::env::temp_dir().join(format!("capture-life-dns-{}", std::process::id()));
    std::fs::write(&resolv, format!("nameserver {REMOTE_V4}\n")).expect("write resolv.conf");
    let dns_proxy = sa(Ipv4Addr::UNSPECIFIED, 15053);
    let proxy = Listeners::start_with_udp(&pod.pod, Some(&cgroup), Some(PROXY), &[dns_proxy], &[dns_proxy]);
    let resolv_flag = resolv.display().to_string();
    let mut flags = INJECTOR_DEFAULT_FLAGS.to_vec();
    flags.extend(["--redirect-dns", "--resolv-conf", &resolv_flag]);
    let applied = capture(&pod.pod, &ebpf_args(&cg, &pin, &flags));
    let _ = std::fs::remove_file(&resolv);
    ok(applied, "apply");

    let udp = Connect {
        sendto: true,
        ..Connect::default()
    };
    for _ in 0..2 {
        connect_with(&pod.pod, Some(&cgroup), APP, sa(REMOTE_V4, 53), udp).expect("a UDP query");
    }
    connect_as(&pod.pod, Some(&cgroup), APP, sa(REMOTE_V4, 53)).expect("a TCP query");
    // The probe reports each query on its own output, which may come a moment after the answer: waited for.
    let udp_seen = (0..2).filter_map(|_| proxy.next_datagram()).count();
    assert_eq!(udp_seen, 2, "UDP queries at the DNS proxy");
    assert!(proxy.next().is_some(), "the TCP query at the DNS proxy");
    assert_eq!(
        proxy.drain_datagrams().len() + proxy.drain().len(),
        0,
        "more queries at the DNS proxy"
    );
    let status = ok(
        capture(&pod.pod, &["status", "--backend", "ebpf", "--pin-dir", &pin]),
        "status",
    );
    assert!(status.contains(" dns=3 "), "{status}");
    assert!(status.contains("redirected=3 "), "{status}");
}

#[test]
fn namespaces_share_one_attachment_reapply_in_place_and_the_last_clean_detaches() {
    let (a, b) = (Pod::new("life-a"), Pod::new("life-b"));
    let cgroup = Cgroup::new("life");
    let pins = BpfPins::new("life");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let any = |p| sa(Ipv6Addr::UNSPECIFIED, p);
    let sidecars = [&a, &b].map(|p| Listeners::start(&p.pod, Some(&cgroup), None, &[any(15001), any(15006)]));
    let remotes = [&a, &b].map(|p| Listeners::start(&p.remote, None, None, &[any(80), any(8080)]));
    let to_8080 = sa(REMOTE_V4, 8080);
    let to_80 = sa(REMOTE_V4, 80);

    for pod in [&a, &b] {
        ok(
            capture(&pod.pod, &ebpf_args(&cg, &pin, INJECTOR_DEFAULT_FLAGS)),
            "apply",
        );
    }
    assert_eq!(
        lands(&a, &cgroup, &sidecars[0], &remotes[0], to_8080),
        (15001, Some(to_8080))
    );
    assert_eq!(
        lands(&b, &cgroup, &sidecars[1], &remotes[1], to_80),
        (15001, Some(to_80))
    );

    let status = ok(
        capture(&a.pod, &["status", "--backend", "ebpf", "--pin-dir", &pin]),
        "status",
    );
    assert_eq!(
        status.matches("\nnetns ").count(),
        2,
        "two namespaces registered:\n{status}"
    );
    assert_eq!(status.matches("(this namespace)").count(), 1, "{status}");
    assert!(status.contains("-i * -x '' -b *"), "status shows the flags:\n{status}");
    assert_eq!(
        status.matches("redirected=1 ").count(),
        2,
        "one redirect each:\n{status}"
    );
    assert_eq!(status.matches("original_dst_lookups=1 ").count(), 2, "{status}");
    // One inbound connection into A: counted as inbound in A only.
    connect_as(&a.remote, None, (0, 0), sa(POD_V4, 8080)).expect("inbound connection");
    let got = sidecars[0].next().expect("nobody accepted the inbound connection");
    assert_eq!(got.listener, 15006);
    let status = ok(
        capture(&a.pod, &["status", "--backend", "ebpf", "--pin-dir", &pin]),
        "status",
    );
    let counters_of_a = status
        .lines()
        .skip_while(|l| !l.contains("(this namespace)"))
        .nth(1)
        .unwrap_or_default();
    assert!(counters_of_a.contains(" inbound=1 "), "{status}");
    assert_eq!(status.matches(" inbound=0 ").count(), 1, "B had none:\n{status}");

    // Re-applying with other flags replaces A's configuration in place, and only A's.
    // Each namespace has its three -d ports in SETS; A's re-apply adds one -o port, and must not leave
    // its old configuration's entries behind.
    let per_namespace = entries::<SetKey, u8>(&pins, names::SETS) / 2;
    assert_eq!(per_namespace, 3, "-d 15090,15021,15020");
    let mut with_o = INJECTOR_DEFAULT_FLAGS.to_vec();
    with_o.extend_from_slice(&["-o", "8080"]);
    for _ in 0..2 {
        ok(capture(&a.pod, &ebpf_args(&cg, &pin, &with_o)), "re-apply");
        assert_eq!(
            entries::<SetKey, u8>(&pins, names::SETS),
            2 * per_namespace + 1,
            "the old configuration's entries are gone"
        );
    }
    assert_eq!(
        lands(&a, &cgroup, &sidecars[0], &remotes[0], to_8080),
        (8080, None),
        "-o 8080 now applies in A"
    );
    assert_eq!(lands(&a, &cgroup, &sidecars[0], &remotes[0], to_80).0, 15001);
    assert_eq!(
        lands(&b, &cgroup, &sidecars[1], &remotes[1], to_8080).0,
        15001,
        "B keeps its own flags"
    );

    // Clean A: A is released, B is still captured, the programs stay attached.
    let mut clean = vec!["clean"];
    clean.extend(ebpf_args(&cg, &pin, &[]));
    ok(capture(&a.pod, &clean), "clean A");
    assert_eq!(lands(&a, &cgroup, &sidecars[0], &remotes[0], to_80), (80, None));
    assert_eq!(lands(&b, &cgroup, &sidecars[1], &remotes[1], to_80).0, 15001);
    let status = ok(
        capture(&b.pod, &["status", "--backend", "ebpf", "--pin-dir", &pin]),
        "status",
    );
    assert_eq!(status.matches("\nnetns ").count(), 1, "{status}");
    assert_eq!(
        entries::<SetKey, u8>(&pins, names::SETS),
        per_namespace,
        "only B's entries are left"
    );

    // Clean B, the last one: every pin goes, and with the links the programs are detached.
    ok(capture(&b.pod, &clean), "clean B");
    assert!(!pins.path().exists(), "pins left in {}", pins.path().display());
    // The kernel releases a link whose last reference went in a work item, so detaching takes a moment.
    let deadline = Instant::now() + testkit::patient(Duration::from_secs(2));
    let attached = loop {
        let out = Command::new("bpftool")
            .args(["cgroup", "show", &cg])
            .output()
            .expect("bpftool");
        let attached = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if attached.is_empty() || Instant::now() > deadline {
            break attached;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(attached.is_empty(), "programs still attached to {cg}: {attached}");
    assert_eq!(lands(&b, &cgroup, &sidecars[1], &remotes[1], to_80), (80, None));
}

/// A child process killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy forwarding whatever reaches it on 15001 to the connection's original destination, which it reads
/// with `getsockopt(SO_ORIGINAL_DST)` for a server address of 0.0.0.0.
const HAPROXY_CFG: &str = "global
    maxconn 64
defaults
    mode tcp
    timeout connect 3s
    timeout client 10s
    timeout server 10s
frontend capture_outbound
    bind 0.0.0.0:15001
    default_backend original_destination
backend original_destination
    server original 0.0.0.0
";

#[test]
fn haproxy_as_the_sidecar_forwards_to_the_original_destination() {
    let pod = Pod::new("hap");
    let cgroup = Cgroup::new("hap");
    let pins = BpfPins::new("hap");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let dir = std::env::temp_dir().join(format!("capture-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, HAPROXY_CFG).unwrap();

    ok(
        capture(&pod.pod, &ebpf_args(&cg, &pin, INJECTOR_DEFAULT_FLAGS)),
        "apply",
    );
    let remote = Listeners::start(&pod.remote, None, None, &[sa(Ipv4Addr::UNSPECIFIED, 8080)]);
    let mut cmd = pod.pod.command("haproxy");
    cmd.arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cgroup.enter(&mut cmd);
    testkit::run_as(&mut cmd, PROXY);
    let haproxy = Running(cmd.spawn().expect("start haproxy (installed by cargo xtask setup)"));

    // HAProxy needs a moment to bind; the app retries until it is there (bounded).
    let dst = sa(REMOTE_V4, 8080);
    let deadline = Instant::now() + testkit::patient(Duration::from_secs(5));
    let reached = loop {
        match connect_as(&pod.pod, Some(&cgroup), APP, dst) {
            Ok(local) => break local,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the app never got through HAProxy: {e}"),
        }
    };
    let got = remote.next().expect("the remote server saw nothing");
    assert_eq!(
        got.peer.ip(),
        std::net::IpAddr::V4(POD_V4),
        "HAProxy's own connection left the pod directly"
    );
    assert_ne!(got.peer, reached, "the remote saw HAProxy's connection, not the app's");
    assert!(
        remote.drain().is_empty(),
        "HAProxy's connection was captured again (a loop)"
    );
    drop(haproxy);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn original_destination_entries_do_not_outlive_their_connections() {
    // 100,000 here. Where the tests run slower (an emulated CPU, scale 10: 1,000), fewer, so the test stays
    // within a minute: any entry left over still shows, since the handshake map holds 65,536.
    let connections: u32 = 100_000 / testkit::time_scale().pow(2);
    let pod = Pod::new("load");
    let cgroup = Cgroup::new("load");
    let pins = BpfPins::new("load");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    // 100,000 connections in a few seconds: let the client reuse ports in TIME_WAIT.
    testkit::run(pod.pod.command("sysctl").args([
        "-qw",
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ]));
    ok(
        capture(&pod.pod, &ebpf_args(&cg, &pin, INJECTOR_DEFAULT_FLAGS)),
        "apply",
    );
    let sidecar = Listeners::start(&pod.pod, Some(&cgroup), None, &[sa(Ipv4Addr::UNSPECIFIED, 15001)]);
    let dst = sa(REMOTE_V4, 8080);
    connect_with(
        &pod.pod,
        Some(&cgroup),
        APP,
        dst,
        Connect {
            count: connections,
            ..Connect::default()
        },
    )
    .unwrap_or_else(|e| panic!("load: {e}"));

    // Every connection reached the sidecar with its original destination.
    let mut seen = 0u32;
    let deadline = Instant::now() + testkit::patient(Duration::from_secs(30));
    while seen < connections && Instant::now() < deadline {
        for a in sidecar.drain() {
            assert_eq!(a.original_dst, Some(dst), "connection {seen}");
            seen += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(seen, connections);
    // All are closed now (the sidecar closes each after its client): no entry may be left.
    let deadline = Instant::now() + testkit::patient(Duration::from_secs(5));
    let left = loop {
        let left = entries::<ConnKey, OrigDst>(&pins, names::ORIG_BY_ADDR);
        if left == 0 || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        left, 0,
        "original-destination entries left after {connections} closed connections"
    );
    // Nor between connect and SYN: each socket's entry goes at its SYN.
    assert_eq!(
        entries::<u64, OrigDst>(&pins, names::ORIG_CONNECTING),
        0,
        "entries by socket cookie left after {connections} connections"
    );
}

#[test]
fn kernel_logs_are_forwarded_while_capture_runs_and_a_new_apply_swaps_the_programs_in_place() {
    use std::io::{BufRead as _, BufReader};

    let pod = Pod::new("log");
    let cgroup = Cgroup::new("log");
    let pins = BpfPins::new("log");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let sidecar = Listeners::start(&pod.pod, Some(&cgroup), None, &[sa(Ipv4Addr::UNSPECIFIED, 15001)]);
    let remote = Listeners::start(&pod.remote, None, None, &[sa(Ipv4Addr::UNSPECIFIED, 8080)]);
    let dst = sa(REMOTE_V4, 8080);

    // Without --log-level the programs log nothing and capture exits at once (covered by every other test);
    // with it, capture stays and forwards.
    let mut cmd = pod.pod.command(testkit::capture_bin());
    cmd.args(ebpf_args(&cg, &pin, &["--log-level", "debug"]))
        .args(INJECTOR_DEFAULT_FLAGS)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut forwarder = Running(cmd.spawn().expect("start capture --log-level debug"));
    let stderr = forwarder.0.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + testkit::patient(Duration::from_secs(10));
        let mut seen = Vec::new();
        while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            if line.contains(needle) {
                return line;
            }
            seen.push(line);
        }
        panic!("capture never printed {needle:?}; it printed {seen:#?}");
    };
    wait_for("forwarding");
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote, dst), (15001, Some(dst)));
    let line = wait_for("port 8080 -> 15001");
    assert!(line.contains("uid 1000"), "{line}");

    // Ctrl-C ends the forwarder; capture stays in the kernel.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(forwarder.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let status = forwarder.0.wait().expect("wait for capture");
    assert!(status.success(), "capture --log-level exited with {status}");
    drop(forwarder);
    let _ = reader.join();
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote, dst), (15001, Some(dst)));

    // Applying again (logging off) swaps the attached programs for new ones: still captured, same pins.
    ok(
        capture(&pod.pod, &ebpf_args(&cg, &pin, INJECTOR_DEFAULT_FLAGS)),
        "re-apply",
    );
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote, dst), (15001, Some(dst)));
    let attached = Command::new("bpftool")
        .args(["cgroup", "show", &cg])
        .output()
        .expect("bpftool");
    let attached = String::from_utf8_lossy(&attached.stdout);
    assert_eq!(
        attached.matches("capture_").count(),
        8,
        "exactly our eight cgroup programs attached:\n{attached}"
    );
}

/// istio's `--run-validation` under the eBPF backend: as the proxy user (inside the attached cgroup) the
/// probe to 127.0.0.6:15002 is redirected to the inbound port and reads its original destination; as
/// another user it is not, and capture exits 126.
#[test]
fn run_validation_passes_under_the_ebpf_backend_as_the_proxy_user() {
    let pod = Pod::new("vldb");
    let cgroup = Cgroup::new("vldb");
    let pins = BpfPins::new("vldb");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let args = ebpf_args(&cg, &pin, INJECTOR_DEFAULT_FLAGS);
    ok(capture(&pod.pod, &args), "apply");
    testkit::assert_validation(&pod.pod, Some(&cgroup), &args, PROXY, APP);
}

/// A proxy that was already listening when the namespace is registered (an agent registering a running
/// pod) still gets inbound connections: the loader hands its listener to the kernel.
#[test]
fn inbound_reaches_a_proxy_that_listened_before_registration() {
    let pod = Pod::new("early");
    let cgroup = Cgroup::new("early");
    let pins = BpfPins::new("early");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let any = |p| sa(Ipv6Addr::UNSPECIFIED, p);
    let sidecar = Listeners::start(&pod.pod, Some(&cgroup), None, &[any(15006), any(8080)]);
    ok(
        capture(&pod.pod, &ebpf_args(&cg, &pin, INJECTOR_DEFAULT_FLAGS)),
        "apply",
    );
    let dst = sa(POD_V4, 8080);
    connect_as(&pod.remote, None, (0, 0), dst).expect("inbound connection");
    let got = sidecar.next().expect("nobody accepted the inbound connection");
    assert_eq!((got.listener, got.original_dst), (15006, Some(dst)));
}
