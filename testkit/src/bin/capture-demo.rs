//! The demo behind `cargo xtask run` (without flags): capture in a throwaway pod, live.
//!
//! A pod namespace (app + sidecar) joined by veth to a "remote" namespace. The sidecar is the test
//! harness's forwarding proxy running as uid 1337; capture is applied with the injector's default flags.
//! Once a second the app calls the remote server, the remote calls the app, and the app calls itself on
//! localhost; every line printed says which listener got the connection and the original destination it
//! read. Everything is removed on exit, after the time limit, or on Ctrl-C.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use testkit::{
    BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Listeners, POD_V4, Pod, REMOTE_V4, capture_with_env, connect_as, sa,
    sidecar::{Forwarded, Sidecar},
};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);
const REMOTE_PORT: u16 = 8080;
const APP_PORT: u16 = 9080;
const ROUND: Duration = Duration::from_secs(1);

/// `capture-demo CAPTURE_BIN BACKEND SECONDS`, as `cargo xtask run` calls it.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, capture, backend, seconds] = args.as_slice() else {
        bail!("usage: capture-demo CAPTURE_BIN BACKEND SECONDS (run it with `cargo xtask run`)");
    };
    let seconds: u64 = seconds.parse().context("SECONDS")?;
    run(Path::new(capture), backend, seconds)
}

/// Runs the demo for at most `seconds`, with the `capture` binary at `capture`, using `backend`.
fn run(capture: &Path, backend: &str, seconds: u64) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::Relaxed)).context("install the Ctrl-C handler")?;
    }
    // SAFETY: set before any thread that reads the environment is started.
    unsafe { std::env::set_var("CAPTURE_BIN", capture) };

    println!("demo: creating a pod namespace and a remote namespace joined by veth ({POD_V4} <-> {REMOTE_V4})");
    let pod = Pod::new("demo");
    // The eBPF backend attaches to a cgroup of its own here, never to the machine's root cgroup: the
    // sidecar (threads of this process) and the app (probe processes) run inside it.
    let cgroup = Cgroup::new("demo");
    let pins = BpfPins::new("demo");
    let _inside = cgroup.enter_self();
    let remote = Listeners::start(&pod.remote, None, None, &[sa(REMOTE_V4, REMOTE_PORT)]);
    let app = Listeners::start(&pod.pod, Some(&cgroup), None, &[sa(Ipv4Addr::UNSPECIFIED, APP_PORT)]);

    let (cgroup_arg, pins_arg) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let mut args = vec!["--backend", backend];
    if backend == "ebpf" {
        args.extend_from_slice(&["--cgroup", &cgroup_arg, "--pin-dir", &pins_arg]);
    }
    args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    println!(
        "demo: capture {}",
        args.iter()
            .map(|a| if a.is_empty() { "''" } else { a })
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = capture_with_env(&pod.pod, &args, &[]);
    if !out.status.success() {
        bail!("capture failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    // The sidecar starts after capture is applied, as Envoy starts after istio-init: the eBPF backend
    // learns the proxy's listening sockets when they start listening.
    let (tx, rx) = mpsc::channel::<Forwarded>();
    let _sidecar = Sidecar::start(&pod.pod, PROXY, &[15001, 15006], 15006, tx);
    println!("demo: capture applied ({backend} backend); sidecar (uid 1337) on 15001 and 15006; Ctrl-C to stop\n");

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        round += 1;
        let calls: [(&str, &testkit::Netns, (u32, u32), SocketAddr); 3] = [
            ("app (uid 1000) -> remote", &pod.pod, APP, sa(REMOTE_V4, REMOTE_PORT)),
            ("remote -> app", &pod.remote, (0, 0), sa(POD_V4, APP_PORT)),
            (
                "app (uid 1000) -> localhost",
                &pod.pod,
                APP,
                sa(Ipv4Addr::LOCALHOST, APP_PORT),
            ),
        ];
        for (what, ns, ids, dst) in calls {
            let in_pod = std::ptr::eq(ns, &pod.pod);
            let outcome = connect_as(ns, in_pod.then_some(&cgroup), ids, dst);
            std::thread::sleep(Duration::from_millis(50));
            let via: Vec<String> = rx
                .try_iter()
                .map(|f| {
                    format!(
                        "sidecar :{} (original destination {})",
                        f.listener,
                        f.original_dst.map_or("unknown".into(), |d| d.to_string())
                    )
                })
                .collect();
            let reached: Vec<String> = remote
                .drain()
                .into_iter()
                .chain(app.drain())
                .map(|a| format!("server :{}", a.listener))
                .collect();
            let path = if via.is_empty() {
                "direct, not captured".to_owned()
            } else {
                format!("captured: {}", via.join(", "))
            };
            match outcome {
                Ok(_) => println!(
                    "[{round:>3}] {what:<30} {dst:<18} {path}; reached {}",
                    reached.join(", ")
                ),
                Err(e) => println!("[{round:>3}] {what:<30} {dst:<18} failed: {e}"),
            }
        }
        std::thread::sleep(ROUND);
    }

    println!("\ndemo: removing capture and the namespaces");
    let mut clean = vec!["clean"];
    clean.extend_from_slice(&args);
    let out = capture_with_env(&pod.pod, &clean, &[]);
    if !out.status.success() {
        eprintln!(
            "demo: capture clean failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
