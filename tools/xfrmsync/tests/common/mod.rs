//! What the tool's daemon tests share: the binary, a command's output as
//! text, and a network namespace of the test's own.

use std::path::Path;
use std::process::{Child, Command, Output};

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

/// Starts `xfrmsync sync` on a new key in `dir`: its config `dir/sync.toml`
/// is `top` (top-level keys, each line ending in a newline), the control
/// socket and state file in `dir`, and a UDP link on loopback from port
/// `local` to `peer`; its output goes to `dir/daemon.log`.
// Each test file is a crate of its own, and not every one starts a lone daemon.
#[allow(dead_code)]
pub fn start_sync_daemon(dir: &Path, top: &str, local: u16, peer: u16) -> Child {
    let key = dir.join("key");
    let out = xfrmsync().args(["sync", "keygen"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let d = dir.display();
    let config = dir.join("sync.toml");
    std::fs::write(
        &config,
        format!(
            "{top}control_socket = \"{d}/sync.sock\"\nstate_file = \"{d}/sync.state\"\n[link]\nlocal = \
             \"127.0.0.1:{local}\"\npeer = \"127.0.0.1:{peer}\"\nkey_file = \"{}\"\nheartbeat_ms = 100\n",
            key.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("daemon.log")).unwrap();
    xfrmsync().args(["sync", "--config"]).arg(&config).stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap()
}
