//! The Kubernetes pod source against recorded API responses: a small HTTP server on 127.0.0.1 serves a
//! pod list for `spec.nodeName=node-1`, then watch events (ADDED, MODIFIED, DELETED), then an expired
//! watch (410) that makes the watcher list again; pods' network namespaces are found in a fake /proc tree.
//! The test asserts every `SourceEvent` the source emits, in order.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use capture::agent::{
    PodSpec, SourceEvent,
    kube::{KubeSource, watch},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Notify, mpsc},
};

const NODE: &str = "node-1";
const A: &str = "shop/reviews"; // cni-native-sidecar: found in /proc from the start (systemd driver)
const B: &str = "shop/details"; // cni-ranges-and-ports: its sandbox appears later
const D: &str = "shop/frontend"; // cni-tproxy: added by the watch (cgroupfs driver)
const E: &str = "shop/legacy"; // cni-proxy-uid: appears in the second list

/// A throwaway /proc-like tree, removed on drop.
struct FakeProc(PathBuf);

impl FakeProc {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("capture-fake-proc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let proc = Self(dir);
        proc.process(1, "0::/init.scope");
        proc
    }

    /// A process with this cgroup line and a namespace file of its own.
    fn process(&self, pid: u32, cgroup: &str) {
        let dir = self.0.join(pid.to_string());
        std::fs::create_dir_all(dir.join("ns")).unwrap();
        std::fs::write(dir.join("cgroup"), format!("{cgroup}\n")).unwrap();
        std::fs::write(dir.join("ns/net"), "").unwrap();
    }

    fn net(&self, pid: u32) -> PathBuf {
        self.0.join(format!("{pid}/ns/net"))
    }
}

impl Drop for FakeProc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn systemd_cgroup(uid: &str) -> String {
    let uid = uid.replace('-', "_");
    format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-0a1b2c.scope")
}

fn cgroupfs_cgroup(uid: &str) -> String {
    format!("0::/kubepods/burstable/pod{uid}/0a1b2c3d")
}

fn pod(name: &str, resource_version: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pods")
        .join(format!("{name}.json"));
    let mut pod: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    pod["metadata"]["resourceVersion"] = json!(resource_version);
    pod
}

fn uid(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().unwrap().to_string()
}

fn list(resource_version: &str, items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": resource_version}, "items": items})
        .to_string()
}

fn event(kind: &str, object: Value) -> String {
    json!({"type": kind, "object": object}).to_string()
}

/// What the server answers, in order: lists to list requests, event batches to watch requests (the last
/// batch's stream stays open); the first watch waits for `release` before it answers.
struct Script {
    lists: Vec<String>,
    watches: Vec<Vec<String>>,
    requests: Vec<String>,
    watched: bool,
}

async fn serve(listener: TcpListener, script: Arc<Mutex<Script>>, release: Arc<Notify>) {
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::spawn(connection(stream, script.clone(), release.clone()));
    }
}

async fn connection(mut stream: TcpStream, script: Arc<Mutex<Script>>, release: Arc<Notify>) {
    let mut buf = Vec::new();
    loop {
        // One request head (GETs have no body).
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end + 4);
                break head;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
        script.lock().unwrap().requests.push(target.clone());
        if !target.contains("watch=true") {
            let body = {
                let mut s = script.lock().unwrap();
                if s.lists.is_empty() {
                    list("999", vec![])
                } else {
                    s.lists.remove(0)
                }
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            continue;
        }
        let first = !std::mem::replace(&mut script.lock().unwrap().watched, true);
        if first {
            release.notified().await;
        }
        let (events, last) = {
            let mut s = script.lock().unwrap();
            if s.watches.is_empty() {
                (Vec::new(), true)
            } else {
                (s.watches.remove(0), s.watches.is_empty())
            }
        };
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for event in events {
            let line = format!("{event}\n");
            let chunk = format!("{:x}\r\n{line}\r\n", line.len());
            if stream.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        if last {
            // A quiet watch: hold the stream open until the test ends.
            std::future::pending::<()>().await;
        }
        if stream.write_all(b"0\r\n\r\n").await.is_err() {
            return;
        }
    }
}

async fn next(rx: &mut mpsc::Receiver<SourceEvent>) -> SourceEvent {
    match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the source stopped"),
        Err(_) => panic!("no event within 20 s"),
    }
}

