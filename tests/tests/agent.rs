//! `capture agent`: pods added and removed through the control socket are captured and released; bad flags
//! are refused with nothing applied; `/metrics` counts per pod; and the agent killed (SIGKILL) and
//! restarted 20 times under load drops no connection, captures every one, and ends in the state it started.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, LpmTrie, Map, MapData};
use capture_common::maps::{CidrKeyData, PodConfig, PodSources, SetKey, names};
use testkit::{
    APP, Agent, BpfPins, Cgroup, Connect, INJECTOR_DEFAULT_FLAGS, Listeners, Netns, POD_V4, Pod, REMOTE_V4, Sandbox,
    accepted_by, capture_bin, connect_as, connect_with, lands, listening, run_as, sa, wait_until,
};

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pods_added_through_the_socket_are_captured_and_removed_ones_released() {
    let pod = Pod::new("agent");
    let cgroup = Cgroup::new("agent");
    let pins = BpfPins::new("agent");
    let agent = Agent::start("add", &pins, &cgroup);
    let (sidecar, remote) = listening(&pod, &cgroup);
    assert_eq!(
        lands(&pod, &cgroup, &sidecar, &remote),
        "remote",
        "before the pod is added"
    );

    ok(
        agent.add("default/app", &pod.pod.path(), INJECTOR_DEFAULT_FLAGS),
        "pod add",
    );
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote), "sidecar", "after pod add");
    let listed = agent.list();
    assert!(listed.starts_with("default/app\t"), "{listed}");
    assert_eq!(listed.lines().count(), 1, "{listed}");
    // The control socket is root's only: another user cannot even list.
    let mut as_app = Command::new(capture_bin());
    as_app.arg("pod").arg("--socket").arg(&agent.socket).arg("list");
    run_as(&mut as_app, APP);
    let denied = as_app.output().expect("run capture pod as another user");
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(!denied.status.success() && err.contains("Permission denied"), "{err}");
    // Adding the same pod again changes nothing.
    let again = agent.add("default/app", &pod.pod.path(), INJECTOR_DEFAULT_FLAGS);
    assert!(again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stderr).trim(),
        "capture: nothing to change"
    );

    // Bad flags: one line naming the flag and the value, exit 2, nothing applied.
    let other = Netns::new("agent-bad");
    let bad = agent.add("default/bad", &other.path(), &["-p", "99999"]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("-p/--envoy-port") && err.contains("99999"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(agent.list(), listed, "a refused pod must not be registered");

    // Per-pod counters on /metrics.
    let metrics = agent.http_get("/metrics").expect("metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    let redirected = metrics
        .lines()
        .find(|l| {
            l.starts_with("capture_pod_events_total{")
                && l.contains("pod=\"default/app\"")
                && l.contains("event=\"redirected\"")
        })
        .unwrap_or_else(|| panic!("no redirected counter for the pod in:\n{metrics}"));
    let n: u64 = redirected.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 1, "{redirected}");
    assert!(metrics.contains("capture_agent_pods 1"), "{metrics}");

    ok(agent.pod(&["remove", "default/app"]), "pod remove");
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote), "remote", "after pod remove");
    assert_eq!(agent.list(), "");
}

