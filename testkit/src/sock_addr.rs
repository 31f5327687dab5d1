//! Hand-assembled cgroup sock_addr programs (connect, sendmsg, recvmsg hooks) for the tests and the bench:
//! the instruction encoding, loading with bpf(2) and attaching by BPF link to a cgroup.
//!
//! There is no second eBPF crate to build such programs from, and aya 0.14 loads programs only from an
//! object file, so a program of a few instructions is loaded with bpf(2) directly (`BPF_PROG_LOAD`) and
//! attached with a BPF link (the loader's own `capture::ebpf::sys::link_create`, Linux 5.7): a link detaches when its last descriptor
//! closes, so the program leaves the cgroup when [`Attached`] drops, and also if the test process dies.
//! [`attach_legacy`] attaches the older way (`BPF_PROG_ATTACH` with flags, as Cilium before 1.14 did),
//! which only an explicit detach (or the cgroup's removal) undoes: [`Legacy`] detaches on drop.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};

/// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`.
const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// The hooks are the loader's own attach types (`Connect4`, `Connect6`, `Sendmsg4`, `Recvmsg4` here), and
/// attaching by link is the loader's own `link_create`: only loading raw instructions and the older
/// `BPF_PROG_ATTACH` with flags are the test kit's.
pub use capture::ebpf::sys::{AttachType as Hook, BPF_F_ALLOW_OVERRIDE};

/// Offsets in `struct bpf_sock_addr`, the programs' context (in r1 on entry).
pub mod ctx {
    /// `user_ip4`: the IPv4 address, network order.
    pub const USER_IP4: i16 = 4;
    /// `user_ip6`: the IPv6 address, four network-order words.
    pub const USER_IP6: i16 = 8;
    /// `user_port`: the port, network order in the low 16 bits.
    pub const USER_PORT: i16 = 24;
}

/// A program that lets every call proceed and does nothing else.
pub const PROCEED: [Insn; 2] = [Insn::mov64_r0(1), Insn::exit()];

/// One eBPF instruction (`struct bpf_insn`): opcode, registers (dst low nibble, src high), offset, immediate.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    /// `r0 = imm` (BPF_ALU64 | BPF_MOV | BPF_K). With 1: a cgroup hook's verdict "proceed".
    pub const fn mov64_r0(imm: i32) -> Insn {
        Insn::new(0xb7, 0, 0, 0, imm)
    }

    /// `exit` (BPF_JMP | BPF_EXIT): return r0.
    pub const fn exit() -> Insn {
        Insn::new(0x95, 0, 0, 0, 0)
    }

    /// `wDST = imm` (BPF_ALU | BPF_MOV | BPF_K): a 32-bit constant, the upper half zeroed.
    pub const fn mov32(dst: u8, imm: u32) -> Insn {
        Insn::new(0xb4, dst, 0, 0, imm as i32)
    }

    /// `rDST = *(u32 *)(rSRC + off)` (BPF_LDX | BPF_MEM | BPF_W).
    pub const fn load32(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x61, dst, src, off, 0)
    }

    /// `*(u32 *)(rDST + off) = rSRC` (BPF_STX | BPF_MEM | BPF_W). (A context field cannot be written from an
    /// immediate: the verifier refuses BPF_ST to the context.)
    pub const fn store32(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x63, dst, src, off, 0)
    }

    /// `if wDST != imm goto +off` (BPF_JMP32 | BPF_JNE | BPF_K): compares 32 bits, so an address whose top
    /// bit is set is not sign-extended against a 64-bit register.
    pub const fn jne32(dst: u8, imm: u32, off: i16) -> Insn {
        Insn::new(0x56, dst, 0, off, imm as i32)
    }

    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        }
    }
}

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

/// The `BPF_PROG_ATTACH` / `BPF_PROG_DETACH` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// bpf(2) with `attr`; what it returned.
fn bpf_unit<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised #[repr(C)] struct of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// bpf(2) with `attr`; the new descriptor it returns.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf_unit(cmd, attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A program attached to one cgroup while this lives.
pub struct Attached {
    // Declared first, so closed first: the program leaves the cgroup, then the program is freed.
    _link: OwnedFd,
    _program: OwnedFd,
}

/// Loads `program` for `hook` under `name` (at most 15 bytes: what `bpftool prog` and capture's errors
/// show) and attaches it to `cgroup` by link. Callers pass only cgroups they made: attached anywhere else
/// it would run for other processes' sockets.
pub fn attach(program: &[Insn], name: &str, hook: Hook, cgroup: &Path) -> Result<Attached> {
    let (loaded, dir) = (load(program, name, hook)?, open(cgroup)?);
    let link = capture::ebpf::sys::link_create(loaded.as_fd(), dir.as_fd(), hook)
        .with_context(|| format!("attach {name} ({hook:?}) to {} (Linux 5.7)", cgroup.display()))?;
    Ok(Attached {
        _link: link,
        _program: loaded,
    })
}

/// A program attached with `BPF_PROG_ATTACH`; detached on drop.
pub struct Legacy {
    cgroup: std::fs::File,
    program: OwnedFd,
    hook: Hook,
}

/// As [`attach`], with `BPF_PROG_ATTACH` and `flags` (0: exclusive, the kernel refuses any program below;
/// [`BPF_F_ALLOW_OVERRIDE`]: one below replaces it there).
pub fn attach_legacy(program: &[Insn], name: &str, hook: Hook, cgroup: &Path, flags: u32) -> Result<Legacy> {
    let legacy = Legacy {
        program: load(program, name, hook)?,
        cgroup: open(cgroup)?,
        hook,
    };
    legacy
        .call(BPF_PROG_ATTACH, flags)
        .with_context(|| format!("BPF_PROG_ATTACH of {name} ({hook:?}) to {}", cgroup.display()))?;
    Ok(legacy)
}

impl Legacy {
    /// `BPF_PROG_ATTACH` or `BPF_PROG_DETACH` of this program at this cgroup.
    fn call(&self, cmd: libc::c_long, flags: u32) -> io::Result<libc::c_long> {
        let mut attr = ProgAttachAttr {
            target_fd: self.cgroup.as_raw_fd() as u32,
            attach_bpf_fd: self.program.as_raw_fd() as u32,
            attach_type: self.hook as u32,
            attach_flags: flags,
        };
        bpf_unit(cmd, &mut attr)
    }
}

impl Drop for Legacy {
    fn drop(&mut self) {
        let _ = self.call(BPF_PROG_DETACH, 0);
    }
}

fn open(cgroup: &Path) -> Result<std::fs::File> {
    std::fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))
}

/// Loads `program` for `hook` under `name`.
fn load(program: &[Insn], name: &str, hook: Hook) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    anyhow::ensure!(name.len() < prog_name.len(), "program name {name:?} is over 15 bytes");
    prog_name[..name.len()].copy_from_slice(name.as_bytes());
    let mut load = ProgLoadAttr {
        prog_type: PROG_TYPE_CGROUP_SOCK_ADDR,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        expected_attach_type: hook as u32,
        ..ProgLoadAttr::default()
    };
    bpf(BPF_PROG_LOAD, &mut load).with_context(|| format!("BPF_PROG_LOAD of {name} ({hook:?})"))
}
