//! `xfrmsync sync` daemons on this host, without any SA: the sync link,
//! the control socket, roles and epochs. Both daemons run in a private
//! network namespace of the test's own (loopback only), so they never see,
//! let alone write, the host's SAs. Takeovers of real SAs under traffic
//! are tests/vm_sync.rs, in the VM.

mod common;

use common::{private_netns, text, xfrmsync};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::time::{Duration, Instant};

struct Pair {
    dir: PathBuf,
    daemons: Vec<(String, Child)>,
    /// Each node serves metrics (the config's `metrics`) on [`Pair::metrics_port`].
    metrics: bool,
}

impl Pair {
    fn new(name: &str) -> Pair {
        let dir = std::env::temp_dir().join(format!("xfrmsync-sync-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        let out = xfrmsync().args(["sync", "keygen"]).arg(&key).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        Pair { dir, daemons: Vec::new(), metrics: false }
    }

    fn config(&self, node: &str, role: &str, key: &Path) -> PathBuf {
        let (local, peer) = if node == "a" { (7800, 7801) } else { (7801, 7800) };
        let path = self.dir.join(format!("{node}.toml"));
        let d = self.dir.display();
        let metrics = match self.metrics {
            true => format!("metrics = \"127.0.0.1:{}\"\n", Pair::metrics_port(node)),
            false => String::new(),
        };
        std::fs::write(
            &path,
            format!(
                "{metrics}control_socket = \"{d}/{node}.sock\"\nstate_file = \"{d}/{node}.state\"\nrole = \"{role}\"\n\
                 [link]\nlocal = \"127.0.0.1:{local}\"\npeer = \"127.0.0.1:{peer}\"\nkey_file = \"{}\"\n\
                 heartbeat_ms = 100\n",
                key.display()
            ),
        )
        .unwrap();
        path
    }

    fn start(&mut self, node: &str, role: &str) {
        self.start_with_key(node, role, &self.dir.join("key"));
    }

    fn start_with_key(&mut self, node: &str, role: &str, key: &Path) {
        self.start_with(node, role, key, &[]);
    }

    fn start_with(&mut self, node: &str, role: &str, key: &Path, args: &[&str]) {
        let config = self.config(node, role, key);
        let log = std::fs::File::create(self.dir.join(format!("{node}.log"))).unwrap();
        let child = xfrmsync()
            .args(["sync", "--config"])
            .arg(config)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemons.push((node.to_string(), child));
        // Ready once its control socket answers.
        let until = Instant::now() + Duration::from_secs(10);
        while self.ask(node, &["status"]).is_none_or(|o| !o.status.success()) {
            assert!(Instant::now() < until, "{node} did not start:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
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

    fn status(&self, node: &str) -> serde_json::Value {
        let out = self.ask(node, &["status", "--json"]).unwrap();
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)))
    }

    /// Waits until `check` holds for `node`'s status.
    fn wait(&self, node: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status(node);
            if check(&status) {
                return status;
            }
            assert!(Instant::now() < until, "{node}: {what} not within 10 s: {status}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metrics_port(node: &str) -> u16 {
        if node == "a" {
            9477
        } else {
            9478
        }
    }

    /// `GET path` of `node`'s metrics endpoint: the status line, the
    /// headers and the body.
    fn get(&self, node: &str, path: &str) -> (String, String, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", Pair::metrics_port(node))).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/plain\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head: {answer:?}"));
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_string(), headers.to_string(), body.to_string())
    }

    /// `node`'s metrics, read by a Prometheus text parser.
    fn scrape(&self, node: &str) -> Metrics {
        let (status, headers, body) = self.get(node, "/metrics");
        assert_eq!(status, "HTTP/1.0 200 OK");
        assert!(headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{headers}");
        assert!(headers.contains(&format!("Content-Length: {}", body.len())), "{headers}");
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        // The parser skips lines it cannot read: every sample line must be
        // one, a histogram's buckets making one sample of it (its sum and
        // count are samples of their own).
        let histograms: Vec<String> = body
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" histogram").map(str::to_string))
            .collect();
        let lines = body
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| !histograms.iter().any(|h| l.starts_with(&format!("{h}_bucket{{"))))
            .count();
        assert_eq!(scrape.samples.len(), lines + histograms.len(), "lines the parser skipped:\n{body}");
        Metrics { scrape, body }
    }

    fn epoch_file(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{node}.state"))).unwrap_or_default()
    }

    fn logs(&self) -> String {
        ["a", "s"]
            .iter()
            .map(|n| {
                format!(
                    "--- {n}.log\n{}",
                    std::fs::read_to_string(self.dir.join(format!("{n}.log"))).unwrap_or_default()
                )
            })
            .collect()
    }
}