/// CIDR lists are split by family through the agent as through the command: an annotation's `-x ::/0`
/// ("no IPv6") leaves IPv4 captured, and `-i ::/0` captures no IPv4, plain or IPv4-mapped.
#[test]
fn an_ipv6_cidr_registered_through_the_agent_never_decides_for_ipv4() {
    let pod = Pod::new("agent-fam");
    let cgroup = Cgroup::new("agent-fam");
    let pins = BpfPins::new("agent-fam");
    let agent = Agent::start("fam", &pins, &cgroup);
    let any = |port| sa(std::net::Ipv6Addr::UNSPECIFIED, port);
    let remote = Listeners::start(&pod.remote, None, None, &[any(8080)]);
    let sidecar = Listeners::start(&pod.pod, Some(&cgroup), None, &[any(15001)]);
    let v4 = sa(REMOTE_V4, 8080);
    let mapped = sa(REMOTE_V4.to_ipv6_mapped(), 8080);
    let v6 = sa(testkit::REMOTE_V6, 8080);
    let lands = |dst: SocketAddr| {
        connect_as(&pod.pod, Some(&cgroup), APP, dst).unwrap_or_else(|e| panic!("connect {dst}: {e}"));
        // The proxy reads the original destination as the kernel sends it: IPv4 for a mapped one.
        let seen = match dst.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(dst, |v4| sa(v4, dst.port())),
            std::net::IpAddr::V4(_) => dst,
        };
        accepted_by(seen, ("sidecar", &sidecar), ("remote", &remote))
    };
    let flags = |cidrs: &str| -> Vec<String> {
        format!("-p 15001 -z 15006 -u 1337 -m REDIRECT -b * --dual-stack {cidrs}")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let add = |cidrs: &str| {
        let flags = flags(cidrs);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        ok(agent.add("default/fam", &pod.pod.path(), &flags), cidrs);
    };
    // (flags, where an IPv4, an IPv4-mapped and an IPv6 connection land), each applied over the last.
    let cases = [
        ("-i * -x ::/0", ["sidecar", "sidecar", "remote"]),
        ("-i ::/0", ["remote", "remote", "sidecar"]),
        ("-i * -x ::ffff:0:0/96", ["sidecar", "sidecar", "sidecar"]),
    ];
    for (cidrs, expected) in cases {
        add(cidrs);
        assert_eq!([lands(v4), lands(mapped), lands(v6)], expected, "{cidrs}");
    }
}

/// The configuration id of each registered namespace, and every id the set and CIDR entries carry.
fn config_ids(pins: &BpfPins) -> (Vec<(u64, u32)>, Vec<u32>) {
    let open = |name: &str| {
        let data = MapData::from_pin(pins.path().join(name)).unwrap_or_else(|e| panic!("open {name}: {e}"));
        Map::from_map_data(data).unwrap()
    };
    let config: HashMap<_, u64, PodConfig> = open(names::CONFIG).try_into().unwrap();
    let sets: HashMap<_, SetKey, u8> = open(names::SETS).try_into().unwrap();
    let cidrs: LpmTrie<_, CidrKeyData, u8> = open(names::CIDRS).try_into().unwrap();
    let registered = config.iter().map(|r| r.map(|(k, c)| (k, c.id)).unwrap()).collect();
    let mut entry_ids: Vec<u32> = sets.keys().map(|k| k.unwrap().id).collect();
    entry_ids.extend(cidrs.keys().map(|k| u32::from_be_bytes(k.unwrap().data().id)));
    entry_ids.sort_unstable();
    entry_ids.dedup();
    (registered, entry_ids)
}

