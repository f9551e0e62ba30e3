//! HA sync under live ESP traffic (issue 13). Node A is active, S standby
//! with the same SAs, P their peer; A dies, S commits and takes the service
//! address, and the kernels' own counters say whether P accepted
//! everything S sent. Run inside the VM by vmtest/guest/ha-suite.sh
//! (`--ignored`), which builds the namespaces and SAs and names them in
//! `XFRMSYNC_HA_PAIRS`. `XFRMSYNC_HA_MODE` says how the nodes sync and
//! what goes wrong:
//! - `clean`: the library's engine in this process (A's active side in a
//!   thread, records handed to a `Standby`); the records of A's last second
//!   are lost (the link is cut before A dies);
//! - `overrun`: the same, with A's event socket overrunning again and again;
//! - `daemon`: two `xfrmsync sync` daemons over their encrypted link, which
//!   forged, corrupted and replayed packets are thrown at; the link goes
//!   down 1 s before A dies;
//! - `split`: the daemons, the link cut, S commits while A still runs, the
//!   link heals: A learns it was replaced, stops and deletes its outbound
//!   SAs, and the time both sent is measured.
//!
//! On the host, where the kernel has no ESP, it is listed as ignored.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use xfrmsync::sync::{Active, ActiveConfig, CommitOptions, MarginPolicy, Outcome, Outgoing, Standby, SyncRecord};
use xfrmsync::{AeUpdate, Aevent, Error, Handle, Replay, SaId, Thresholds};

/// Each sender's pace: 100 packets a second, per pair and direction.
const INTERVAL_MS: &str = "10";
const DETECTION_MS: u64 = 3000;

#[derive(Debug, Clone)]
struct Pair {
    name: String,
    /// service -> P
    out: SaId,
    /// P -> service
    inb: SaId,
    svc: IpAddr,
    peer: IpAddr,
    port: u16,
}

impl Pair {
    /// Starts near 2^32 and must not be written at takeover.
    fn needs_rekey(&self) -> bool {
        self.name == "rekey4"
    }
}

fn pairs() -> Vec<Pair> {
    let text = std::env::var("XFRMSYNC_HA_PAIRS").expect("XFRMSYNC_HA_PAIRS: run by ha-suite.sh");
    let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (svc, peer): (IpAddr, IpAddr) = match f[3] {
                "4" => ("10.30.0.1".parse().unwrap(), "10.30.0.2".parse().unwrap()),
                _ => ("fd00:30::1".parse().unwrap(), "fd00:30::2".parse().unwrap()),
            };
            Pair {
                name: f[0].to_string(),
                out: SaId::esp(peer, hex(f[1])),
                inb: SaId::esp(svc, hex(f[2])),
                svc,
                peer,
                port: f[6].parse().unwrap(),
            }
        })
        .collect()
}

fn open(ns: &str) -> Handle {
    Handle::builder().netns_path(format!("/run/netns/{ns}")).open().unwrap_or_else(|e| panic!("netns {ns}: {e}"))
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {}: {status}", args.join(" "));
}

fn sender(ns: &str, dst: IpAddr, port: u16, count: u32) -> Child {
    Command::new("target/vmtest/udp-send")
        .args(["--netns", ns, &dst.to_string(), &port.to_string(), &count.to_string(), "64", INTERVAL_MS])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("target/vmtest/udp-send")
}

fn stop(children: &mut Vec<Child>) {
    for child in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.clear();
}

/// The namespace's `/proc/net/xfrm_stat`.
fn xfrm_stat(ns: &str) -> HashMap<String, u64> {
    let out = Command::new("ip").args(["netns", "exec", ns, "cat", "/proc/net/xfrm_stat"]).output().expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.to_string(), f.next()?.parse().ok()?))
        })
        .collect()
}

/// The per-SA counters of `ip -s xfrm state` in the namespace, summed over
/// its SAs: how many SAs showed them, packets refused as replays, and
/// failed integrity checks.
fn sa_stats(ns: &str) -> (usize, u64, u64) {
    let out = Command::new("ip").args(["-n", ns, "-s", "xfrm", "state"]).output().expect("ip");
    let (mut sas, mut replay, mut failed) = (0, 0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "  replay-window 0 replay 0 failed 0"
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"replay-window") && words.len() >= 6 && words[2] == "replay" {
            sas += 1;
            replay += words[3].parse::<u64>().unwrap_or(0);
            failed += words[5].parse::<u64>().unwrap_or(0);
        }
    }
    (sas, replay, failed)
}

fn with_number(replay: Replay, outbound: bool, number: u64) -> Replay {
    match replay {
        Replay::Esn(mut r) if outbound => {
            (r.oseq, r.oseq_hi) = (number as u32, (number >> 32) as u32);
            Replay::Esn(r)
        }
        Replay::Esn(mut r) => {
            (r.seq, r.seq_hi) = (number as u32, (number >> 32) as u32);
            Replay::Esn(r)
        }
        Replay::Legacy(mut r) if outbound => {
            r.oseq = number as u32;
            Replay::Legacy(r)
        }
        Replay::Legacy(mut r) => {
            r.seq = number as u32;
            Replay::Legacy(r)
        }
    }
}