struct Metrics {
    scrape: prometheus_parse::Scrape,
    body: String,
}

impl Metrics {
    /// The value of `name` (without the prefix) with `label`, if any.
    fn value(&self, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
        let name = format!("xfrmsync_sync_{name}");
        let sample = self.scrape.samples.iter().find(|s| {
            s.metric == name
                && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v))
                && (label.is_some() || s.labels.is_empty())
        })?;
        match sample.value {
            prometheus_parse::Value::Counter(v) => {
                assert!(name.ends_with("_total"), "a counter without _total: {name}");
                Some(v)
            }
            prometheus_parse::Value::Gauge(v) => Some(v),
            ref other => panic!("{name}: neither counter nor gauge: {other:?}"),
        }
    }

    /// The histogram `name`'s buckets (bound, cumulative count).
    fn histogram(&self, name: &str) -> Vec<(f64, f64)> {
        let name = format!("xfrmsync_sync_{name}");
        let sample = self.scrape.samples.iter().find(|s| s.metric == name);
        match sample.map(|s| &s.value) {
            Some(prometheus_parse::Value::Histogram(buckets)) => {
                buckets.iter().map(|b| (b.less_than, b.count)).collect()
            }
            other => panic!("{name}: no histogram but {other:?} in:\n{}", self.body),
        }
    }

    fn get(&self, name: &str, label: Option<(&str, &str)>) -> f64 {
        self.value(name, label).unwrap_or_else(|| panic!("no {name} {label:?} in:\n{}", self.body))
    }

    /// `name`'s `# TYPE` and whether it has its `# HELP`.
    fn family(&self, name: &str) -> (Option<&str>, bool) {
        let name = format!("xfrmsync_sync_{name}");
        let kind = self.body.lines().find_map(|l| l.strip_prefix(&format!("# TYPE {name} ")));
        (kind, self.scrape.docs.contains_key(&name))
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for (_, child) in &mut self.daemons {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_commit_replaces_the_active_node_and_epochs_survive_restarts() {
    private_netns();
    let mut pair = Pair::new("commit");
    pair.start("s", "standby");
    pair.start("a", "active");
    let s = pair.wait("s", "hearing the active peer", |st| st["peer"]["role"] == "active");
    assert_eq!((s["role"].as_str(), s["epoch"].as_u64()), (Some("standby"), Some(0)));
    pair.wait("s", "the snapshot it asked for", |st| st["resyncs"]["completed"].as_u64() >= Some(1));
    pair.wait("a", "serving it", |st| st["resyncs"]["served"].as_u64() >= Some(1));

    let resync = pair.ask("s", &["resync"]).unwrap();
    assert!(resync.status.success(), "{}", text(&resync));
    pair.wait("a", "a second snapshot served", |st| st["resyncs"]["served"].as_u64() >= Some(2));

    // The takeover: S commits (no SA to write here) and is active at epoch
    // 1; A hears it and is replaced; both keep the epoch.
    let commit = pair.ask("s", &["commit"]).unwrap();
    assert!(commit.status.success(), "{}", text(&commit));
    assert!(text(&commit).contains("epoch 1"), "{}", text(&commit));
    let a = pair.wait("a", "being replaced", |st| st["role"] == "replaced");
    assert_eq!(a["replaced_by"].as_u64(), Some(1));
    assert_eq!(pair.status("s")["role"], "active");
    assert_eq!(pair.epoch_file("s"), "epoch 1\n");
    assert_eq!(pair.epoch_file("a"), "epoch 1\n", "A keeps the epoch it learned");
    let again = pair.ask("s", &["commit"]).unwrap();
    assert_eq!(again.status.code(), Some(1), "a second commit on an active node fails: {}", text(&again));

    // A restarts as standby: it comes back at epoch 1, not 0; a commit of
    // its own (a failback) goes to 2, and S is replaced in turn.
    pair.stop("a");
    pair.start("a", "standby");
    assert_eq!(pair.status("a")["epoch"].as_u64(), Some(1));
    let failback = pair.ask("a", &["commit"]).unwrap();
    assert!(failback.status.success(), "{}", text(&failback));
    pair.wait("s", "being replaced by the failback", |st| st["replaced_by"].as_u64() == Some(2));

    // The cluster manager's word: `role` moves a node without a commit.
    let role = pair.ask("s", &["role", "standby"]).unwrap();
    assert!(role.status.success(), "{}", text(&role));
    assert_eq!(pair.status("s")["role"], "standby");
}

#[test]
fn an_active_node_moves_above_a_standby_that_knows_a_higher_epoch() {
    private_netns();
    let mut pair = Pair::new("outrank");
    // S took over at epoch 5 once; A's state file never heard of it, and A
    // is promoted before it hears S. A commits at 1, then hears S at 5:
    // that is not a takeover (S is standby), so A stays active, above it.
    std::fs::write(pair.dir.join("s.state"), "epoch 5\n").unwrap();
    pair.start("a", "standby");
    let commit = pair.ask("a", &["commit"]).unwrap();
    assert!(commit.status.success(), "{}", text(&commit));
    assert!(text(&commit).contains("epoch 1"), "{}", text(&commit));
    pair.start("s", "standby");
    let a = pair.wait("a", "moving above S's epoch", |st| st["epoch"].as_u64() == Some(6));
    assert_eq!(a["role"], "active", "a standby's higher epoch replaced the active node: {a}");
    assert_eq!(pair.epoch_file("a"), "epoch 6\n", "the new epoch is kept before it is used");
    let s = pair.wait("s", "learning A's epoch", |st| st["epoch"].as_u64() == Some(6));
    assert_eq!(s["role"], "standby");
    pair.wait("s", "A's snapshot at the new epoch", |st| st["resyncs"]["completed"].as_u64() >= Some(1));
}

#[test]
fn a_peer_without_the_key_is_refused_and_counted() {
    private_netns();
    let mut pair = Pair::new("key");
    let other_key = pair.dir.join("other-key");
    let out = xfrmsync().args(["sync", "keygen"]).arg(&other_key).output().unwrap();
    assert!(out.status.success());
    pair.start("s", "standby");
    pair.start_with_key("a", "active", &other_key);
    let s =
        pair.wait("s", "refusing the peer's packets", |st| st["link"]["dropped"]["auth_failed"].as_u64() >= Some(3));
    assert!(s["peer"].is_null(), "a peer heard through the wrong key: {s}");
    assert_eq!(s["records"]["received"].as_u64(), Some(0));
    let text_status = text(&pair.ask("s", &["status"]).unwrap());
    let key = std::fs::read_to_string(pair.dir.join("key")).unwrap();
    assert!(!text_status.contains(key.trim()), "the key in the status");
    assert!(!pair.logs().contains(key.trim()), "the key in the logs");
}

#[test]
fn commands_fail_clearly_without_a_daemon_and_keygen_keeps_a_key() {
    let dir = std::env::temp_dir().join(format!("xfrmsync-sync-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = xfrmsync().args(["sync", "status", "--socket"]).arg(dir.join("none.sock")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("reaching the daemon"), "{}", text(&out));
    let key = dir.join("key");
    assert!(xfrmsync().args(["sync", "keygen"]).arg(&key).output().unwrap().status.success());
    let first = std::fs::read(&key).unwrap();
    let again = xfrmsync().args(["sync", "keygen"]).arg(&key).output().unwrap();
    assert_eq!(again.status.code(), Some(1), "an existing key is kept: {}", text(&again));
    assert_eq!(std::fs::read(&key).unwrap(), first);
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sync.example.toml");
    let check = xfrmsync().args(["sync", "check", "--config"]).arg(&example).output().unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn metrics_are_served_for_prometheus() {
    private_netns();
    let mut pair = Pair::new("metrics");
    pair.metrics = true;
    pair.start("s", "standby");
    pair.start("a", "active");
    pair.wait("s", "hearing the active peer", |st| st["peer"]["role"] == "active");
    pair.wait("s", "the snapshot it asked for", |st| st["resyncs"]["completed"].as_u64() >= Some(1));

    let s = pair.scrape("s");
    let families = [
        ("records_sent_total", "counter"),
        ("records_received_total", "counter"),
        ("records_rejected_total", "counter"),
        ("departures_sent_total", "counter"),
        ("resyncs_total", "counter"),
        ("commits_total", "counter"),
        ("last_commit_sas", "gauge"),
        ("last_commit_margin_min_packets", "gauge"),
        ("last_commit_margin_max_packets", "gauge"),
        ("epoch", "gauge"),
        ("epoch_changes_total", "counter"),
        ("role", "gauge"),
        ("records_held", "gauge"),
        ("last_record_age_seconds", "gauge"),
        ("peer_heartbeat_age_seconds", "gauge"),
        ("peer_record_age_seconds", "gauge"),
        ("events_lost_total", "counter"),
        ("link_packets_sent_total", "counter"),
        ("link_packets_received_total", "counter"),
        ("link_packets_retransmitted_total", "counter"),
        ("link_packets_given_up_total", "counter"),
        ("link_packets_dropped_total", "counter"),
        ("replication_samples_sent_total", "counter"),
        ("replication_lag_packets", "histogram"),
        ("replication_lag_not_held_total", "counter"),
        ("replication_lag_over_margin_total", "counter"),
        ("replication_lag_last_max_packets", "gauge"),
        ("replication_lag_last_max_margin_ratio", "gauge"),
        ("replication_lag_last_sample_age_seconds", "gauge"),
        ("metrics_per_sa_limit", "gauge"),
        ("sa_series_omitted", "gauge"),
        ("sa_record_age_seconds", "gauge"),
        ("sa_replication_lag_packets", "gauge"),
        ("sa_replication_margin_packets", "gauge"),
        ("sa_last_commit_margin_packets", "gauge"),
        ("sa_needs_rekey", "gauge"),
    ];
    for (name, kind) in families {
        assert_eq!(s.family(name), (Some(kind), true), "{name}:\n{}", s.body);
    }
    assert_eq!(s.get("role", Some(("role", "standby"))), 1.0);
    assert_eq!(s.get("role", Some(("role", "active"))), 0.0);
    assert_eq!(s.get("role", Some(("role", "replaced"))), 0.0);
    assert_eq!(s.get("epoch", None), 0.0);
    for reason in ["older", "lower_epoch", "malformed"] {
        assert_eq!(s.get("records_rejected_total", Some(("reason", reason))), 0.0);
    }
    for outcome in ["written", "needs_rekey", "mismatch", "failed"] {
        assert_eq!(s.get("last_commit_sas", Some(("outcome", outcome))), 0.0);
    }
    assert_eq!(s.value("last_commit_margin_min_packets", None), None, "no margin before a commit");
    assert!(s.get("peer_heartbeat_age_seconds", None) < 5.0);
    assert!(s.get("link_packets_dropped_total", Some(("reason", "auth_failed"))) == 0.0);
    // No SA on the host: nothing sampled, nothing compared, the lag's
    // gauges absent; per-SA series off by default.
    let buckets = s.histogram("replication_lag_packets");
    let bounds: Vec<f64> = buckets.iter().map(|b| b.0).collect();
    assert_eq!(bounds, [0.0, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, f64::INFINITY]);
    assert!(buckets.iter().all(|b| b.1 == 0.0), "{buckets:?}");
    assert_eq!(s.value("replication_lag_last_max_packets", None), None);
    assert_eq!(s.get("metrics_per_sa_limit", None), 0.0);
    assert!(!s.body.contains("\nxfrmsync_sync_sa_"), "per-SA series while off:\n{}", s.body);
    let a = pair.scrape("a");
    assert_eq!(a.get("role", Some(("role", "active"))), 1.0);
    assert_eq!(a.get("role", Some(("role", "standby"))), 0.0);

    // A resync moves the counters of both (no SA here, so no record: the
    // records themselves are counted in the VM tests' takeovers).
    let asked = s.get("resyncs_total", Some(("kind", "asked")));
    let completed = s.get("resyncs_total", Some(("kind", "completed")));
    let served = a.get("resyncs_total", Some(("kind", "served")));
    let link_received = s.get("link_packets_received_total", None);
    assert!(pair.ask("s", &["resync"]).unwrap().status.success());
    pair.wait("s", "the second snapshot", |st| st["resyncs"]["completed"].as_u64() > Some(completed as u64));
    let s = pair.scrape("s");
    assert_eq!(s.get("resyncs_total", Some(("kind", "asked"))), asked + 1.0);
    assert!(s.get("resyncs_total", Some(("kind", "completed"))) > completed);
    assert!(s.get("link_packets_received_total", None) > link_received);
    assert!(pair.scrape("a").get("resyncs_total", Some(("kind", "served"))) > served);

    // A commit: S is active at epoch 1, A is replaced and learns it.
    let commit = pair.ask("s", &["commit"]).unwrap();
    assert!(commit.status.success(), "{}", text(&commit));
    pair.wait("a", "being replaced", |st| st["role"] == "replaced");
    let s = pair.scrape("s");
    assert_eq!(s.get("epoch", None), 1.0);
    assert_eq!(s.get("epoch_changes_total", None), 1.0);
    assert_eq!(s.get("commits_total", None), 1.0);
    assert_eq!(s.get("role", Some(("role", "active"))), 1.0);
    assert_eq!(s.get("role", Some(("role", "standby"))), 0.0);
    let a = pair.scrape("a");
    assert_eq!(a.get("epoch", None), 1.0);
    assert_eq!(a.get("epoch_changes_total", None), 1.0);
    assert_eq!(a.get("role", Some(("role", "replaced"))), 1.0);
    assert_eq!(a.get("role", Some(("role", "active"))), 0.0);

    // Another path is not found; another method not allowed.
    let (status, _, _) = pair.get("s", "/");
    assert_eq!(status, "HTTP/1.0 404 Not Found");
    let (status, _, _) = pair.get("s", "/metricsx");
    assert_eq!(status, "HTTP/1.0 404 Not Found");

    // A client that sends nothing holds up neither the daemon nor the
    // next scrape, and is closed after a second.
    let mut silent = TcpStream::connect(("127.0.0.1", Pair::metrics_port("s"))).unwrap();
    let started = Instant::now();
    assert_eq!(pair.scrape("s").get("role", Some(("role", "active"))), 1.0);
    let answered = started.elapsed();
    assert!(answered < Duration::from_millis(900), "the scrape waited for the silent client: {answered:?}");
    assert_eq!(pair.status("s")["role"], "active");
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).map_err(|e| e.kind()), Ok(0), "closed, without an answer");
    let closed = started.elapsed();
    assert!(closed >= Duration::from_millis(900), "closed after {closed:?}");

    // `--metrics` wins over the config's key.
    pair.stop("a");
    pair.start_with("a", "standby", &pair.dir.join("key"), &["--metrics", "127.0.0.1:9479"]);
    assert!(TcpStream::connect(("127.0.0.1", Pair::metrics_port("a"))).is_err(), "the config's port, not the flag's");
    let mut stream = TcpStream::connect(("127.0.0.1", 9479)).unwrap();
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(answer.contains("xfrmsync_sync_role{role=\"standby\"} 1\n"), "{answer}");

    // `--metrics-per-sa` wins over the config's `metrics_per_sa` (0 here).
    pair.stop("s");
    pair.start_with("s", "standby", &pair.dir.join("key"), &["--metrics-per-sa", "7"]);
    assert_eq!(pair.scrape("s").get("metrics_per_sa_limit", None), 7.0);
    let refused = xfrmsync().args(["sync", "--metrics-per-sa", "100001", "check"]).output().unwrap();
    assert!(!refused.status.success() && text(&refused).contains("100001"), "{}", text(&refused));
}
