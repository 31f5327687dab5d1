//! A resolv.conf for a test's pod ([`ResolvConf`]), for `--redirect-dns --resolv-conf`: the servers whose
//! DNS capture takes to the DNS proxy. Removed on drop.

use std::path::{Path, PathBuf};

use crate::unique;

/// A resolv.conf file listing some name servers, removed on drop.
pub struct ResolvConf(PathBuf);

impl ResolvConf {
    /// Writes one `nameserver` line per server.
    pub fn new(tag: &str, servers: &[&str]) -> ResolvConf {
        let path = std::env::temp_dir().join(format!("{}-resolv.conf", unique(tag)));
        let text: String = servers.iter().map(|s| format!("nameserver {s}\n")).collect();
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        ResolvConf(path)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `--resolv-conf PATH`, for a flags string.
    pub fn flag(&self) -> String {
        format!("--resolv-conf {}", self.0.display())
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