/// An unregistration killed between removing a namespace's `CONFIG` value and its set and CIDR entries
/// leaves those entries behind. A later registration must never inherit them (configuration ids are never
/// reused), and the next agent to start sweeps them.
#[test]
fn a_new_pod_never_inherits_entries_an_interrupted_unregistration_left() {
    let cgroup = Cgroup::new("agent-inherit");
    let pins = BpfPins::new("agent-inherit");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let ebpf = ["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin];
    let gone = Pod::new("agent-inh-a");
    let mut args = ebpf.to_vec();
    args.extend(["-u", "1337", "-i", "*", "-x", "192.0.2.0/24", "-o", "8080"]);
    ok(testkit::capture(&gone.pod, &args), "capture in the pod that goes");
    let (registered, _) = config_ids(&pins);
    let [(gone_cookie, gone_id)] = registered[..] else {
        panic!("{registered:?}")
    };
    // Killed half-way: the CONFIG value went, its entries did not.
    let data = MapData::from_pin(pins.path().join(names::CONFIG)).unwrap();
    let mut config: HashMap<_, u64, PodConfig> = Map::from_map_data(data).unwrap().try_into().unwrap();
    config.remove(&gone_cookie).unwrap();
    assert_eq!(config_ids(&pins).1, [gone_id], "the leftovers");

    let pod = Pod::new("agent-inh-b");
    let mut args = ebpf.to_vec();
    args.extend(["-u", "1337", "-i", "*"]);
    ok(testkit::capture(&pod.pod, &args), "capture in the new pod");
    let (registered, _) = config_ids(&pins);
    let [(_, id)] = registered[..] else {
        panic!("{registered:?}")
    };
    assert_ne!(id, gone_id, "the new pod took the id whose entries were left");
    let (sidecar, remote) = listening(&pod, &cgroup);
    assert_eq!(
        lands(&pod, &cgroup, &sidecar, &remote),
        "sidecar",
        "the new pod is captured by its own flags, not by the -o 8080 and -x left behind"
    );

    // The gone namespace's address entry was left too.
    let sources = || -> Vec<u64> {
        let data = MapData::from_pin(pins.path().join(names::POD_SOURCES)).unwrap();
        let map: HashMap<_, u64, PodSources> = Map::from_map_data(data).unwrap().try_into().unwrap();
        let mut keys: Vec<u64> = map.keys().map(Result::unwrap).collect();
        keys.sort_unstable();
        keys
    };
    let live_cookie = registered[0].0;
    let mut both = vec![gone_cookie, live_cookie];
    both.sort_unstable();
    assert_eq!(sources(), both, "the left address entry");

    // The next agent sweeps what no configuration owns.
    let agent = Agent::start("inherit", &pins, &cgroup);
    assert_eq!(config_ids(&pins).1, [id], "after the agent's sweep: {}", agent.log());
    assert_eq!(
        sources(),
        [live_cookie],
        "address entries after the sweep: {}",
        agent.log()
    );
    assert!(agent.log().contains("swept"), "{}", agent.log());
}

/// A pod known by `/proc/PID/ns/net` goes while the agent is down, and its PID is reused by a process in
/// another namespace. The restarted agent must release the record (by its cookie), never register the
/// other namespace with the gone pod's flags.
#[test]
fn a_reused_pid_never_gets_a_gone_pods_capture() {
    let cgroup = Cgroup::new("agent-pid");
    let pins = BpfPins::new("agent-pid");
    let mut agent = Agent::start("pid", &pins, &cgroup);
    let gone = Pod::new("agent-pid-a");
    let sandbox = Sandbox::start(&gone.pod);
    let pid = sandbox.pid();
    ok(
        agent.add("default/gone", &sandbox.netns(), INJECTOR_DEFAULT_FLAGS),
        "pod add",
    );
    assert_eq!(config_ids(&pins).0.len(), 1);

    agent.kill();
    drop(sandbox);
    let other = Pod::new("agent-pid-b");
    let reused = Sandbox::with_pid(&other.pod, pid).expect("the PID could not be had again");
    assert_eq!(reused.netns(), PathBuf::from(format!("/proc/{pid}/ns/net")));
    agent.restart();

    assert_eq!(agent.list(), "", "the record must be released: {}", agent.log());
    assert_eq!(config_ids(&pins).0, [], "nothing may stay registered: {}", agent.log());
    let (sidecar, remote) = listening(&other, &cgroup);
    assert_eq!(
        lands(&other, &cgroup, &sidecar, &remote),
        "remote",
        "the other namespace got the gone pod's capture"
    );
}

/// A fake Kubernetes API server on 127.0.0.1 for the agent's `--kubernetes` source: one thread per
/// connection, one request per connection (`Connection: close`). A list request (`GET /api/v1/pods?…`)
/// gets the pods set now ([`FakeApi::set_pods`]) as a PodList; a watch request (`watch=true` or `watch=1`
/// in the query) gets a stream that sends no event and ends after [`FakeApi::WATCH_HOLD`] (the client then
/// watches again). Every request's target is kept. Stopped on drop.
struct FakeApi {
    addr: SocketAddr,
    pods: Arc<Mutex<Vec<serde_json::Value>>>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// How long a watch stays open without events.
    const WATCH_HOLD: Duration = Duration::from_secs(30);

    fn start(pods: Vec<serde_json::Value>) -> FakeApi {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the fake API server");
        let addr = listener.local_addr().unwrap();
        let pods = Arc::new(Mutex::new(pods));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (pods, requests, stop) = (pods.clone(), requests.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut connections = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (pods, requests, stop) = (pods.clone(), requests.clone(), stop.clone());
                    connections.push(std::thread::spawn(move || {
                        FakeApi::answer(stream, &pods, &requests, &stop)
                    }));
                }
                for c in connections {
                    let _ = c.join();
                }
            })
        };
        FakeApi {
            addr,
            pods,
            requests,
            stop,
            accept: Some(accept),
        }
    }

    /// Answers one request on `stream`; errors (the agent killed mid-request) just end it.
    fn answer(
        mut stream: TcpStream,
        pods: &Mutex<Vec<serde_json::Value>>,
        requests: &Mutex<Vec<String>>,
        stop: &AtomicBool,
    ) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        // The request head (GETs have no body), at most 64 KiB.
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk) {
                Ok(n) if n > 0 && head.len() < 64 * 1024 => head.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head);
        let target = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
        requests.lock().unwrap().push(target.clone());
        let query = target.split_once('?').map_or("", |(_, q)| q);
        if query.split('&').any(|p| p == "watch=true" || p == "watch=1") {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if stream.write_all(head.as_bytes()).is_err() {
                return;
            }
            let until = Instant::now() + FakeApi::WATCH_HOLD;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = stream.write_all(b"0\r\n\r\n");
            return;
        }
        let items = pods.lock().unwrap().clone();
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": "1"},
            "items": items,
        })
        .to_string();
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }

    /// What list requests get from now on.
    fn set_pods(&self, pods: Vec<serde_json::Value>) {
        *self.pods.lock().unwrap() = pods;
    }

    /// The target (path and query) of every request so far.
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// How many list requests (not watches) came so far.
    fn lists(&self) -> usize {
        self.requests().iter().filter(|t| !t.contains("watch=")).count()
    }

    /// A kubeconfig naming this server, without credentials.
    fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\n",
            self.addr
        )
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop, which then sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// One of the recorded pods of `capture-userspace/tests/data/pods` (as the API server returns it).
fn recorded_pod(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../capture-userspace/tests/data/pods")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The Kubernetes-source variant of [`a_reused_pid_never_gets_a_gone_pods_capture`]: a pod known through
/// the watch (its namespace found by its UID in `/proc/PID/cgroup`, as `/proc/PID/ns/net`) is deleted while
/// the agent is down, and its sandbox's PID is reused by a process in another namespace. The restarted
/// agent must release the pod's record (by its cookie), never register the other namespace with the gone
/// pod's flags.
#[test]
fn a_reused_pid_never_gets_a_deleted_kubernetes_pods_capture() {
    let cgroup = Cgroup::new("agent-kpid");
    let pins = BpfPins::new("agent-kpid");
    let node = format!("node-{}", std::process::id());
    let uid = format!("{:08x}-6b75-4be5-8000-000000000001", std::process::id());
    let mut pod = recorded_pod("cni-native-sidecar");
    pod["metadata"]["uid"] = uid.clone().into();
    pod["spec"]["nodeName"] = node.clone().into();
    let api = FakeApi::start(vec![pod]);
    // The pod's sandbox, where the kubelet (cgroupfs driver) would put it.
    let gone = Pod::new("agent-kpid-a");
    let pod_cgroup = cgroup.child(format!("kubepods/besteffort/pod{uid}/sandbox"));
    let sandbox = Sandbox::start_in(&gone.pod, &pod_cgroup);
    let pid = sandbox.pid();
    let mut agent = Agent::start_kubernetes("kpid", &pins, &cgroup, &node, &api.kubeconfig());
    wait_until(
        "the pod registered from Kubernetes",
        Duration::from_secs(10),
        || config_ids(&pins).0.len() == 1,
        || agent.log(),
    );
    let listed = agent.list();
    assert!(
        listed.starts_with(&format!("shop/reviews\t/proc/{pid}/ns/net\t")) && listed.contains("source=kubernetes"),
        "{listed}"
    );
    let selector = format!("fieldSelector=spec.nodeName%3D{node}");
    assert!(
        api.requests().iter().all(|t| t.contains(&selector)),
        "{:?}",
        api.requests()
    );
    let (sidecar, remote) = listening(&gone, &cgroup);
    assert_eq!(
        lands(&gone, &cgroup, &sidecar, &remote),
        "sidecar",
        "the pod is captured"
    );

    // Deleted while the agent is down: gone from the API, its sandbox ended, its PID taken elsewhere.
    agent.kill();
    api.set_pods(Vec::new());
    drop(sandbox);
    let other = Pod::new("agent-kpid-b");
    let reused = Sandbox::with_pid(&other.pod, pid).expect("the PID could not be had again");
    assert_eq!(reused.netns(), PathBuf::from(format!("/proc/{pid}/ns/net")));
    let lists = api.lists();
    agent.restart();

    // The restarted source lists (the pod is not there), then rescans: through all of it nothing may be
    // registered.
    wait_until(
        "the restarted agent's Kubernetes list",
        Duration::from_secs(10),
        || api.lists() > lists,
        || agent.log(),
    );
    let quiet = Instant::now() + testkit::patient(Duration::from_secs(3));
    while Instant::now() < quiet {
        assert_eq!(config_ids(&pins).0, [], "nothing may stay registered: {}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.list(), "", "the record must be released: {}", agent.log());
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("the recorded namespace is gone; released") && l.contains("pod=shop/reviews")),
        "the record was not released by identity: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    let (sidecar, remote) = listening(&other, &cgroup);
    assert_eq!(
        lands(&other, &cgroup, &sidecar, &remote),
        "remote",
        "the other namespace got the gone pod's capture"
    );
}

/// Records of another boot are released, never trusted: cookies and inodes start over with each boot.
#[test]
fn a_record_from_another_boot_is_released() {
    let cgroup = Cgroup::new("agent-boot");
    let pins = BpfPins::new("agent-boot");
    let mut agent = Agent::start("boot", &pins, &cgroup);
    let pod = Pod::new("agent-boot");
    let sandbox = Sandbox::start(&pod.pod);
    ok(
        agent.add("default/boot", &sandbox.netns(), INJECTOR_DEFAULT_FLAGS),
        "pod add",
    );
    // Another pod cannot claim the same namespace.
    let twin = agent.add("default/twin", &sandbox.netns(), INJECTOR_DEFAULT_FLAGS);
    let err = String::from_utf8_lossy(&twin.stderr);
    assert!(!twin.status.success(), "{err}");
    assert!(err.contains("already captured for pod default/boot"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    agent.kill();
    let state = agent.dir.join("state/pods.json");
    let text = std::fs::read_to_string(&state).expect("the records");
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert!(text.contains(boot.trim()), "{text}");
    std::fs::write(
        &state,
        text.replace(boot.trim(), "00000000-0000-4000-8000-000000000000"),
    )
    .unwrap();
    agent.restart();
    assert_eq!(agent.list(), "", "{}", agent.log());
    assert_eq!(config_ids(&pins).0, [], "{}", agent.log());
}

/// A second agent on the same state directory and socket refuses at once, with one line, and the first
/// goes on serving.
#[test]
fn a_second_agent_on_the_same_state_refuses() {
    let cgroup = Cgroup::new("agent-twice");
    let pins = BpfPins::new("agent-twice");
    let agent = Agent::start("twice", &pins, &cgroup);
    let mut second = Command::new(capture_bin())
        .args(&agent.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run a second agent");
    // It must give up at once; one still running after the wait is an agent that did not refuse.
    let deadline = Instant::now() + testkit::patient(testkit::agent::READY_TIMEOUT);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait for the second agent") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second agent is running beside the first");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    second.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "the second agent ran: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--state-dir") && stderr.contains("another capture agent is running"),
        "{stderr}"
    );
    assert_eq!(agent.list(), "", "the first agent no longer answers");
}

/// A record file that cannot be read is set aside, and the records are rebuilt from what the kernel holds
/// beside each registration: the pod keeps its id, flags and capture, and can be removed as before.
#[test]
fn a_corrupt_record_file_is_set_aside_and_the_records_rebuilt_from_the_kernel() {
    let cgroup = Cgroup::new("agent-corrupt");
    let pins = BpfPins::new("agent-corrupt");
    let mut agent = Agent::start("corrupt", &pins, &cgroup);
    let pod = Pod::new("agent-corrupt");
    let sandbox = Sandbox::start(&pod.pod);
    ok(
        agent.add("default/corrupt", &sandbox.netns(), INJECTOR_DEFAULT_FLAGS),
        "pod add",
    );
    let listed = agent.list();
    agent.kill();
    let state = agent.dir.join("state/pods.json");
    std::fs::write(&state, "[{\"spec\": tru").unwrap();
    agent.restart();

    assert!(agent.dir.join("state/pods.json.corrupt").exists(), "set aside");
    assert_eq!(agent.list(), listed, "the records rebuilt: {}", agent.log());
    let (sidecar, remote) = listening(&pod, &cgroup);
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote), "sidecar", "still captured");
    let again = agent.add("default/corrupt", &sandbox.netns(), INJECTOR_DEFAULT_FLAGS);
    assert_eq!(
        String::from_utf8_lossy(&again.stderr).trim(),
        "capture: nothing to change"
    );
    ok(agent.pod(&["remove", "default/corrupt"]), "pod remove");
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote), "remote", "released");
}