fn upsert(id: &str, netns: PathBuf, pod: &Value) -> SourceEvent {
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod.clone()).unwrap();
    let flags = capture::agent::annotations::flags(&typed).unwrap();
    SourceEvent::Upsert(PodSpec {
        id: id.into(),
        netns,
        flags,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_emits_upserts_removes_and_syncs() {
    let proc = FakeProc::new();
    let a = pod("cni-native-sidecar", "101");
    let b = pod("cni-ranges-and-ports", "102");
    let c = pod("no-sidecar", "103");
    let d = pod("cni-tproxy", "110");
    let e = pod("cni-proxy-uid", "120");
    proc.process(4242, &systemd_cgroup(&uid(&a)));
    proc.process(4300, &systemd_cgroup(&uid(&a))); // the same pod's app: the lowest pid is taken
    proc.process(5000, &cgroupfs_cgroup(&uid(&d)));
    proc.process(6000, &systemd_cgroup(&uid(&e)));
    proc.process(7000, "0::/system.slice/containerd.service");

    // A's annotations change (a new outbound exclusion); B opts out with the injection label.
    let mut a2 = a.clone();
    a2["metadata"]["resourceVersion"] = json!("111");
    a2["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeOutboundPorts"] = json!("6379");
    let mut b2 = b.clone();
    b2["metadata"]["resourceVersion"] = json!("112");
    b2["metadata"]["labels"]["sidecar.istio.io/inject"] = json!("false");
    let expired = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 100 (113)", "reason": "Expired", "code": 410});

    let script = Arc::new(Mutex::new(Script {
        lists: vec![
            list("100", vec![a.clone(), b.clone(), c]),
            list("130", vec![a2.clone(), e.clone()]),
        ],
        watches: vec![
            vec![
                event("ADDED", d.clone()),
                event("MODIFIED", a2.clone()),
                event("MODIFIED", b2),
            ],
            vec![event("DELETED", d.clone())],
            vec![event("ERROR", expired)],
            vec![],
        ],
        requests: Vec::new(),
        watched: false,
    }));
    let release = Arc::new(Notify::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(serve(listener, script.clone(), release.clone()));

    let (tx, mut rx) = mpsc::channel(16);
    let config = KubeSource {
        node_name: NODE.into(),
        proc_root: proc.0.clone(),
        rescan: Duration::from_millis(100),
        kube_config: Some(kube::Config::new(url.parse().unwrap())),
    };
    let source = tokio::spawn(watch(config, tx));

    // The first list: A is found; B waits for its sandbox; the pod without a sidecar is not mentioned.
    assert_eq!(next(&mut rx).await, upsert(A, proc.net(4242), &a));
    assert_eq!(next(&mut rx).await, SourceEvent::Synced(vec![B.into(), A.into()]));
    // B's sandbox starts: the rescan finds it.
    proc.process(4400, &systemd_cgroup(&uid(&b)));
    assert_eq!(next(&mut rx).await, upsert(B, proc.net(4400), &b));

    // The watch: D added, A's flags changed, B no longer wants capture. Events received together are
    // applied before one /proc scan looks for their new pods, so D's upsert may come after the others.
    release.notify_one();
    let mut watched = vec![next(&mut rx).await, next(&mut rx).await, next(&mut rx).await];
    let mut expected = vec![
        upsert(D, proc.net(5000), &d),
        upsert(A, proc.net(4242), &a2),
        SourceEvent::Remove(B.into()),
    ];
    let key = |e: &SourceEvent| format!("{e:?}");
    watched.sort_by_key(key);
    expected.sort_by_key(key);
    assert_eq!(watched, expected);
    // The next watch: D deleted.
    assert_eq!(next(&mut rx).await, SourceEvent::Remove(D.into()));

    // The next watch expires (410): the watcher lists again; E is new, A unchanged, no upsert for it.
    assert_eq!(next(&mut rx).await, upsert(E, proc.net(6000), &e));
    assert_eq!(next(&mut rx).await, SourceEvent::Synced(vec![E.into(), A.into()]));

    // A's sandbox process goes away and comes back with a new pid: the source follows it.
    std::fs::remove_dir_all(proc.0.join("4300")).unwrap();
    std::fs::remove_dir_all(proc.0.join("4242")).unwrap();
    proc.process(4500, &systemd_cgroup(&uid(&a)));
    assert_eq!(next(&mut rx).await, upsert(A, proc.net(4500), &a2));

    let requests = script.lock().unwrap().requests.clone();
    assert!(requests.len() >= 4, "{requests:?}");
    for target in &requests {
        assert!(target.starts_with("/api/v1/pods?"), "{target}");
        assert!(target.contains("fieldSelector=spec.nodeName%3Dnode-1"), "{target}");
    }
    drop(rx);
    source.abort();
    server.abort();
}

/// In a cluster the API server is HTTPS: the client's TLS stack (rustls with ring) must build without a
/// process-wide crypto provider installed first (the connection itself is never made here).
#[tokio::test]
async fn https_client_builds() {
    let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    kube::Client::try_from(config).expect("an HTTPS client");
}
