//! The `capture` binary under test: where it is (and that it is not older than its sources), running it in
//! a namespace, istio's validation mode, and the injector's default flags.

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use crate::{Cgroup, Netns, run_as, runnable};

/// The `capture` binary under test: `$CAPTURE_BIN` (set by `cargo xtask test`), else the one cargo built
/// next to this test executable; where every user can run it (see [`runnable`]), since validation runs it
/// as the app and the proxy.
pub fn capture_bin() -> PathBuf {
    runnable::runnable_by_all(&built_capture())
}

/// `$CAPTURE_BIN`, else the `capture` cargo built next to this test executable: where it was built.
pub(crate) fn built_capture() -> PathBuf {
    if let Some(bin) = std::env::var_os("CAPTURE_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/capture
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("capture"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo xtask test`, or `cargo build -p capture-userspace` first",
        bin.display()
    );
    // `cargo test -p tests` builds the tests, not the `capture` binary they run: one older than its sources
    // would test old code and pass or fail for the wrong reason. Checked once per test process.
    static FRESH: std::sync::Once = std::sync::Once::new();
    FRESH.call_once(|| {
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .expect("mtime of capture");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for crate_dir in ["capture-userspace/src", "capture-ebpf/src", "capture-common/src"] {
            if let Some(newer) = newer_file(&workspace.join(crate_dir), built) {
                panic!(
                    "{} is older than {}: run `cargo xtask test`, or `cargo build` first",
                    bin.display(),
                    newer.display()
                );
            }
        }
    });
    bin
}

/// A file under `dir` modified after `than`, if any.
fn newer_file(dir: &Path, than: std::time::SystemTime) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            if let Some(newer) = newer_file(&path, than) {
                return Some(newer);
            }
        } else if meta.modified().is_ok_and(|m| m > than) {
            return Some(path);
        }
    }
    None
}

/// Runs `capture ARGS` inside `ns` with a clean environment (only PATH), returning its output.
pub fn capture(ns: &Netns, args: &[&str]) -> Output {
    capture_with_env(ns, args, &[])
}

/// As [`capture`], with extra environment variables.
pub fn capture_with_env(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = ns.command(capture_bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run capture")
}

/// istio's CNI-mode validation: `capture <applied> --run-validation --skip-rule-apply` inside `ns` (and
/// `cgroup`, for the eBPF backend) as `ids`; asserts exit 0 for the proxy user and 126 (istio's code) for
/// the app user.
pub fn assert_validation(ns: &Netns, cgroup: Option<&Cgroup>, applied: &[&str], proxy: (u32, u32), app: (u32, u32)) {
    let validate = |ids| {
        let mut cmd = ns.command(capture_bin());
        cmd.args(applied)
            .args(["--run-validation", "--skip-rule-apply", "--probe-timeout", "2s"])
            .env_clear();
        if let Some(cgroup) = cgroup {
            cgroup.enter(&mut cmd);
        }
        run_as(&mut cmd, ids);
        cmd.output().expect("run capture --run-validation")
    };
    for (ids, code, who) in [(proxy, 0, "the proxy user"), (app, 126, "the app user")] {
        let out = validate(ids);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "validation as {who}: {stderr}");
        if code != 0 {
            assert!(stderr.contains("validation failed"), "{stderr}");
        }
    }
}

/// The injector's default flags (`docs/istio-rules.md#how-istio-iptables-is-invoked`): `-p 15001 -z 15006 -u 1337
/// -m REDIRECT -i '*' -x "" -b '*' -d 15090,15021,15020`.
pub const INJECTOR_DEFAULT_FLAGS: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];