/// A registration that fails after its entries are written (here: its sk_lookup copy cannot be pinned,
/// because something else already sits at the pin's name) leaves nothing behind: no `CONFIG` value, no
/// set or CIDR entries, no slot; the error is one line; once the obstacle is gone the pod registers.
#[test]
fn a_registration_that_fails_half_way_leaves_nothing_behind() {
    let cgroup = Cgroup::new("agent-half");
    let pins = BpfPins::new("agent-half");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let mut args = vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin];
    args.extend(["-u", "1337", "-i", "*", "-x", "192.0.2.0/24", "-o", "8080"]);
    let first = Pod::new("agent-half-a");
    ok(testkit::capture(&first.pod, &args), "capture in the first pod");
    let before = config_ids(&pins);

    let pod = Pod::new("agent-half-b");
    let cookie = pod.pod.spawn(None, capture::namespace::cookie).join().unwrap().unwrap();
    let obstacle = pins.path().join(format!("link_sk_lookup_{cookie}"));
    std::fs::create_dir(&obstacle).expect("a directory where the pod's sk_lookup link would be pinned");
    let out = testkit::capture(&pod.pod, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the registration succeeded: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(config_ids(&pins), before, "the failed registration left entries");

    std::fs::remove_dir(&obstacle).unwrap();
    ok(testkit::capture(&pod.pod, &args), "capture once the obstacle is gone");
    assert_eq!(config_ids(&pins).0.len(), 2);
}

