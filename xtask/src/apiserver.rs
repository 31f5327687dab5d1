//! A real Kubernetes API server for the agent's tests: kube-apiserver v1.20.2 built from Debian bookworm's
//! source package, and Debian's etcd. No registry we reach ships a kube-apiserver binary (see
//! `../shared/k8s/kube-apiserver.md`), so it is built here, once per machine, into a machine-wide cache
//! that every clone of the project shares; a fresh machine pays about 13 minutes once.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{checked, setup};

/// The machine-wide cache: outside any clone, so a second clone (or CI's fresh one) finds the build.
const CACHE: &str = "/var/cache/capture/kubernetes-v1.20.2";
/// The version `kube-apiserver --version` prints; anything else in the cache is rebuilt.
const VERSION: &str = "Kubernetes v1.20.2";
/// Debian bookworm's `kubernetes` source package: its orig tarball is the upstream tree with `vendor/`.
const SOURCE_TARBALL: &str = "kubernetes_1.20.5+really1.20.2.orig.tar.gz";
/// Where the tarball sits in a Debian mirror.
const SOURCE_POOL: &str = "pool/main/k/kubernetes";
/// The tarball's SHA-256, checked before anything in it is built.
const SOURCE_SHA256: &str = "b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc";
/// The tree's top directory in the tarball.
const SOURCE_DIR: &str = "kubernetes-1.20.2";
/// Debian packages the build needs: Go 1.19 and the tools kubernetes' Makefile calls.
const BUILD_PACKAGES: &[&str] = &["golang-go", "rsync", "make", "curl"];
/// The vendored reflect2 1.0.1 crashes under Go ≥ 1.18 (SIGSEGV in `mapiternext` the first time a custom
/// resource is written); Debian's 1.0.2 package replaces its sources.
const REFLECT2_PACKAGE: &str = "golang-github-modern-go-reflect2-dev";
const REFLECT2_VENDORED: &str = "vendor/github.com/modern-go/reflect2";
const REFLECT2_IN_PACKAGE: &str = "usr/share/gocode/src/github.com/modern-go/reflect2";
/// Debian's etcd (3.4): the API server's store.
const ETCD_PACKAGE: &str = "etcd-server";

/// The cached binaries.
pub struct ApiServer {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
}

/// The cached binaries' paths (whether or not they are there yet).
pub fn binaries() -> ApiServer {
    ApiServer {
        kube_apiserver: Path::new(CACHE).join("kube-apiserver"),
        etcd: Path::new(CACHE).join("etcd"),
    }
}

/// Makes sure the cache holds a kube-apiserver of [`VERSION`] and an etcd, building or fetching what is
/// missing.
pub fn ensure() -> Result<ApiServer> {
    let bins = binaries();
    let etcd_ok = || runs(Command::new(&bins.etcd).arg("--version"), "etcd Version");
    let apiserver_ok = || runs(Command::new(&bins.kube_apiserver).arg("--version"), VERSION);
    if etcd_ok() && apiserver_ok() {
        return Ok(bins);
    }
    // The cache is the machine's: two clones set up at once would share one work directory, each
    // removing the other's. The second waits, then finds what the first made.
    std::fs::create_dir_all(CACHE).with_context(|| format!("create {CACHE}"))?;
    let lock_path = Path::new(CACHE).join(".lock");
    let lock = std::fs::File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        println!("setup: another setup is building into {CACHE}; waiting for it");
        lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
    }
    if !etcd_ok() {
        fetch_etcd(&bins.etcd)?;
    }
    if !apiserver_ok() {
        build_apiserver(&bins.kube_apiserver)?;
    }
    Ok(bins)
}

/// Whether `cmd` exits 0 and prints `expected`.
fn runs(cmd: &mut Command, expected: &str) -> bool {
    cmd.output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(expected))
}

/// A fresh work directory `name` in the cache.
fn work_dir(name: &str) -> Result<PathBuf> {
    let dir = Path::new(CACHE).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

fn fetch_etcd(dest: &Path) -> Result<()> {
    let dir = work_dir("etcd-download")?;
    setup::unpack_deb(ETCD_PACKAGE, &[], &dir)?;
    std::fs::rename(dir.join("root/usr/bin/etcd"), dest).with_context(|| format!("install {}", dest.display()))?;
    std::fs::remove_dir_all(&dir)?;
    println!("setup: installed etcd ({ETCD_PACKAGE}, Debian) in {CACHE}");
    Ok(())
}

/// The Debian mirrors this machine's apt uses (`URIs:` of deb822 sources, the URI of one-line `deb`
/// entries), where the source tarball is looked for.
fn mirrors() -> Vec<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    let mut uris = Vec::new();
    for file in files {
        let deb822 = match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => true,
            Some("list") => false,
            // Not an apt source file (`.disabled`, backups).
            _ => continue,
        };
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            let uri = if deb822 {
                line.strip_prefix("URIs:").map(str::trim)
            } else {
                // `deb [options] URI suite components`
                line.strip_prefix("deb ")
                    .and_then(|rest| rest.split_whitespace().find(|w| w.contains("://")))
            };
            uris.extend(uri.into_iter().flat_map(str::split_whitespace).map(str::to_owned));
        }
    }
    uris.dedup();
    uris
}

