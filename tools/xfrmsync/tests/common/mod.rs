//! What the tool's daemon tests share: the binary, a command's output as
//! text, and a network namespace of the test's own.

use std::process::{Command, Output};

pub fn xfrmsync() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xfrmsync"))
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Moves this test's thread into a new network namespace with loopback up:
/// the daemons (and corosync) it starts inherit it, and never meet the
/// host's SAs or ports. Only this thread moves (unshare of the network
/// namespace is per thread), so other tests are not affected.
pub fn private_netns() {
    // SAFETY: unshare takes flags only; it changes this thread's namespace.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare(CLONE_NEWNET) needs CAP_SYS_ADMIN: {}", std::io::Error::last_os_error());
    let up = Command::new("ip").args(["link", "set", "lo", "up"]).status().expect("ip");
    assert!(up.success());
}