/// The agent never captures its own network namespace (on a node, the host's): asked to, it refuses in
/// one line and registers nothing. The agent runs in a throwaway namespace here, which stands for the host's.
#[test]
fn the_agent_refuses_its_own_namespace() {
    let cgroup = Cgroup::new("agent-own");
    let pins = BpfPins::new("agent-own");
    let host = Netns::new("agent-own");
    let dir = std::env::temp_dir().join(format!("capture-agent-own-{}", std::process::id()));
    let socket = dir.join("agent.sock");
    let (pin, cg, state, sock) = (
        pins.path().display().to_string(),
        cgroup.path().display().to_string(),
        dir.join("state").display().to_string(),
        socket.display().to_string(),
    );
    let mut child = host
        .command(capture_bin())
        .args(["agent", "--socket", &sock, "--pin-dir", &pin, "--cgroup", &cg])
        .args(["--state-dir", &state, "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start capture agent");
    let pod = |args: &[&str]| {
        Command::new(capture_bin())
            .args(["pod", "--socket", &sock])
            .args(args)
            .output()
            .expect("run capture pod")
    };
    let deadline = Instant::now() + testkit::patient(testkit::agent::READY_TIMEOUT);
    while !pod(&["list"]).status.success() {
        assert!(Instant::now() < deadline, "the agent did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    let netns = host.path().display().to_string();
    let mut args = vec!["add", "host", &netns, "--"];
    args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = pod(&args);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent registered its own namespace");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("the agent's own"), "{err}");
    assert_eq!(config_ids(&pins).0, [], "something was registered");
}

/// Pins left by a release before the family was part of the CIDR key hold entries in the old layout,
/// which the new programs never match: a pod would lose its `-x` exclusions and its local addresses until
/// registered again. The next load (here the agent's start) rewrites them in the new layout before it
/// switches the programs, and removes the old ones after; and it unpins the maps the new programs no longer
/// use.
#[test]
fn cidr_entries_of_an_older_release_are_upgraded_when_the_programs_are_switched() {
    let cgroup = Cgroup::new("agent-upgrade");
    let pins = BpfPins::new("agent-upgrade");
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let mut args = vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin];
    args.extend(["-u", "1337", "-i", "*", "-x", "192.0.2.0/24"]);
    let pod = Pod::new("agent-upgrade");
    ok(testkit::capture(&pod.pod, &args), "capture");
    let (sidecar, remote) = listening(&pod, &cgroup);
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote), "remote", "excluded by -x");

    // The old layout: the kind big-endian in bytes 4 to 7, no family.
    let data = MapData::from_pin(pins.path().join(names::CIDRS)).unwrap();
    let mut cidrs: LpmTrie<_, CidrKeyData, u8> = Map::from_map_data(data).unwrap().try_into().unwrap();
    let keys: Vec<_> = cidrs.keys().map(Result::unwrap).collect();
    for key in keys {
        let data = key.data();
        let old = CidrKeyData {
            kind: 0,
            family: 0,
            _zero: [0, data.kind],
            ..data
        };
        cidrs.remove(&key).unwrap();
        cidrs
            .insert(&aya::maps::lpm_trie::Key::new(key.prefix_len(), old), 1, 0)
            .unwrap();
    }
    assert_eq!(
        lands(&pod, &cgroup, &sidecar, &remote),
        "sidecar",
        "old keys are not matched"
    );
    // Nor did an older release pin the id counter: that is how a load knows it upgrades.
    std::fs::remove_file(pins.path().join(names::CONFIG_IDS)).unwrap();
    // It pinned maps the programs no longer use (stand-ins here: another map pinned under their names).
    for name in names::RETIRED {
        MapData::from_pin(pins.path().join(names::ORIG_BY_ADDR))
            .unwrap()
            .pin(pins.path().join(name))
            .unwrap();
    }

    let agent = Agent::start("upgrade", &pins, &cgroup);
    assert!(
        cidrs.keys().map(Result::unwrap).all(|k| k.data().kind != 0),
        "old keys left: {}",
        agent.log()
    );
    for name in names::RETIRED {
        assert!(!pins.path().join(name).exists(), "{name} still pinned");
    }
    assert_eq!(
        lands(&pod, &cgroup, &sidecar, &remote),
        "remote",
        "excluded by -x again"
    );
}

