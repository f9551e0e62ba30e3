//! HA sync under live ESP traffic (issue 13): the engine's active side on
//! node A, its records handed to a standby S in process (the daemon's
//! transport is tested on its own), then A dies, S commits and takes the
//! service address, and the kernels' own counters say whether the peer P
//! accepted everything S sent. Run inside the VM by
//! vmtest/guest/ha-suite.sh (`--ignored`), which builds the namespaces and
//! SAs and names them in `XFRMSYNC_HA_PAIRS`; `XFRMSYNC_HA_MODE` is
//! `clean` (the sync link cut 1 s before A dies, so the last records are
//! lost) or `overrun` (A's event socket overruns again and again). On the
//! host, where the kernel has no ESP, it is listed as ignored.

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use xfrmsync::sync::{Active, ActiveConfig, CommitOptions, MarginPolicy, Outcome, Outgoing, Standby, SyncRecord};
use xfrmsync::{AeUpdate, Error, Handle, Replay, SaId, Thresholds};

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

enum Sync {
    Record(Box<SyncRecord>),
    Gone(SaId),
}

struct ActiveReport {
    stats: xfrmsync::sync::ActiveStats,
    lost: u64,
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/ha-suite.sh)"]
fn a_standby_takes_over_live_sas_and_the_peer_accepts_every_packet() {
    let mode = std::env::var("XFRMSYNC_HA_MODE").unwrap_or_else(|_| "clean".into());
    let overrun = mode == "overrun";
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

    // A's active side, in a thread of its own as a daemon would run it.
    let link_up = Arc::new(AtomicBool::new(true));
    let stopping = Arc::new(AtomicBool::new(false));
    let dropped = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<Sync>();
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
            let config =
                ActiveConfig { default_thresholds: thresholds, refresh: Duration::from_secs(2), ..Default::default() };
            let mut active = Active::new(handle, 1, config).expect("the active side");
            let mut lost = 0;
            while !stopping.load(Ordering::Relaxed) {
                let wait = match overrun {
                    true => Duration::from_millis(200),
                    false => active.next_due().saturating_duration_since(Instant::now()).min(Duration::from_millis(50)),
                };
                let mut pfd =
                    libc::pollfd { fd: active.registry().handle().event_fd(), events: libc::POLLIN, revents: 0 };
                if overrun {
                    thread::sleep(wait);
                } else {
                    // SAFETY: one pollfd, valid for the call.
                    unsafe { libc::poll(&mut pfd, 1, wait.as_millis() as i32) };
                }
                let sent = active.dispatch(&mut |outgoing| {
                    if !link_up.load(Ordering::Relaxed) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    let message = match outgoing {
                        Outgoing::Record(r) => Sync::Record(Box::new(*r)),
                        Outgoing::Gone(sa) => Sync::Gone(*sa),
                    };
                    let _ = tx.send(message);
                });
                match sent {
                    Ok(_) => {}
                    Err(Error::EventsLost) => lost += 1,
                    Err(e) => panic!("active dispatch: {e}"),
                }
            }
            ActiveReport { stats: active.stats(), lost }
        })
    };
    let mut standby = Standby::new(0);
    let take = |standby: &mut Standby| {
        for message in rx.try_iter() {
            match message {
                Sync::Record(r) => {
                    standby.receive(*r);
                }
                Sync::Gone(sa) => {
                    standby.forget(&sa);
                }
            }
        }
    };

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
        take(&mut standby);
        thread::sleep(Duration::from_millis(20));
    }
    let cut_for = if overrun { Duration::ZERO } else { Duration::from_secs(1) };
    take(&mut standby);
    link_up.store(false, Ordering::Relaxed);
    thread::sleep(cut_for);

    // A dies without a goodbye: its sync stops, its senders and its links go.
    stopping.store(true, Ordering::Relaxed);
    let report = active.join().expect("the active thread");
    stop(&mut a_senders);
    ip(&["-n", "ha", "link", "set", "a0", "down"]);
    ip(&["-n", "ha", "link", "set", "y-a", "down"]);
    take(&mut standby);
    let a_final: HashMap<SaId, xfrmsync::Aevent> =
        pairs.iter().flat_map(|pr| [pr.out, pr.inb]).map(|sa| (sa, a.query(&sa).unwrap())).collect();

    // S takes the service address and commits.
    ip(&["-n", "hs", "addr", "add", "10.30.0.1/24", "dev", "s0"]);
    ip(&["-n", "hs", "addr", "add", "fd00:30::1/64", "dev", "s0", "nodad"]);
    ip(&["-n", "hp", "neigh", "flush", "dev", "p0"]);
    let options = CommitOptions {
        margin: MarginPolicy { detection_ms: DETECTION_MS, ..MarginPolicy::default() },
        ..CommitOptions::default()
    };
    let commit_started = Instant::now();
    let commit = standby.commit(&s, &options).expect("commit");
    let commit_ms = commit_started.elapsed().as_secs_f64() * 1000.0;
    let committed_at = Instant::now();
    let s_after_commit: HashMap<SaId, xfrmsync::Aevent> =
        pairs.iter().flat_map(|pr| [pr.out, pr.inb]).map(|sa| (sa, s.query(&sa).unwrap())).collect();
    let mut s_senders: Vec<Child> =
        pairs.iter().filter(|pr| !pr.needs_rekey()).map(|pr| sender("hs", pr.peer, pr.port, 1_000_000)).collect();

    // The first packet of S that P accepts, per pair.
    let mut first_accepted: HashMap<String, f64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(6);
    while first_accepted.len() < pairs.iter().filter(|pr| !pr.needs_rekey()).count() && Instant::now() < deadline {
        for pair in pairs.iter().filter(|pr| !pr.needs_rekey()) {
            if first_accepted.contains_key(&pair.name) {
                continue;
            }
            if p.query(&pair.out).unwrap().replay.seq64() > a_final[&pair.out].replay.oseq64() {
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
    println!(
        "mode {mode}: records {} (events {}, listings {}, notifications {}), own updates skipped {}, overruns {}, \
         dropped on the cut link {}; standby holds {} records, epoch {}",
        report.stats.records,
        report.stats.from_events,
        report.stats.from_listings,
        report.stats.from_notifications,
        report.stats.own_updates,
        report.lost,
        dropped.load(Ordering::Relaxed),
        standby.len(),
        standby.epoch()
    );
    println!("commit: {} SAs written in {commit_ms:.1} ms, new epoch {}", commit.written(), commit.epoch);
    println!(
        "{:<8} {:<4} {:>12} {:>12} {:>12} {:>7} {:>6} {:>8} {:>8}",
        "pair", "dir", "synced", "A last", "S next", "margin", "gap", "age ms", "rate/s"
    );
    let mut failures = Vec::new();
    for sa_commit in &commit.sas {
        let pair = pairs.iter().find(|pr| pr.out == sa_commit.sa || pr.inb == sa_commit.sa).unwrap();
        let outbound = pair.out == sa_commit.sa;
        let a_last =
            if outbound { a_final[&sa_commit.sa].replay.oseq64() } else { a_final[&sa_commit.sa].replay.seq64() };
        match &sa_commit.outcome {
            Outcome::Written { synced, written, margin, .. } => {
                let gap = *written as i64 + 1 - a_last as i64;
                println!(
                    "{:<8} {:<4} {synced:>12} {a_last:>12} {:>12} {margin:>7} {gap:>6} {:>8} {:>8.1}",
                    pair.name,
                    if outbound { "out" } else { "in" },
                    written + 1,
                    sa_commit.record_age_ms,
                    sa_commit.rate_per_ks as f64 / 1000.0
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
            Outcome::NeedsRekey { synced, next, margin } => {
                println!(
                    "{:<8} {:<4} {synced:>12} {a_last:>12} {:>12} {margin:>7} needs rekey",
                    pair.name,
                    if outbound { "out" } else { "in" },
                    next
                );
                if !pair.needs_rekey() {
                    failures.push(format!("{}: reported as needing a rekey", pair.name));
                }
            }
            other => failures.push(format!("{} {}: {other:?}", pair.name, sa_commit.sa)),
        }
    }
    let committed: Vec<SaId> = commit.sas.iter().map(|c| c.sa).collect();
    for pair in &pairs {
        for sa in [pair.out, pair.inb] {
            if !committed.contains(&sa) {
                failures.push(format!("{}: {sa} had no record at takeover", pair.name));
            }
        }
        let rekey_out = commit.sas.iter().find(|c| c.sa == pair.out);
        if pair.needs_rekey() {
            if !matches!(rekey_out.map(|c| &c.outcome), Some(Outcome::NeedsRekey { .. })) {
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
        let s_in = s.query(&pair.inb).unwrap();
        if s_in.lifetime.packets <= s_after_commit[&pair.inb].lifetime.packets {
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
            "{:<8} service->P: A sent {a_sent}, S sent {s_sent}, P accepted {p_accepted}: {} lost; first accepted {:.0} ms after commit",
            pair.name,
            (a_sent + s_sent).saturating_sub(p_accepted),
            first_accepted.get(&pair.name).copied().unwrap_or(f64::NAN)
        );
    }
    let counter = |stat: &HashMap<String, u64>, name: &str| stat.get(name).copied().unwrap_or(0);
    for name in ["XfrmInStateSeqError", "XfrmInNoStates", "XfrmInStateInvalid"] {
        let (before, after) = (counter(&p_stat_before, name), counter(&p_stat_after, name));
        println!("P {name}: {before} -> {after}; S {name}: {}", counter(&s_stat, name));
        if name == "XfrmInStateSeqError" && after != before {
            failures.push(format!("P refused {} packets as replays", after - before));
        }
    }
    if counter(&s_stat, "XfrmInStateSeqError") != 0 {
        failures.push(format!("S refused {} of P's packets as replays", counter(&s_stat, "XfrmInStateSeqError")));
    }
    if overrun && report.lost == 0 {
        failures.push("the overrun run never overran A's event socket".into());
    }
    assert!(failures.is_empty(), "failover failed:\n  {}", failures.join("\n  "));
}