/// Moves the sender's outbound number and the receiver's inbound one to
/// `number`, so that the SA starts there.
fn start_at(sender: &Handle, receiver: &Handle, sa: &SaId, number: u64) {
    for (handle, outbound) in [(sender, true), (receiver, false)] {
        let replay = with_number(handle.query(sa).unwrap().replay, outbound, number);
        handle.update(sa, &AeUpdate { replay: Some(replay), ..AeUpdate::default() }).unwrap();
    }
}

/// What a commit did to one SA, whichever side of the API it came from.
#[derive(Debug)]
struct CommitRow {
    sa: SaId,
    outcome: RowOutcome,
    record_age_ms: u64,
    rate_per_ks: u64,
}

#[derive(Debug)]
enum RowOutcome {
    Written { synced: u64, written: u64, margin: u64 },
    NeedsRekey { synced: u64, margin: u64 },
    Other(String),
}

/// How the nodes sync: the engine in this process, or two daemons.
enum Nodes {
    InProcess {
        link_up: Arc<AtomicBool>,
        stopping: Arc<AtomicBool>,
        dropped: Arc<AtomicU64>,
        active: Option<thread::JoinHandle<String>>,
        rx: mpsc::Receiver<Box<SyncRecord>>,
        standby: Standby,
    },
    Daemons {
        dir: PathBuf,
        a: Option<Child>,
        s: Child,
    },
}

const XFRMSYNC: &str = "target/release/xfrmsync";