/// One pod for the inbound test: its namespaces, its proxy's inbound listener (once started) and its app.
struct InboundPod {
    pod: Pod,
    proxy: Option<Listeners>,
    app: Listeners,
}

impl InboundPod {
    fn new(tag: &str) -> InboundPod {
        let pod = Pod::new(tag);
        let app = Listeners::start(&pod.pod, None, None, &[sa(Ipv4Addr::UNSPECIFIED, 8080)]);
        InboundPod { pod, proxy: None, app }
    }

    /// Starts the proxy's inbound listener, in the agent's cgroup.
    fn start_proxy(&mut self, cgroup: &Cgroup) {
        let addr = sa(Ipv4Addr::UNSPECIFIED, 15006);
        self.proxy = Some(Listeners::start(&self.pod.pod, Some(cgroup), None, &[addr]));
    }

    /// Where a connection from the other end of the wire to the app's port lands: the pod's own proxy
    /// (with the original destination) or the app.
    fn inbound_lands(&self) -> &'static str {
        let dst = sa(POD_V4, 8080);
        connect_as(&self.pod.remote, None, APP, dst).unwrap_or_else(|e| panic!("connect: {e}"));
        let proxy = self.proxy.as_ref().expect("the proxy is started");
        accepted_by(dst, ("proxy", proxy), ("app", &self.app))
    }
}

