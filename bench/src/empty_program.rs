//! The cgroup connect4 hook's own cost: a program that does nothing (`r0 = 1; exit`: let the connect
//! proceed) attached to one of the bench's cgroups. A connect() in that cgroup then pays for entering the
//! hook and running a program, and nothing else: the floor under which no connect4 program can go.
//!
//! There is no second eBPF crate to build it from, and aya 0.14 loads programs only from an object file,
//! so the two instructions are loaded with bpf(2) directly (`BPF_PROG_LOAD`) and attached with a BPF link
//! (`BPF_LINK_CREATE`, Linux 5.7), not `BPF_PROG_ATTACH`: a link detaches when its last descriptor closes,
//! so the program leaves the cgroup when [`EmptyConnect4`] drops, and also if the bench dies.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result, ensure};

use crate::cgroups::Cgroups;

/// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
/// `BPF_CGROUP_INET4_CONNECT`.
const CGROUP_INET4_CONNECT: u32 = 10;

/// One eBPF instruction (`struct bpf_insn`): opcode, registers (dst low nibble, src high), offset, immediate.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// `r0 = 1` (BPF_ALU64 | BPF_MOV | BPF_K): the verdict "proceed"; `exit` (BPF_JMP | BPF_EXIT).
const PROGRAM: [Insn; 2] = [
    Insn {
        code: 0xb7,
        regs: 0,
        off: 0,
        imm: 1,
    },
    Insn {
        code: 0x95,
        regs: 0,
        off: 0,
        imm: 0,
    },
];

/// The `BPF_PROG_LOAD` member of `union bpf_attr`, up to `expected_attach_type` (the kernel takes a shorter
/// attr and treats the rest as zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_LINK_CREATE` member of `union bpf_attr`: program, target (a cgroup directory), attach type,
/// flags.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// bpf(2) with `attr`; the new descriptor it returns.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialised #[repr(C)] struct of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// The empty connect4 program, attached to one cgroup while this lives.
pub struct EmptyConnect4 {
    // Declared first, so closed first: the program leaves the cgroup, then the program is freed.
    _link: OwnedFd,
    _program: OwnedFd,
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
        let license = c"GPL";
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"bench_empty");
        let mut load = ProgLoadAttr {
            prog_type: PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: PROGRAM.len() as u32,
            insns: PROGRAM.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: CGROUP_INET4_CONNECT,
            ..ProgLoadAttr::default()
        };
        let program = bpf(BPF_PROG_LOAD, &mut load).context("BPF_PROG_LOAD of the empty connect4 program")?;
        let dir = std::fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        let mut link = LinkCreateAttr {
            prog_fd: program.as_raw_fd() as u32,
            target_fd: dir.as_raw_fd() as u32,
            attach_type: CGROUP_INET4_CONNECT,
            ..LinkCreateAttr::default()
        };
        let link = bpf(BPF_LINK_CREATE, &mut link)
            .with_context(|| format!("attach the empty connect4 program to {} (Linux 5.7)", cgroup.display()))?;
        Ok(EmptyConnect4 {
            _link: link,
            _program: program,
        })
    }
}