impl Nodes {
    fn in_process(overrun: bool) -> Nodes {
        let link_up = Arc::new(AtomicBool::new(true));
        let stopping = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel::<Box<SyncRecord>>();
        let active = {
            let (link_up, stopping, dropped) = (link_up.clone(), stopping.clone(), dropped.clone());
            thread::spawn(move || {
                let mut builder = Handle::builder().netns_path("/run/netns/ha");
                if overrun {
                    builder = builder.receive_buffer(4096);
                }
                let handle = builder.open().expect("netns ha");
                let thresholds = match overrun {
                    // An event per packet, read 5 times a second: it overruns.
                    true => Thresholds { replay_packets: 1, timer_ms: 100 },
                    false => Thresholds { replay_packets: 32, timer_ms: 500 },
                };
                let config = ActiveConfig {
                    default_thresholds: thresholds,
                    refresh: Duration::from_secs(2),
                    ..Default::default()
                };
                let mut active = Active::new(handle, 1, config).expect("the active side");
                let mut lost = 0;
                while !stopping.load(Ordering::Relaxed) {
                    if overrun {
                        thread::sleep(Duration::from_millis(200));
                    } else {
                        let wait = active.next_due().saturating_duration_since(Instant::now());
                        let mut pfd = libc::pollfd {
                            fd: active.registry().handle().event_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one pollfd, valid for the call.
                        unsafe { libc::poll(&mut pfd, 1, wait.min(Duration::from_millis(50)).as_millis() as i32) };
                    }
                    let sent = active.dispatch(&mut |outgoing| {
                        if !link_up.load(Ordering::Relaxed) {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        } else if let Outgoing::Record(r) = outgoing {
                            let _ = tx.send(Box::new(*r));
                        }
                    });
                    match sent {
                        Ok(_) => {}
                        Err(Error::EventsLost) => lost += 1,
                        Err(e) => panic!("active dispatch: {e}"),
                    }
                }
                let stats = active.stats();
                if overrun && lost == 0 {
                    panic!("the overrun run never overran A's event socket");
                }
                format!(
                    "A sent {} records (from events {}, listings {}, notifications {}), skipped {} of its own \
                     updates and {} older states; its event socket overran {lost} times",
                    stats.records,
                    stats.from_events,
                    stats.from_listings,
                    stats.from_notifications,
                    stats.own_updates,
                    stats.older_states
                )
            })
        };
        Nodes::InProcess { link_up, stopping, dropped, active: Some(active), rx, standby: Standby::new(0) }
    }

    /// Two daemons over the sync link, A active, S standby; returns once S
    /// holds a record of every SA.
    fn daemons(series: &str, mode: &str, sas: usize) -> Nodes {
        // Not under target/: the guest sees it through a shared file
        // system, where no Unix socket can be bound.
        let dir = PathBuf::from(format!("/run/xfrmsync-ha-{series}-{mode}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let key = dir.join("sync.key");
        run_ok(Command::new(XFRMSYNC).args(["sync", "keygen"]).arg(&key));
        let on_replaced = if mode == "split" { "delete-outbound" } else { "stop" };
        for (node, role, local, peer) in
            [("a", "active", "10.99.0.1", "10.99.0.2"), ("s", "standby", "10.99.0.2", "10.99.0.1")]
        {
            let config = format!(
                "control_socket = \"{dir}/{node}.sock\"\nstate_file = \"{dir}/{node}.state\"\nrole = \"{role}\"\n\
                 metrics = \"127.0.0.1:9477\"\nmetrics_per_sa = 100\n\
                 [link]\nlocal = \"{local}:7700\"\npeer = \"{peer}:7700\"\nkey_file = \"{key}\"\nheartbeat_ms = 200\n\
                 [active]\nrefresh_s = 30\nreplay_packets = 32\ntimer_ms = 500\nlag_sample_ms = 500\nlag_sample_sas = 64\n\
                 [standby]\ndetection_ms = {DETECTION_MS}\non_replaced = \"{on_replaced}\"\n",
                dir = dir.display(),
                key = key.display()
            );
            std::fs::write(dir.join(format!("{node}.toml")), config).unwrap();
        }
        let start = |node: &str, ns: &str| {
            let log = std::fs::File::create(dir.join(format!("{node}.log"))).unwrap();
            Command::new("ip")
                .args(["netns", "exec", ns, XFRMSYNC, "sync", "--config"])
                .arg(dir.join(format!("{node}.toml")))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("xfrmsync sync")
        };
        let s = start("s", "hs");
        let a = start("a", "ha");
        let nodes = Nodes::Daemons { dir, a: Some(a), s };
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let held = nodes.status("s").map(|st| st["sas"].as_array().map_or(0, Vec::len)).unwrap_or(0);
            if held >= sas {
                break;
            }
            assert!(Instant::now() < until, "S holds {held} of {sas} records after 20 s:\n{}", nodes.logs());
            thread::sleep(Duration::from_millis(200));
        }
        nodes
    }

    fn dir(&self) -> &Path {
        match self {
            Nodes::Daemons { dir, .. } => dir,
            Nodes::InProcess { .. } => unreachable!("daemons only"),
        }
    }

    /// `xfrmsync sync status --json` of node `a` or `s`.
    fn status(&self, node: &str) -> Option<Value> {
        let socket = self.dir().join(format!("{node}.sock"));
        let out = Command::new(XFRMSYNC).args(["sync", "status", "--json", "--socket"]).arg(socket).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().next()?).ok()
    }

    fn logs(&self) -> String {
        match self {
            Nodes::Daemons { dir, .. } => ["a", "s"]
                .iter()
                .map(|n| {
                    format!(
                        "--- {n}.log\n{}",
                        std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default()
                    )
                })
                .collect(),
            Nodes::InProcess { .. } => String::new(),
        }
    }

    /// Hands what A sent to S (in process; the daemons do it themselves).
    fn pump(&mut self) {
        if let Nodes::InProcess { rx, standby, .. } = self {
            for record in rx.try_iter() {
                standby.receive(*record).expect("a record of the suite's SAs");
            }
        }
    }

    fn cut_link(&mut self) {
        self.pump();
        match self {
            Nodes::InProcess { link_up, .. } => link_up.store(false, Ordering::Relaxed),
            Nodes::Daemons { .. } => ip(&["-n", "ha", "link", "set", "y-a", "down"]),
        }
    }

    /// A dies without a goodbye; returns what it says of itself, if anything.
    fn kill_a(&mut self) -> String {
        match self {
            Nodes::InProcess { stopping, active, .. } => {
                stopping.store(true, Ordering::Relaxed);
                active.take().unwrap().join().expect("the active thread")
            }
            Nodes::Daemons { a, .. } => {
                let mut a = a.take().unwrap();
                let _ = a.kill();
                let _ = a.wait();
                String::new()
            }
        }
    }

    /// S's takeover; returns each SA's commit and a summary line.
    fn commit(&mut self, s: &Handle) -> (Vec<CommitRow>, String) {
        self.pump();
        match self {
            Nodes::InProcess { standby, dropped, .. } => {
                let options = CommitOptions {
                    margin: MarginPolicy { detection_ms: DETECTION_MS, ..MarginPolicy::default() },
                    ..CommitOptions::default()
                };
                let held = standby.len();
                let started = Instant::now();
                let commit = standby.commit(s, &options).expect("commit");
                let rows = commit
                    .sas
                    .iter()
                    .map(|c| CommitRow {
                        sa: c.sa,
                        record_age_ms: c.record_age_ms,
                        rate_per_ks: c.rate_per_ks,
                        outcome: match &c.outcome {
                            Outcome::Written { synced, written, margin, .. } => {
                                RowOutcome::Written { synced: *synced, written: *written, margin: *margin }
                            }
                            Outcome::NeedsRekey { synced, margin, .. } => {
                                RowOutcome::NeedsRekey { synced: *synced, margin: *margin }
                            }
                            other => RowOutcome::Other(format!("{other:?}")),
                        },
                    })
                    .collect();
                let summary = format!(
                    "commit: {} of {held} SAs written in {:.1} ms, epoch {}; {} records lost on the cut link",
                    commit.written(),
                    started.elapsed().as_secs_f64() * 1000.0,
                    commit.epoch,
                    dropped.load(Ordering::Relaxed)
                );
                (rows, summary)
            }
            Nodes::Daemons { dir, .. } => {
                let out = Command::new("ip")
                    .args(["netns", "exec", "hs", XFRMSYNC, "sync", "commit", "--socket"])
                    .arg(dir.join("s.sock"))
                    .output()
                    .expect("xfrmsync sync commit");
                let text = String::from_utf8_lossy(&out.stdout).to_string();
                assert!(out.status.success(), "xfrmsync sync commit: {}\n{text}{}", out.status, self.logs());
                let status = self.status("s").expect("S's status after commit");
                let rows = status["sas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|row| !row["last_commit"].is_null())
                    .map(|row| {
                        let c = &row["last_commit"];
                        let n = |key: &str| c[key].as_u64().unwrap_or(0);
                        CommitRow {
                            sa: parse_sa(row["sa"].as_str().unwrap()),
                            record_age_ms: n("record_age_ms"),
                            rate_per_ks: n("rate_per_ks"),
                            outcome: match c["outcome"].as_str() {
                                Some("written") => RowOutcome::Written {
                                    synced: n("synced"),
                                    written: n("written"),
                                    margin: n("margin"),
                                },
                                Some("needs_rekey") => {
                                    RowOutcome::NeedsRekey { synced: n("synced"), margin: n("margin") }
                                }
                                _ => RowOutcome::Other(c["text"].to_string()),
                            },
                        }
                    })
                    .collect();
                (rows, text.lines().last().unwrap_or("").to_string())
            }
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        if let Nodes::Daemons { a, s, .. } = self {
            for child in a.iter_mut().chain([s]) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// An SA as `SaId`'s Display writes it: "DADDR/0xSPI/PROTO..." or the like;
/// read back by matching against the pairs' SAs.
fn parse_sa(text: &str) -> SaId {
    let pairs = pairs();
    pairs
        .iter()
        .flat_map(|p| [p.out, p.inb])
        .find(|sa| sa.to_string() == text)
        .unwrap_or_else(|| panic!("status names an SA the suite did not install: {text}"))
}

/// `GET /metrics` of the daemon in namespace `ns` (its metrics listen on
/// that namespace's loopback): each sample line's name and labels, and its
/// value.
fn scrape(ns: &str) -> HashMap<String, f64> {
    // bash's /dev/tcp: a Python start costs seconds under TCG.
    let fetch = "exec 3<>/dev/tcp/127.0.0.1/9477 && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3";
    let out = Command::new("ip").args(["netns", "exec", ns, "bash", "-c", fetch]).output().expect("bash");
    assert!(out.status.success(), "scraping {ns}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect()
}

fn metric(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(f64::NAN)
}

/// What the daemons' metrics say while A syncs S.
fn check_metrics_while_syncing(sas: usize, failures: &mut Vec<String>) {
    let (a, s) = (scrape("ha"), scrape("hs"));
    for (what, ok) in [
        ("A's records_sent_total > 0", metric(&a, "xfrmsync_sync_records_sent_total") > 0.0),
        ("A's role is active", metric(&a, "xfrmsync_sync_role{role=\"active\"}") == 1.0),
        ("S's records_received_total > 0", metric(&s, "xfrmsync_sync_records_received_total") > 0.0),
        ("S's role is standby", metric(&s, "xfrmsync_sync_role{role=\"standby\"}") == 1.0),
        ("S holds a record of every SA", metric(&s, "xfrmsync_sync_records_held") == sas as f64),
        ("S's last record is under 2 s old", metric(&s, "xfrmsync_sync_last_record_age_seconds") < 2.0),
        (
            "S's last record from A's address is under 2 s old",
            metric(&s, "xfrmsync_sync_peer_record_age_seconds{peer=\"10.99.0.1:7700\"}") < 2.0,
        ),
    ] {
        if !ok {
            failures.push(format!("metrics: {what}"));
        }
    }
}

/// The replication lag S measures by A's samples (every 500 ms, every SA):
/// under traffic some record is behind, none by more than its margin, and
/// the SAs of the pair whose traffic stopped (rekey4 sends 100 packets)
/// come to 0 behind once their last timer event is in: a sample that
/// compared the wrong numbers, or came from the wrong SA, would not.
fn check_lag_while_syncing(pairs: &[Pair], failures: &mut Vec<String>) {
    let quiet: Vec<String> =
        pairs.iter().filter(|p| p.needs_rekey()).flat_map(|p| [p.out, p.inb]).map(|sa| sa.to_string()).collect();
    let series = |m: &HashMap<String, f64>, family: &str, sa: &str| {
        m.iter().find(|(k, _)| k.starts_with(&format!("{family}{{sa=\"{sa}\","))).map(|(_, v)| *v)
    };
    let until = Instant::now() + Duration::from_secs(6);
    let s = loop {
        let s = scrape("hs");
        let settled = quiet.iter().all(|sa| series(&s, "xfrmsync_sync_sa_replication_lag_packets", sa) == Some(0.0));
        if settled || Instant::now() > until {
            break s;
        }
        thread::sleep(Duration::from_millis(250));
    };
    let lagged: Vec<(&String, f64)> = s
        .iter()
        .filter(|(k, _)| k.starts_with("xfrmsync_sync_sa_replication_lag_packets{"))
        .map(|(k, v)| (k, *v))
        .collect();
    let compared = metric(&s, "xfrmsync_sync_replication_lag_packets_count");
    let sum = metric(&s, "xfrmsync_sync_replication_lag_packets_sum");
    println!(
        "lag (S, by A's samples): {compared} compared, mean {:.1} packets, over the margin {}, not held {}, last \
         message's greatest {} ({:.2} of its margin)",
        sum / compared,
        metric(&s, "xfrmsync_sync_replication_lag_over_margin_total"),
        metric(&s, "xfrmsync_sync_replication_lag_not_held_total"),
        metric(&s, "xfrmsync_sync_replication_lag_last_max_packets"),
        metric(&s, "xfrmsync_sync_replication_lag_last_max_margin_ratio"),
    );
    for sa in &quiet {
        let lag = series(&s, "xfrmsync_sync_sa_replication_lag_packets", sa);
        if lag != Some(0.0) {
            failures.push(format!("lag: {sa}, quiet for seconds, is {lag:?} behind, not 0"));
        }
    }
    for (what, ok) in [
        ("S compared samples", compared > 0.0),
        ("some record was behind under traffic", sum > 0.0),
        ("no sample above its margin", metric(&s, "xfrmsync_sync_replication_lag_over_margin_total") == 0.0),
        ("a per-SA lag for every SA", lagged.len() == 2 * pairs.len()),
        ("none omitted under metrics_per_sa = 100", !s.contains_key("xfrmsync_sync_sa_series_omitted")),
    ] {
        if !ok {
            failures.push(format!("lag: {what}"));
        }
    }
}

/// What S's metrics say after its commit.
fn check_metrics_after_commit(sas: usize, failures: &mut Vec<String>) {
    let s = scrape("hs");
    let written = metric(&s, "xfrmsync_sync_last_commit_sas{outcome=\"written\"}");
    let rekey = metric(&s, "xfrmsync_sync_last_commit_sas{outcome=\"needs_rekey\"}");
    for (what, ok) in [
        ("S committed once", metric(&s, "xfrmsync_sync_commits_total") == 1.0),
        ("S is active", metric(&s, "xfrmsync_sync_role{role=\"active\"}") == 1.0),
        ("S's last commit wrote all but the SA that needs a rekey", written == sas as f64 - 1.0 && rekey == 1.0),
        ("S's margins at least the floor", metric(&s, "xfrmsync_sync_last_commit_margin_min_packets") >= 1024.0),
    ] {
        if !ok {
            failures.push(format!("metrics: {what}"));
        }
    }
    println!(
        "metrics after commit: S at epoch {}, commits {}, written {written}, needs rekey {rekey}, margins {}-{}",
        metric(&s, "xfrmsync_sync_epoch"),
        metric(&s, "xfrmsync_sync_commits_total"),
        metric(&s, "xfrmsync_sync_last_commit_margin_min_packets"),
        metric(&s, "xfrmsync_sync_last_commit_margin_max_packets")
    );
}

fn run_ok(command: &mut Command) {
    let out = command.output().expect("spawn");
    assert!(out.status.success(), "{command:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
}

fn counters(handle: &Handle, pairs: &[Pair]) -> HashMap<SaId, Aevent> {
    pairs.iter().flat_map(|pr| [pr.out, pr.inb]).map(|sa| (sa, handle.query(&sa).unwrap())).collect()
}

fn counter(stat: &HashMap<String, u64>, name: &str) -> u64 {
    stat.get(name).copied().unwrap_or(0)
}

/// Forged, corrupted and replayed packets on the sync link, from A's side
/// (vmtest/guest/sync-inject.py); S must drop and count every one, and its
/// records must not change.
fn inject(nodes: &Nodes, failures: &mut Vec<String>) {
    // Once the start's snapshots are all in, nothing comes until traffic.
    let received = |st: &Value| st["records"]["received"].clone();
    let mut before = nodes.status("s").expect("S's status");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        thread::sleep(Duration::from_millis(700));
        let now = nodes.status("s").expect("S's status");
        if received(&now) == received(&before) || Instant::now() > until {
            break;
        }
        before = now;
    }
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            "ha",
            "python3",
            "vmtest/guest/sync-inject.py",
            "y-a",
            "10.99.0.1",
            "10.99.0.2",
            "7700",
        ])
        .output()
        .expect("sync-inject.py");
    println!("inject: {}", String::from_utf8_lossy(&out.stdout).trim());
    assert!(out.status.success(), "sync-inject.py: {}", String::from_utf8_lossy(&out.stderr));
    thread::sleep(Duration::from_millis(300));
    let after = nodes.status("s").expect("S's status");
    let dropped = |st: &Value, why: &str| st["link"]["dropped"][why].as_u64().unwrap_or(0);
    for (why, least) in [("replayed", 3), ("auth_failed", 2), ("not_from_peer", 1)] {
        let n = dropped(&after, why) - dropped(&before, why);
        println!("S dropped {n} packets as {why}");
        if n < least {
            failures.push(format!("S dropped {n} injected packets as {why}, not {least}"));
        }
    }
    for key in ["received", "held"] {
        if after["records"][key] != before["records"][key] {
            failures.push(format!(
                "S's records {key} went from {} to {} while only injected packets came",
                before["records"][key], after["records"][key]
            ));
        }
    }
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/ha-suite.sh)"]
fn a_standby_takes_over_live_sas_and_the_peer_accepts_every_packet() {
    let mode = std::env::var("XFRMSYNC_HA_MODE").unwrap_or_else(|_| "clean".into());
    let series = std::env::var("XFRMSYNC_VM_KERNEL").unwrap_or_else(|_| "vm".into());
    let pairs = pairs();
    let (a, s, p) = (open("ha"), open("hs"), open("hp"));
    let two32 = 1u64 << 32;
    for pair in &pairs {
        match pair.name.as_str() {
            "wrap4" => start_at(&a, &p, &pair.out, two32 - 200),
            "rekey4" => start_at(&a, &p, &pair.out, two32 - 300),
            _ => {}
        }
    }
    let p_stat_before = xfrm_stat("hp");
    let mut failures = Vec::new();
    let mut nodes = match mode.as_str() {
        "clean" => Nodes::in_process(false),
        "overrun" => Nodes::in_process(true),
        "daemon" | "split" => Nodes::daemons(&series, &mode, 2 * pairs.len()),
        other => panic!("XFRMSYNC_HA_MODE {other}: clean, overrun, daemon or split"),
    };
    if mode == "daemon" {
        // No traffic yet, so that nothing but the injected packets comes.
        inject(&nodes, &mut failures);
    }

    // Traffic both ways on every pair; the one near 2^32 without ESN only
    // briefly, so that it never reaches the end of its numbers.
    let mut a_senders = Vec::new();
    let mut p_senders = Vec::new();
    for pair in &pairs {
        let count = if pair.needs_rekey() { 100 } else { 1_000_000 };
        a_senders.push(sender("ha", pair.peer, pair.port, count));
        p_senders.push(sender("hp", pair.svc, pair.port, count));
    }
    let run_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < run_until {
        nodes.pump();
        thread::sleep(Duration::from_millis(20));
    }
    if mode == "split" {
        return split_brain(nodes, &pairs, &a, &s, a_senders, p_senders);
    }
    if mode == "daemon" {
        check_metrics_while_syncing(2 * pairs.len(), &mut failures);
        check_lag_while_syncing(&pairs, &mut failures);
    }
    if mode != "overrun" {
        nodes.cut_link();
        thread::sleep(Duration::from_secs(1));
    }

    // A dies without a goodbye: its sync stops, its senders and its links go.
    let a_said = nodes.kill_a();
    stop(&mut a_senders);
    ip(&["-n", "ha", "link", "set", "a0", "down"]);
    ip(&["-n", "ha", "link", "set", "y-a", "down"]);
    let a_final = counters(&a, &pairs);

    // S takes the service address and commits.
    ip(&["-n", "hs", "addr", "add", "10.30.0.1/24", "dev", "s0"]);
    ip(&["-n", "hs", "addr", "add", "fd00:30::1/64", "dev", "s0", "nodad"]);
    ip(&["-n", "hp", "neigh", "flush", "dev", "p0"]);
    let (rows, summary) = nodes.commit(&s);
    let committed_at = Instant::now();
    let s_after_commit = counters(&s, &pairs);
    if mode == "daemon" {
        // A's namespace is down by now; S's metrics only.
        check_metrics_after_commit(2 * pairs.len(), &mut failures);
    }
    let mut s_senders: Vec<Child> =
        pairs.iter().filter(|pr| !pr.needs_rekey()).map(|pr| sender("hs", pr.peer, pr.port, 1_000_000)).collect();

    // The first packet of S that P accepts, per pair.
    let mut first_accepted: HashMap<String, f64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    while first_accepted.len() < pairs.iter().filter(|pr| !pr.needs_rekey()).count() && Instant::now() < deadline {
        for pair in pairs.iter().filter(|pr| !pr.needs_rekey()) {
            if !first_accepted.contains_key(&pair.name)
                && p.query(&pair.out).unwrap().replay.seq64() > a_final[&pair.out].replay.oseq64()
            {
                first_accepted.insert(pair.name.clone(), committed_at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_secs(2));
    stop(&mut s_senders);
    stop(&mut p_senders);
    thread::sleep(Duration::from_millis(100));
    let p_stat_after = xfrm_stat("hp");
    let s_stat = xfrm_stat("hs");

    // What happened, in figures.
    println!("mode {mode}: {a_said}");
    println!("{summary}");
    println!(
        "{:<8} {:<4} {:>12} {:>12} {:>12} {:>7} {:>6} {:>8} {:>8}",
        "pair", "dir", "synced", "A last", "S next", "margin", "gap", "age ms", "rate/s"
    );
    for row in &rows {
        let Some(pair) = pairs.iter().find(|pr| pr.out == row.sa || pr.inb == row.sa) else {
            failures.push(format!("a commit of an SA the suite did not install: {}", row.sa));
            continue;
        };
        let outbound = pair.out == row.sa;
        let dir = if outbound { "out" } else { "in" };
        let a_last = if outbound { a_final[&row.sa].replay.oseq64() } else { a_final[&row.sa].replay.seq64() };
        match &row.outcome {
            RowOutcome::Written { synced, written, margin } => {
                let gap = *written as i64 + 1 - a_last as i64;
                println!(
                    "{:<8} {dir:<4} {synced:>12} {a_last:>12} {:>12} {margin:>7} {gap:>6} {:>8} {:>8.1}",
                    pair.name,
                    written + 1,
                    row.record_age_ms,
                    row.rate_per_ks as f64 / 1000.0
                );
                if outbound && *written < a_last {
                    failures.push(format!(
                        "{}: S's first number {} is not above A's last {a_last}",
                        pair.name,
                        written + 1
                    ));
                }
                if pair.needs_rekey() && outbound {
                    failures.push(format!("{}: written across 2^32 without ESN", pair.name));
                }
            }
            RowOutcome::NeedsRekey { synced, margin } => {
                println!("{:<8} {dir:<4} {synced:>12} {a_last:>12} {:>12} {margin:>7} needs rekey", pair.name, "-");
                if !pair.needs_rekey() {
                    failures.push(format!("{}: reported as needing a rekey", pair.name));
                }
            }
            RowOutcome::Other(what) => failures.push(format!("{} {}: {what}", pair.name, row.sa)),
        }
    }
    if mode == "overrun" {
        // Snapshots after each overrun keep the records current: none is
        // older than a refresh period (2 s) and the time to take A down.
        for row in rows.iter().filter(|r| r.record_age_ms > 3000) {
            failures.push(format!("{}: its record was {} ms old despite the snapshots", row.sa, row.record_age_ms));
        }
    }
    for pair in &pairs {
        for sa in [pair.out, pair.inb] {
            if !rows.iter().any(|r| r.sa == sa) {
                failures.push(format!("{}: {sa} had no record at takeover", pair.name));
            }
        }
        if pair.needs_rekey() {
            let out_row = rows.iter().find(|r| r.sa == pair.out);
            if !matches!(out_row.map(|r| &r.outcome), Some(RowOutcome::NeedsRekey { .. })) {
                failures.push(format!("{}: not reported as needing a rekey", pair.name));
            }
            if s_after_commit[&pair.out].replay.oseq64() != 0 {
                failures.push(format!("{}: S's SA was written", pair.name));
            }
            continue;
        }
        // Lifetimes: at least A's at the moment of failure.
        for sa in [pair.out, pair.inb] {
            let (s_bytes, a_bytes) = (s_after_commit[&sa].lifetime.bytes, a_final[&sa].lifetime.bytes);
            if s_bytes < a_bytes {
                failures.push(format!("{}: S's lifetime bytes {s_bytes} below A's {a_bytes} for {sa}", pair.name));
            }
        }
        if !first_accepted.contains_key(&pair.name) {
            failures.push(format!("{}: P accepted no packet of S within 6 s", pair.name));
        }
        if s.query(&pair.inb).unwrap().lifetime.packets <= s_after_commit[&pair.inb].lifetime.packets {
            failures.push(format!("{}: S accepted no packet of P after commit", pair.name));
        }
        if pair.name == "wrap4" {
            let (a_last, s_now) = (a_final[&pair.out].replay.oseq64(), s.query(&pair.out).unwrap().replay.oseq64());
            if a_last < two32 || s_now <= a_last {
                failures.push(format!("wrap4: A's last {a_last:#x} and S's {s_now:#x} do not both pass 2^32 in order"));
            }
        }
        // Packets lost across failover, service -> P: what A and S sent
        // that P did not accept.
        let s_sent = s.query(&pair.out).unwrap().lifetime.packets - s_after_commit[&pair.out].lifetime.packets;
        let p_accepted = p.query(&pair.out).unwrap().lifetime.packets;
        let a_sent = a_final[&pair.out].lifetime.packets;
        println!(
            "{:<8} service->P: A sent {a_sent}, S sent {s_sent}, P accepted {p_accepted}: {} lost; first accepted \
             {:.0} ms after commit",
            pair.name,
            (a_sent + s_sent).saturating_sub(p_accepted),
            first_accepted.get(&pair.name).copied().unwrap_or(f64::NAN)
        );
    }
    for name in ["XfrmInStateSeqError", "XfrmInNoStates", "XfrmInStateInvalid"] {
        let (before, after) = (counter(&p_stat_before, name), counter(&p_stat_after, name));
        println!("P {name}: {before} -> {after}; S {name}: {}", counter(&s_stat, name));
    }
    let (p_sas, p_sa_replays, p_sa_failed) = sa_stats("hp");
    println!("P's {p_sas} SAs (ip -s xfrm state): {p_sa_replays} packets refused as replays, {p_sa_failed} failed");
    if p_sas != 2 * pairs.len() {
        failures.push(format!("ip -s xfrm state showed the counters of {p_sas} of P's {} SAs", 2 * pairs.len()));
    }
    if p_sa_replays != 0 || p_sa_failed != 0 {
        failures.push(format!("P's SAs refused {p_sa_replays} replays and failed {p_sa_failed} packets"));
    }
    let p_replays = counter(&p_stat_after, "XfrmInStateSeqError") - counter(&p_stat_before, "XfrmInStateSeqError");
    if p_replays != 0 {
        failures.push(format!("P refused {p_replays} packets as replays"));
    }
    if counter(&s_stat, "XfrmInStateSeqError") != 0 {
        failures.push(format!("S refused {} of P's packets as replays", counter(&s_stat, "XfrmInStateSeqError")));
    }
    assert!(failures.is_empty(), "failover failed:\n  {}\n{}", failures.join("\n  "), nodes.logs());
}

/// The sync link cut, S commits while A still runs, the link heals: A must
/// learn it was replaced, stop, and delete its outbound SAs.
fn split_brain(
    mut nodes: Nodes,
    pairs: &[Pair],
    a: &Handle,
    s: &Handle,
    mut a_senders: Vec<Child>,
    mut p_senders: Vec<Child>,
) {
    nodes.cut_link();
    // Both claim the service address: that is what a split brain is.
    ip(&["-n", "hs", "addr", "add", "10.30.0.1/24", "dev", "s0"]);
    ip(&["-n", "hs", "addr", "add", "fd00:30::1/64", "dev", "s0", "nodad"]);
    let (rows, summary) = nodes.commit(s);
    let committed_at = Instant::now();
    println!("split: {summary}");
    let mut s_senders: Vec<Child> =
        pairs.iter().filter(|pr| !pr.needs_rekey()).map(|pr| sender("hs", pr.peer, pr.port, 1_000_000)).collect();
    thread::sleep(Duration::from_secs(2));
    ip(&["-n", "ha", "link", "set", "y-a", "up"]);
    let healed_at = Instant::now();
    let outbound: Vec<SaId> = pairs.iter().map(|p| p.out).collect();
    let until = Instant::now() + Duration::from_secs(15);
    let mut failures = Vec::new();
    let stopped_at = loop {
        let gone = outbound.iter().all(|sa| a.query(sa).is_err());
        let replaced = nodes.status("a").is_some_and(|st| st["role"] == "replaced");
        if gone && replaced {
            break Instant::now();
        }
        if Instant::now() > until {
            failures.push(format!("15 s after the link healed, A replaced: {replaced}, its outbound SAs gone: {gone}"));
            break Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    };
    let a_status = nodes.status("a");
    stop(&mut a_senders);
    stop(&mut s_senders);
    stop(&mut p_senders);
    let s_epoch = nodes.status("s").map(|st| st["epoch"].clone());
    println!(
        "split: both nodes sent for {:.0} ms (commit to A's outbound SAs gone), {:.0} ms of it after the link healed; \
         S's epoch {}, A: {}",
        stopped_at.duration_since(committed_at).as_secs_f64() * 1000.0,
        stopped_at.duration_since(healed_at).as_secs_f64() * 1000.0,
        s_epoch.clone().unwrap_or_default(),
        a_status.as_ref().map_or("no status".into(), |st| format!(
            "role {} replaced_by {} records sent {}",
            st["role"], st["replaced_by"], st["records"]["sent"]
        ))
    );
    if a_status.as_ref().map(|st| st["replaced_by"].clone()) != s_epoch.map(Some).unwrap_or(None) {
        failures.push("A's replaced_by is not S's epoch".into());
    }
    if !rows.iter().any(|r| matches!(r.outcome, RowOutcome::Written { .. })) {
        failures.push("S committed nothing".into());
    }
    // A replaced node sends no records.
    let sent = |st: &Option<Value>| st.as_ref().and_then(|st| st["records"]["sent"].as_u64());
    let before = sent(&a_status);
    thread::sleep(Duration::from_millis(500));
    if sent(&nodes.status("a")) != before {
        failures.push("A went on sending records after it was replaced".into());
    }
    let _ = s;
    assert!(failures.is_empty(), "split brain:\n  {}\n{}", failures.join("\n  "), nodes.logs());
}
