//! contrib/keepalived/xfrmsync-keepalived-notify against a real `xfrmsync
//! sync` daemon on this host (no SAs: the commit writes none), in a private
//! network namespace with a veth interface for the service address. What
//! matters here is the order and the refusals: the address comes only after
//! a commit that worked, the ha FIFO after the address, and a failed commit
//! leaves the node without the address. The whole failover of a real IKEv2
//! gateway is vmtest/guest/keepalived-suite.sh, in the VM.

mod common;

use common::text;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/contrib/keepalived/xfrmsync-keepalived-notify");
const ADDRESS: &str = "192.0.2.1/24";

/// A network namespace of the test's own, with an interface `svc0` for the
/// service address (one end of a veth pair: this host's kernel has no dummy
/// interfaces).
fn private_netns_with_svc0() {
    common::private_netns();
    for args in [&["link", "add", "svc0", "type", "veth", "peer", "name", "svc1"][..], &["link", "set", "svc0", "up"]] {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", text(&out));
    }
}

fn has_address() -> bool {
    let out = Command::new("ip").args(["-br", "addr", "show", "dev", "svc0"]).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).contains(ADDRESS)
}

struct Node {
    dir: PathBuf,
    daemon: Option<Child>,
}

impl Node {
    fn new(name: &str) -> Node {
        let dir = std::env::temp_dir().join(format!("xfrmsync-notify-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Node { dir, daemon: None }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("sync.sock")
    }

    fn start_daemon(&mut self) {
        let child = common::start_sync_daemon(&self.dir, "", 7820, 7821);
        self.daemon = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while !self.role_is("standby") {
            assert!(Instant::now() < until, "the daemon did not start: {}", self.read("daemon.log"));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn role_is(&self, role: &str) -> bool {
        let out =
            common::xfrmsync().args(["sync", "status", "--json", "--socket"]).arg(self.socket()).output().unwrap();
        out.status.success()
            && serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok_and(|s| s["role"] == role)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// keepalived's call: `SCRIPT OPTIONS... INSTANCE ipsec STATE 100`.
    fn notify(&self, state: &str, socket: &Path, extra: &[&str]) -> Output {
        Command::new(SCRIPT)
            .args(["--address", ADDRESS, "--dev", "svc0", "--socket"])
            .arg(socket)
            .args(["--xfrmsync", env!("CARGO_BIN_EXE_xfrmsync"), "--log"])
            .arg(self.dir.join("notify.log"))
            .args(extra)
            .args(["INSTANCE", "ipsec", state, "100"])
            .output()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The log's lines without their timestamps.
fn steps(log: &str) -> Vec<String> {
    log.lines().map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_string()).collect()
}

#[test]
fn master_commits_then_takes_the_address_then_the_ha_segment_and_backup_undoes_it() {
    private_netns_with_svc0();
    let mut node = Node::new("order");
    node.start_daemon();
    // charon's FIFO, read as charon does: one open, one read.
    let fifo = node.dir.join("charon.ha");
    let rc = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(rc.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            std::fs::File::open(fifo).unwrap().read_to_string(&mut text).unwrap();
            text
        })
    };
    let ha_fifo = fifo.to_str().unwrap();
    let out = node.notify("MASTER", &node.socket(), &["--ha-fifo", ha_fifo]);
    assert!(out.status.success(), "{}\n{}", text(&out), node.read("notify.log"));
    assert_eq!(reader.join().unwrap(), "+1\n", "what charon's FIFO got");
    assert!(has_address(), "MASTER: the address is on svc0");
    assert!(node.role_is("active"), "MASTER: the daemon committed and is active");
    let log = steps(&node.read("notify.log"));
    let at = |what: &str| {
        log.iter().position(|l| l.contains(what)).unwrap_or_else(|| panic!("'{what}' not in the log: {log:#?}"))
    };
    assert!(at("becoming MASTER") < at("addresses up"), "{log:#?}");
    assert!(at("addresses up") < at("ha segments +1"), "{log:#?}");
    assert!(at("commit: commit: 0 of 0 SAs written") > 0, "the commit's own summary is logged: {log:#?}");

    // keepalived may say MASTER twice: already active is not a failure.
    let out = node.notify("MASTER", &node.socket(), &["--ha-fifo", "none"]);
    assert!(out.status.success(), "{}\n{}", text(&out), node.read("notify.log"));
    assert!(node.read("notify.log").contains("already active: nothing to commit"));

    let out = node.notify("BACKUP", &node.socket(), &["--ha-fifo", "none"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!has_address(), "BACKUP: the address is gone");
    assert!(node.role_is("standby"), "BACKUP: the daemon is standby");
}

#[test]
fn a_failed_commit_leaves_the_address_alone_unless_forced() {
    private_netns_with_svc0();
    let node = Node::new("refuse");
    // No daemon answers at this socket: the commit cannot be made.
    let nowhere = node.dir.join("no-daemon.sock");
    let out = node.notify("MASTER", &nowhere, &["--ha-fifo", "none"]);
    assert!(!out.status.success(), "MASTER without a commit must fail");
    assert!(!has_address(), "the address was taken without a commit");
    assert!(node.read("notify.log").contains("NOT taking the service addresses"), "{}", node.read("notify.log"));

    let out = node.notify("MASTER", &nowhere, &["--ha-fifo", "none", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(has_address(), "--force takes the address anyway");
    assert!(node.read("notify.log").contains("taking the addresses anyway (--force)"));
}

#[test]
fn without_xfrmsync_the_script_only_moves_the_address() {
    private_netns_with_svc0();
    let node = Node::new("plain");
    let nowhere = node.dir.join("no-daemon.sock");
    let out = node.notify("MASTER", &nowhere, &["--ha-fifo", "none", "--no-xfrmsync"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(has_address());
    let out = node.notify("FAULT", &nowhere, &["--ha-fifo", "none", "--no-xfrmsync"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!has_address());
}
