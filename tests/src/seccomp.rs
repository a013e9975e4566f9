//! systemd's `RestrictAddressFamilies=` for a child process, as systemd
//! applies it: a seccomp filter under which socket(2) of any other address
//! family fails with `EAFNOSUPPORT`. Tests run the daemon under the unit's
//! list without a systemd to start it.

use std::{io, os::unix::process::CommandExt as _, process::Command};

/// `AUDIT_ARCH_*` of this build (linux/audit.h): the filter lets other
/// architectures' system calls through, as their numbers differ.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Offsets in `struct seccomp_data`: the call's number, the architecture,
/// and the low 32 bits of its first argument (little-endian).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

/// An address family by the name systemd's unit files give it.
pub fn family(name: &str) -> Option<libc::c_int> {
    Some(match name {
        "AF_UNIX" => libc::AF_UNIX,
        "AF_INET" => libc::AF_INET,
        "AF_INET6" => libc::AF_INET6,
        "AF_NETLINK" => libc::AF_NETLINK,
        "AF_PACKET" => libc::AF_PACKET,
        _ => return None,
    })
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump_if(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// The filter: socket(2) with a family not in `families` fails.
fn program(families: &[libc::c_int]) -> Vec<libc::sock_filter> {
    let load = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let n = u8::try_from(families.len()).expect("a short list");
    let mut p = vec![
        stmt(load, ARCH),
        // Not this architecture: to the last instruction, allow.
        jump_if(AUDIT_ARCH, 0, n + 4),
        stmt(load, NR),
        jump_if(libc::SYS_socket as u32, 0, n + 2),
        stmt(load, ARG0_LOW),
    ];
    for (i, &f) in families.iter().enumerate() {
        // Listed: past the refusal, to allow.
        p.push(jump_if(f as u32, n - i as u8, 0));
    }
    p.push(stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32,
    ));
    p.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
    p
}

/// Installs `filter` on the calling thread (and what it runs from then on).
/// Async-signal-safe: fit for a child between fork and exec.
fn install(filter: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // Without CAP_SYS_ADMIN a filter needs no_new_privs (a plain `cargo
    // test`); the daemon runs under `setpriv --no-new-privs` anyway.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `prog` points into `filter`, alive for the call; the kernel
    // copies the program.
    if unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &raw const prog,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s process (and what it runs) open sockets of `families`
/// only.
pub fn restrict_socket_families(cmd: &mut Command, families: &[libc::c_int]) {
    let filter = program(families);
    // SAFETY: `install` is async-signal-safe; `filter` is built before the
    // fork.
    unsafe {
        cmd.pre_exec(move || install(&filter));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errno of socket(2) of `family` in a child under `filter`, 0 if
    /// it opened.
    fn socket_errno_under(filter: &[libc::sock_filter], family: libc::c_int) -> i32 {
        // SAFETY: the child calls only async-signal-safe functions (prctl,
        // socket, _exit) before it exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = match install(filter) {
                Err(_) => 255,
                // SAFETY: plain socket(2); the child exits at once.
                Ok(()) => match unsafe { libc::socket(family, libc::SOCK_DGRAM, 0) } {
                    -1 => io::Error::last_os_error().raw_os_error().unwrap_or(254),
                    _ => 0,
                },
            };
            // SAFETY: ends the child without running the parent's exit code.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &raw mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn a_family_left_out_is_refused_and_the_listed_ones_open() {
        let filter = program(&[libc::AF_UNIX, libc::AF_INET]);
        assert_eq!(socket_errno_under(&filter, libc::AF_UNIX), 0);
        assert_eq!(socket_errno_under(&filter, libc::AF_INET), 0);
        assert_eq!(
            socket_errno_under(&filter, libc::AF_INET6),
            libc::EAFNOSUPPORT
        );
        let filter = program(&[libc::AF_INET6]);
        assert_eq!(socket_errno_under(&filter, libc::AF_INET6), 0);
        assert_eq!(
            socket_errno_under(&filter, libc::AF_INET),
            libc::EAFNOSUPPORT
        );
    }
}
