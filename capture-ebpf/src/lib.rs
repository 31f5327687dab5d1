//! Nothing but a marker: the programs live in the `capture-ebpf` binary target (src/main.rs); this library
//! target exists so that capture-userspace can name this crate as a build-dependency and be rebuilt when
//! it changes.
#![no_std]
