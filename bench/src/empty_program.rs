//! The cgroup connect4 hook's own cost: a program that does nothing (`r0 = 1; exit`: let the connect
//! proceed) attached to one of the bench's cgroups. A connect() in that cgroup then pays for entering the
//! hook and running a program, and nothing else: the floor under which no connect4 program can go.
//!
//! Loaded and attached by link with the test kit's hand assembler ([`testkit::sock_addr`]), so the program
//! leaves the cgroup when [`EmptyConnect4`] drops, and also if the bench dies.

use std::path::Path;

use anyhow::{Result, ensure};
use testkit::sock_addr::{self, Hook, PROCEED};

use crate::cgroups::Cgroups;

/// The empty connect4 program, attached to one cgroup while this lives.
pub struct EmptyConnect4 {
    _attached: sock_addr::Attached,
}

impl EmptyConnect4 {
    /// Loads the program and attaches it to `cgroup`, which must be a child of the bench's own `cgroups`
    /// (checked): attached anywhere else it would run for other processes' connects.
    pub fn attach(cgroups: &Cgroups, cgroup: &Path) -> Result<EmptyConnect4> {
        ensure!(
            cgroups.owns(cgroup),
            "{}: not a cgroup the bench made; the empty program attaches only there",
            cgroup.display()
        );
        Ok(EmptyConnect4 {
            _attached: sock_addr::attach(&PROCEED, "bench_empty", Hook::Connect4, cgroup)?,
        })
    }
}