#[test]
fn each_pod_gets_its_own_inbound_capture_and_a_released_pods_copy_serves_no_one() {
    // sk_lookup cannot tell namespaces apart: each pod's copy is bound to it by slot, from copies the agent
    // loaded ahead. Each pod's inbound must reach its own proxy, through adds, removes and updates.
    let cgroup = Cgroup::new("agent-in");
    let pins = BpfPins::new("agent-in");
    let agent = Agent::start("inbound", &pins, &cgroup);
    let mut pods: Vec<InboundPod> = ["agin-a", "agin-b", "agin-c"].map(InboundPod::new).into();
    let ids = ["default/a", "default/b", "default/c"];
    let netns: Vec<PathBuf> = pods.iter().map(|p| p.pod.pod.path()).collect();
    let add = |i: usize, flags: &[&str]| ok(agent.add(ids[i], &netns[i], flags), "pod add");
    // a and b: the proxy listens before the pod is added (found by the registration); c: after (found by
    // sockops).
    pods[0].start_proxy(&cgroup);
    pods[1].start_proxy(&cgroup);
    add(0, INJECTOR_DEFAULT_FLAGS);
    add(1, INJECTOR_DEFAULT_FLAGS);
    add(2, INJECTOR_DEFAULT_FLAGS);
    pods[2].start_proxy(&cgroup);
    let lands = |pods: &[InboundPod]| pods.iter().map(InboundPod::inbound_lands).collect::<Vec<_>>();
    assert_eq!(lands(&pods), ["proxy", "proxy", "proxy"], "a, b and c added");

    ok(agent.pod(&["remove", ids[0]]), "pod remove");
    assert_eq!(lands(&pods), ["app", "proxy", "proxy"], "a removed");

    // b again with other flags: only port 9090 captured now, through the copy it already has.
    let mut only_9090 = INJECTOR_DEFAULT_FLAGS.to_vec();
    let b = only_9090.iter().position(|f| *f == "-b").unwrap();
    only_9090[b + 1] = "9090";
    add(1, &only_9090);
    assert_eq!(lands(&pods), ["app", "app", "proxy"], "b updated");

    // a back, with the slot it freed or another one.
    add(0, INJECTOR_DEFAULT_FLAGS);
    assert_eq!(lands(&pods), ["proxy", "app", "proxy"], "a added again");

    let metrics = agent.http_get("/metrics").expect("metrics");
    for id in [ids[0], ids[2]] {
        let inbound = metrics
            .lines()
            .find(|l| l.contains(&format!("pod=\"{id}\"")) && l.contains("event=\"inbound\""))
            .unwrap_or_else(|| panic!("no inbound counter for {id} in:\n{metrics}"));
        let n: u64 = inbound.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 1, "{inbound}");
    }
}