/// Downloads the source tarball from the first mirror that has it, and checks its SHA-256.
fn download_source(dir: &Path) -> Result<PathBuf> {
    let tarball = dir.join(SOURCE_TARBALL);
    for mirror in mirrors() {
        let url = format!("{}/{SOURCE_POOL}/{SOURCE_TARBALL}", mirror.trim_end_matches('/'));
        let ok = Command::new("curl")
            .args(["-fsSL", "-o"])
            .arg(&tarball)
            .arg(&url)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let sum = setup::sha256(&tarball).unwrap_or_default();
            if sum != SOURCE_SHA256 {
                bail!("{url}: SHA-256 {sum}, expected {SOURCE_SHA256}");
            }
            return Ok(tarball);
        }
    }
    bail!("no Debian mirror of this machine's apt sources has {SOURCE_POOL}/{SOURCE_TARBALL}")
}

fn build_apiserver(dest: &Path) -> Result<()> {
    let started = Instant::now();
    println!(
        "setup: building kube-apiserver v1.20.2 from Debian's source package into {CACHE} (about 13 minutes, once per machine)"
    );
    setup::install_debs(BUILD_PACKAGES)?;
    let dir = work_dir("build")?;
    let tarball = download_source(&dir)?;
    println!("setup: kube-apiserver: source downloaded, SHA-256 checked; unpacking");
    checked(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&dir))?;
    let tree = dir.join(SOURCE_DIR);

    let reflect2 = dir.join("reflect2");
    std::fs::create_dir_all(&reflect2)?;
    setup::unpack_deb(REFLECT2_PACKAGE, &[], &reflect2)?;
    replace_go_sources(
        &reflect2.join("root").join(REFLECT2_IN_PACKAGE),
        &tree.join(REFLECT2_VENDORED),
    )?;

    println!("setup: kube-apiserver: compiling (make WHAT=cmd/kube-apiserver)");
    let mut make = Command::new("make");
    make.arg("WHAT=cmd/kube-apiserver")
        .current_dir(&tree)
        .env("CGO_ENABLED", "0")
        .env("GOPATH", dir.join("gopath"))
        .env("HOME", dir.join("home"))
        // Everything is vendored: the build must not reach for a module proxy.
        .env("GOPROXY", "off");
    with_heartbeat(started, || checked(&mut make))?;
    let built = tree.join("_output/bin/kube-apiserver");
    if !runs(Command::new(&built).arg("--version"), VERSION) {
        bail!("{} does not report {VERSION}", built.display());
    }
    std::fs::rename(&built, dest).with_context(|| format!("install {}", dest.display()))?;
    std::fs::remove_dir_all(&dir)?;
    println!(
        "setup: built kube-apiserver v1.20.2 in {} min",
        started.elapsed().as_secs() / 60
    );
    Ok(())
}

/// Replaces the `*.go` and `*.s` files of `vendored` with those of `from`.
fn replace_go_sources(from: &Path, vendored: &Path) -> Result<()> {
    let is_source = |p: &Path| p.extension().is_some_and(|e| e == "go" || e == "s");
    for entry in std::fs::read_dir(vendored).with_context(|| format!("read {}", vendored.display()))? {
        let path = entry?.path();
        if is_source(&path) {
            std::fs::remove_file(&path)?;
        }
    }
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let path = entry?.path();
        if is_source(&path) {
            std::fs::copy(&path, vendored.join(path.file_name().unwrap_or_default()))?;
        }
    }
    Ok(())
}

/// Runs `f`, printing a line every minute it takes, so a long build does not look hung.
fn with_heartbeat<T>(started: Instant, f: impl FnOnce() -> T) -> T {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut last = Instant::now();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.elapsed() >= Duration::from_secs(60) {
                    last = Instant::now();
                    println!(
                        "setup: kube-apiserver: still compiling ({} min)",
                        started.elapsed().as_secs() / 60
                    );
                    let _ = std::io::stdout().flush();
                }
            }
        });
        let out = f();
        done.store(true, Ordering::Relaxed);
        out
    })
}
