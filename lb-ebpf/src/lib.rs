//! lb's XDP programs are built as the `lb-ebpf` binary for the BPF target;
//! this empty library lets host tooling (cargo metadata, the build script of
//! lb-userspace) see the crate.
#![no_std]
