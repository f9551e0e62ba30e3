//! `xfrmsync sync` daemons over a Corosync CPG group, on this host: one
//! corosync (a single node, knet on 127.0.0.1, aes256 and sha256) and
//! several daemons joined to one group, each in a private network
//! namespace of the test's own (loopback only), so that neither corosync
//! nor the daemons meet the host's. This host has no ESP, so no SA: what
//! is tested is the group (heartbeats of every member, joins and leaves),
//! roles and epochs, snapshots served to members that appear, corosync
//! restarting under the daemons, and the metrics. Corosync must be
//! installed (Debian: corosync, libcpg4): without it these tests fail.

mod common;

use common::{private_netns, text, xfrmsync};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const GROUP: &str = "xfrmsync-test";
/// The first node's metrics, in the test's own namespace.
const METRICS_PORT: u16 = 9480;
const PATIENCE: Duration = Duration::from_secs(15);

/// A corosync program, by its path in Debian, else from PATH.
fn program(name: &str) -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from(name)
    }
}

struct Cluster {
    dir: PathBuf,
    corosync: Option<Child>,
    daemons: Vec<(String, Child)>,
}

impl Cluster {
    /// A directory with corosync's config, authkey, state directory and
    /// the `/run` it is given.
    fn new(name: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("xfrmsync-cpg-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["run", "state"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let key = dir.join("authkey");
        let keygen = Command::new(program("corosync-keygen"))
            .arg("-k")
            .arg(&key)
            .output()
            .unwrap_or_else(|e| panic!("corosync-keygen: {e}: these tests need corosync (Debian: corosync)"));
        assert!(keygen.status.success(), "corosync-keygen: {}", text(&keygen));
        let d = dir.display();
        std::fs::write(
            dir.join("corosync.conf"),
            format!(
                "totem {{\n    version: 2\n    cluster_name: xfrmsync-test\n    transport: knet\n    \
                 crypto_cipher: aes256\n    crypto_hash: sha256\n    keyfile: {d}/authkey\n}}\n\
                 nodelist {{\n    node {{\n        ring0_addr: 127.0.0.1\n        name: node1\n        nodeid: 1\n    \
                 }}\n}}\nquorum {{\n    provider: corosync_votequorum\n}}\n\
                 logging {{\n    to_stderr: yes\n    to_logfile: no\n    to_syslog: no\n    timestamp: on\n    \
                 blackbox: off\n}}\nsystem {{\n    state_dir: {d}/state\n}}\n"
            ),
        )
        .unwrap();
        Cluster { dir, corosync: None, daemons: Vec::new() }
    }

    /// Starts corosync in the foreground, in a mount namespace of its own
    /// where the test's directory is `/run` (its pid file's path is
    /// fixed), and waits until it serves.
    fn start_corosync(&mut self) {
        let log_path = self.dir.join("corosync.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
        let ready_before = std::fs::read_to_string(&log_path).unwrap_or_default().matches(READY).count();
        let child = Command::new("unshare")
            .args(["-m", "sh", "-c", "mount --bind \"$0\" /run && exec \"$1\" -f -c \"$2\""])
            .arg(self.dir.join("run"))
            .arg(program("corosync"))
            .arg(self.dir.join("corosync.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("unshare");
        self.corosync = Some(child);
        let until = Instant::now() + PATIENCE;
        while std::fs::read_to_string(&log_path).unwrap_or_default().matches(READY).count() == ready_before {
            if let Some(status) = self.corosync.as_mut().unwrap().try_wait().unwrap() {
                panic!("corosync ended ({status}); these tests need corosync (Debian: corosync):\n{}", self.logs());
            }
            assert!(Instant::now() < until, "corosync not ready:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends corosync `signal`.
    fn signal_corosync(&self, signal: libc::c_int) {
        let child = self.corosync.as_ref().expect("corosync runs");
        // SAFETY: kill takes a pid and a signal; the pid is our child's.
        assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    }

    /// Stops corosync as systemd would (SIGTERM), and waits for it.
    fn stop_corosync(&mut self) {
        if let Some(mut child) = self.corosync.take() {
            // SAFETY: kill takes a pid and a signal; the pid is our child's.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    fn config(&self, node: &str, role: &str) -> PathBuf {
        let path = self.dir.join(format!("{node}.toml"));
        let d = self.dir.display();
        let metrics = match node {
            "n1" => format!("metrics = \"127.0.0.1:{METRICS_PORT}\"\n"),
            _ => String::new(),
        };
        std::fs::write(
            &path,
            format!(
                "{metrics}control_socket = \"{d}/{node}.sock\"\nstate_file = \"{d}/{node}.state\"\nrole = \"{role}\"\n\
                 [link]\ntransport = \"cpg\"\ngroup = \"{GROUP}\"\nheartbeat_ms = 100\n"
            ),
        )
        .unwrap();
        path
    }

    /// Starts a daemon; returns its pid, which names it in the group.
    fn start(&mut self, node: &str, role: &str) -> u32 {
        let config = self.config(node, role);
        let log = std::fs::File::create(self.dir.join(format!("{node}.log"))).unwrap();
        let child = xfrmsync()
            .args(["sync", "--config"])
            .arg(config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.daemons.push((node.to_string(), child));
        let until = Instant::now() + PATIENCE;
        while self.ask(node, &["status"]).is_none_or(|o| !o.status.success()) {
            assert!(Instant::now() < until, "{node} did not start:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        pid
    }

    fn stop(&mut self, node: &str) {
        if let Some(at) = self.daemons.iter().position(|(n, _)| n == node) {
            let (_, mut child) = self.daemons.remove(at);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn ask(&self, node: &str, args: &[&str]) -> Option<Output> {
        xfrmsync().arg("sync").args(args).arg("--socket").arg(self.dir.join(format!("{node}.sock"))).output().ok()
    }

    fn ok(&self, node: &str, args: &[&str]) -> String {
        let out = self.ask(node, args).unwrap();
        assert!(out.status.success(), "{node}: {args:?}: {}\n{}", text(&out), self.logs());
        text(&out)
    }

    fn status(&self, node: &str) -> serde_json::Value {
        let out = self.ask(node, &["status", "--json"]).unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    }

    /// Waits until `check` holds for `node`'s status.
    fn wait(&self, node: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let until = Instant::now() + PATIENCE;
        loop {
            let status = self.status(node);
            if check(&status) {
                return status;
            }
            assert!(Instant::now() < until, "{node}: {what} not within {PATIENCE:?}: {status}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn epoch_file(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{node}.state"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        ["corosync", "n1", "n2", "n3", "n4"]
            .iter()
            .map(|n| {
                let log = std::fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default();
                // corosync says much at start; its end says why it stopped.
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                format!("--- {n}.log\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })
            .collect()
    }
}

/// What corosync logs once it serves its clients.
const READY: &str = "ready to provide service";

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stop_corosync();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The pids of the peers `status` lists, sorted.
fn peer_pids(status: &serde_json::Value) -> Vec<u64> {
    let mut pids: Vec<u64> =
        status["peers"].as_array().map_or(Vec::new(), |peers| peers.iter().filter_map(|p| p["pid"].as_u64()).collect());
    pids.sort_unstable();
    pids
}

/// The heartbeat `status` holds of the peer with `pid`.
fn peer(status: &serde_json::Value, pid: u32) -> serde_json::Value {
    status["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["pid"].as_u64() == Some(u64::from(pid))).cloned())
        .unwrap_or(serde_json::Value::Null)
}

fn count(status: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(status, |v, key| &v[*key]).as_u64().unwrap_or_else(|| panic!("no {path:?} in {status}"))
}

/// `GET /metrics` of the first node, read by a Prometheus text parser.
fn scrape() -> (prometheus_parse::Scrape, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", METRICS_PORT)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    (scrape, body.to_string())
}

fn sample(scrape: &(prometheus_parse::Scrape, String), name: &str) -> f64 {
    let name = format!("xfrmsync_sync_{name}");
    let sample = scrape
        .0
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.is_empty())
        .unwrap_or_else(|| panic!("no {name} in:\n{}", scrape.1));
    match sample.value {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn three_daemons_share_a_group_roles_epochs_and_snapshots() {
    private_netns();
    let mut cluster = Cluster::new("three");
    cluster.start_corosync();
    let pids = [cluster.start("n1", "standby"), cluster.start("n2", "standby"), cluster.start("n3", "standby")];
    let [p1, p2, p3] = pids;

    // Every daemon hears the other two, by their pids, and only them.
    for (node, others) in [("n1", [p2, p3]), ("n2", [p1, p3]), ("n3", [p1, p2])] {
        let mut want: Vec<u64> = others.iter().map(|p| u64::from(*p)).collect();
        want.sort_unstable();
        let st = cluster.wait(node, "hearing the other two", |st| peer_pids(st) == want);
        for other in others {
            let p = peer(&st, other);
            assert_eq!(
                (p["role"].as_str(), p["epoch"].as_u64(), p["nodeid"].as_u64()),
                (Some("standby"), Some(0), Some(1))
            );
            assert!(p["heard_ms_ago"].as_u64() < Some(5000), "{p}");
        }
        let link = &st["link"];
        assert_eq!(link["transport"], "cpg");
        assert_eq!(link["group"], GROUP);
        assert_eq!(link["connected"], true);
        assert_eq!(link["members"].as_u64(), Some(2));
        assert_eq!(link["nodeid"].as_u64(), Some(1));
        assert_eq!(link["max_message"].as_u64(), Some(8192));
        assert!(count(&st, &["link", "looped_back"]) > 0, "its own messages come back, and are dropped");
    }
    let text_status = cluster.ok("n1", &["status"]);
    assert!(text_status.contains("peers: 2 heard\n"), "{text_status}");
    assert!(text_status.contains(&format!("peer node 1 pid {p2}: standby at epoch 0, heard ")), "{text_status}");
    assert!(text_status.contains(&format!("link: CPG group '{GROUP}' as node 1 pid {p1}, 2 other members;")));
    assert!(text_status.contains("try again "), "{text_status}");
    assert!(text_status.contains("longest wait in the queue "), "{text_status}");

    // The takeover: n2 commits (no SA to write here) and is active at
    // epoch 1; the other two learn the epoch from it, and keep it.
    let commit = cluster.ok("n2", &["commit"]);
    assert!(commit.contains("epoch 1"), "{commit}");
    assert_eq!(cluster.status("n2")["role"], "active");
    for node in ["n1", "n3"] {
        let st = cluster.wait(node, "learning epoch 1 from n2", |st| {
            st["epoch"].as_u64() == Some(1) && peer(st, p2)["role"] == "active"
        });
        assert_eq!(st["role"], "standby", "a standby stays one: roles come from the cluster manager");
        assert_eq!(peer(&st, p2)["epoch"].as_u64(), Some(1));
    }
    for node in ["n1", "n2", "n3"] {
        assert_eq!(cluster.epoch_file(node), "epoch 1\n", "{node}");
    }

    // A daemon that joins later: n2, active, sends everything when it
    // appears (CPG has no state transfer), and again for the snapshot it
    // asks for as a standby; n4 receives it whole, and hears all three.
    let served = count(&cluster.status("n2"), &["resyncs", "served"]);
    let completed_n1 = count(&cluster.status("n1"), &["resyncs", "completed"]);
    let p4 = cluster.start("n4", "standby");
    cluster.wait("n2", "serving the newcomer", |st| count(st, &["resyncs", "served"]) >= served + 2);
    let n4 = cluster
        .wait("n4", "the snapshot, whole", |st| count(st, &["resyncs", "completed"]) >= 1 && peer_pids(st).len() == 3);
    assert_eq!(n4["epoch"].as_u64(), Some(1), "learnt from the group at once");
    assert_eq!(peer(&n4, p2)["role"], "active");
    // Every member receives what is multicast: the other standbys too.
    cluster.wait("n1", "the newcomer's snapshot, which it sees too", |st| {
        count(st, &["resyncs", "completed"]) > completed_n1 && peer_pids(st).len() == 3
    });
    let n2_log = std::fs::read_to_string(cluster.dir.join("n2.log")).unwrap();
    assert!(n2_log.contains(&format!("node 1 pid {p4} appeared in the group")), "{n2_log}");

    // The cluster manager's word moves roles; the members see it in the
    // heartbeats. n2 is told standby, n3 active (without a commit: same
    // epoch); then n1 commits, at epoch 2, and n3, active, is replaced.
    cluster.ok("n2", &["role", "standby"]);
    cluster.wait("n1", "n2 a standby", |st| peer(st, p2)["role"] == "standby");
    let active = cluster.ok("n3", &["role", "active"]);
    assert!(active.contains("active at epoch 1"), "{active}");
    cluster.wait("n4", "n3 active", |st| peer(st, p3)["role"] == "active");
    let commit = cluster.ok("n1", &["commit"]);
    assert!(commit.contains("epoch 2"), "{commit}");
    let n3 = cluster.wait("n3", "being replaced", |st| st["role"] == "replaced");
    assert_eq!(n3["replaced_by"].as_u64(), Some(2));
    for node in ["n2", "n4"] {
        let st = cluster.wait(node, "learning epoch 2", |st| st["epoch"].as_u64() == Some(2));
        assert_eq!(st["role"], "standby");
        assert_eq!(peer(&st, p1)["role"], "active");
    }

    // A member that goes (killed: corosync sees its connection close) is
    // forgotten by the others.
    cluster.stop("n4");
    for node in ["n1", "n2", "n3"] {
        cluster.wait(node, "n4 gone", |st| peer_pids(st).len() == 2 && st["link"]["members"].as_u64() == Some(2));
    }

    // The metrics: the CPG link's own families, and the peers heard.
    let metrics = scrape();
    for (name, kind) in [
        ("link_try_again_total", "counter"),
        ("link_queue_wait_longest_seconds", "gauge"),
        ("link_ring_wait_longest_seconds", "gauge"),
        ("link_queued_messages", "gauge"),
        ("link_group_members", "gauge"),
        ("link_connected", "gauge"),
        ("peers_heard", "gauge"),
    ] {
        assert!(metrics.1.contains(&format!("# TYPE xfrmsync_sync_{name} {kind}\n")), "{name}:\n{}", metrics.1);
    }
    assert_eq!(sample(&metrics, "link_connected"), 1.0);
    assert_eq!(sample(&metrics, "link_group_members"), 2.0);
    assert_eq!(sample(&metrics, "peers_heard"), 2.0);
    assert_eq!(sample(&metrics, "link_queued_messages"), 0.0);
    assert_eq!(sample(&metrics, "epoch"), 2.0);
    assert!(sample(&metrics, "link_packets_sent_total") > 0.0);
    assert!(sample(&metrics, "link_packets_received_total") > 0.0);
    assert!(sample(&metrics, "peer_heartbeat_age_seconds") < 5.0);

    // What flow control did here (one node, an idle ring): for the report.
    for node in ["n1", "n2", "n3"] {
        let st = cluster.status(node);
        let link = &st["link"];
        println!(
            "{node}: sent {}, received {}, try again {}, longest wait in the queue {} ms, longest ring wait {} ms, \
             given up {}",
            link["sent"],
            link["received"],
            link["try_again"],
            link["queue_wait_longest_ms"],
            link["ring_wait_longest_ms"],
            link["given_up"]
        );
        assert_eq!(link["given_up"].as_u64(), Some(0), "{node}: {link}");
        assert_eq!(link["dropped"]["malformed"].as_u64(), Some(0), "{node}: {link}");
    }
}

#[test]
fn corosync_frozen_then_restarted_under_the_daemons() {
    private_netns();
    let mut cluster = Cluster::new("restart");
    cluster.start_corosync();
    let p1 = cluster.start("n1", "standby");
    let p2 = cluster.start("n2", "active");
    cluster.wait("n1", "hearing the active node", |st| peer(st, p2)["role"] == "active");
    cluster.wait("n2", "hearing the standby", |st| peer(st, p1)["role"] == "standby");

    // Corosync frozen (SIGSTOP), as a blocked ring holds messages: the
    // daemons go on answering, and their messages wait in the ring, which
    // the ring wait shows while it lasts and after.
    cluster.signal_corosync(libc::SIGSTOP);
    let frozen = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    let during = cluster.status("n2");
    assert!(asked.elapsed() < Duration::from_millis(500), "status took {:?} with corosync frozen", asked.elapsed());
    assert!(count(&during, &["link", "ring_wait_longest_ms"]) >= 1400, "{}", during["link"]);
    assert_eq!(during["role"], "active");
    cluster.signal_corosync(libc::SIGCONT);
    let thawed = frozen.elapsed();
    let after = cluster.wait("n2", "its messages back", |st| {
        count(st, &["link", "sent"]) > count(&during, &["link", "sent"])
            && peer(st, p1)["heard_ms_ago"].as_u64() < Some(500)
    });
    let ring_wait = count(&after, &["link", "ring_wait_longest_ms"]);
    assert!(
        (1400..=thawed.as_millis() as u64 + 1000).contains(&ring_wait),
        "ring wait {ring_wait} ms, frozen {thawed:?}"
    );
    assert_eq!(count(&after, &["link", "given_up"]), 0, "{}", after["link"]);
    println!(
        "corosync frozen {} ms: n2's longest ring wait {ring_wait} ms, longest wait in the queue {} ms, try again {}",
        thawed.as_millis(),
        after["link"]["queue_wait_longest_ms"],
        after["link"]["try_again"]
    );

    // Corosync stops: the daemons stay up, say so, and forget the group.
    cluster.stop_corosync();
    for node in ["n1", "n2"] {
        let st = cluster.wait(node, "losing corosync", |st| st["link"]["connected"] == false);
        assert!(peer_pids(&st).is_empty(), "{node}: members forgotten: {st}");
        let status = cluster.ok(node, &["status"]);
        assert!(status.contains("NOT CONNECTED to corosync"), "{status}");
    }
    assert_eq!(cluster.status("n2")["role"], "active", "losing the ring changes no role");
    let served = count(&cluster.status("n2"), &["resyncs", "served"]);
    let completed = count(&cluster.status("n1"), &["resyncs", "completed"]);

    // Back: both join again within a second or two; the active node sees
    // the standby appear and sends it everything, unasked.
    cluster.start_corosync();
    for (node, other) in [("n1", p2), ("n2", p1)] {
        let st = cluster
            .wait(node, "joining again", |st| st["link"]["connected"] == true && peer_pids(st) == [u64::from(other)]);
        assert_eq!(count(&st, &["link", "reconnects"]), 1);
        assert_eq!(count(&st, &["link", "disconnects"]), 1);
    }
    cluster.wait("n2", "a snapshot for the standby that appeared", |st| count(st, &["resyncs", "served"]) > served);
    cluster.wait("n1", "that snapshot, whole", |st| count(st, &["resyncs", "completed"]) > completed);
    let n1_log = std::fs::read_to_string(cluster.dir.join("n1.log")).unwrap();
    assert!(n1_log.contains("CPG: lost corosync (cpg_dispatch: CS_ERR_LIBRARY (2))"), "{n1_log}");
    assert!(n1_log.contains(&format!("CPG: joined group '{GROUP}' again as node 1 pid {p1}")), "{n1_log}");
}

#[test]
fn a_cpg_daemon_without_corosync_fails_clearly() {
    private_netns();
    let cluster = Cluster::new("absent");
    let config = cluster.config("n1", "standby");
    let started = Instant::now();
    let out = xfrmsync().args(["sync", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(5), "failed at once, not after retrying: {:?}", started.elapsed());
    let said = text(&out);
    assert!(
        said.contains(&format!(
            "sync link: CPG group '{GROUP}': cannot reach corosync (cpg_model_initialize: CS_ERR_LIBRARY (2)): is \
             corosync running on this node"
        )),
        "{said}"
    );
    // `check` needs no corosync: it only reads the file.
    let check = xfrmsync().args(["sync", "check", "--config"]).arg(&config).output().unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("Cpg("), "{}", text(&check));
}