#[test]
fn the_agent_killed_and_restarted_20_times_under_load_drops_and_misses_nothing() {
    const RESTARTS: u32 = 20;
    /// The load's rate must be at least this (divided by the time scale in an emulated CPU).
    const MIN_RATE: f64 = 200.0;
    /// Connections per probe process, and the pause between batches: several hundred connections/s.
    const BATCH: u32 = 50;
    const PAUSE: Duration = Duration::from_millis(20);
    let pod = Pod::new("restart");
    let cgroup = Cgroup::new("restart");
    let pins = BpfPins::new("restart");
    let mut agent = Agent::start("restart", &pins, &cgroup);
    let (sidecar, remote) = listening(&pod, &cgroup);
    ok(
        agent.add("default/app", &pod.pod.path(), INJECTOR_DEFAULT_FLAGS),
        "pod add",
    );
    let before = (agent.list(), status(&pod.pod, &pins));

    // The load: batches of connections from the app while the agent is killed and restarted, counting
    // what fails.
    // Fewer in an emulated CPU, where each start verifies the programs for many seconds.
    let restarts = (RESTARTS / testkit::time_scale()).max(2);
    let stop = AtomicBool::new(false);
    let (made, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    let elapsed = std::thread::scope(|scope| {
        scope.spawn(|| {
            let deadline = Instant::now() + testkit::patient(Duration::from_secs(300));
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let how = Connect {
                    count: BATCH,
                    ..Connect::default()
                };
                match connect_with(&pod.pod, Some(&cgroup), APP, sa(REMOTE_V4, 8080), how) {
                    Ok(_) => made.fetch_add(u64::from(BATCH), Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("load: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                std::thread::sleep(PAUSE);
            }
        });
        for _ in 0..restarts {
            agent.kill();
            std::thread::sleep(Duration::from_millis(100));
            agent.restart();
        }
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        elapsed
    });
    let made = made.load(Ordering::Relaxed);
    let rate = made as f64 / elapsed.as_secs_f64();
    eprintln!("{restarts} restarts in {elapsed:?}; {made} connections ({rate:.0}/s)");

    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed connection batches");
    let min_rate = MIN_RATE / f64::from(testkit::time_scale());
    assert!(rate >= min_rate, "the load ran at only {rate:.0} connections/s");
    // Every connection reached the sidecar (captured), none the remote server directly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut captured = 0;
    while (captured as u64) < made && Instant::now() < deadline {
        for a in sidecar.drain() {
            assert_eq!(a.original_dst, Some(sa(REMOTE_V4, 8080)));
            captured += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(captured as u64, made, "captured connections");
    assert_eq!(remote.drain().len(), 0, "uncaptured connections");
    assert_eq!(
        (agent.list(), status(&pod.pod, &pins)),
        before,
        "state after the restarts"
    );
}

/// `capture status` without its counters: which namespaces are registered, with which flags.
fn status(ns: &Netns, pins: &BpfPins) -> String {
    let out = testkit::capture(
        ns,
        &[
            "status",
            "--backend",
            "ebpf",
            "--pin-dir",
            &pins.path().display().to_string(),
        ],
    );
    ok(out, "status")
        .lines()
        .filter(|l| !l.starts_with("  "))
        .collect::<Vec<_>>()
        .join("\n")
}
