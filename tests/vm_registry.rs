//! Rules applied as SAs appear, on a real kernel: run inside the test VM by
//! vmtest/guest/kernel-suite.sh (`--ignored --test-threads=1`). Each test
//! builds its own network namespace with `ip`, so it needs nothing of
//! net-setup.sh. Thresholds are checked in the kernel's own GETAE answer,
//! read attribute by attribute here, not through the library's decoder.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xfrmsync::registry::{Direction, Prefix};
use xfrmsync::wire::{self, Messages, Sender};
use xfrmsync::{Handle, Mark, Registry, Rule, SaId, SaMatch, Thresholds};

const AUTH: &str = "auth-trunc hmac(sha256) 0x0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef 128 enc cbc(aes) 0x0123456789abcdef0123456789abcdef";

fn sh(script: &str) {
    let status = Command::new("bash").args(["-ec", script]).status().expect("bash");
    assert!(status.success(), "failed: {script}");
}

/// A fresh namespace `name` whose loopback holds 10.77.0.1 and fd77::1: the
/// local end of every SA below.
fn namespace(name: &str) -> String {
    sh(&format!(
        "modprobe -a xfrm_user esp4 esp6 authenc; ip netns del {name} 2>/dev/null || true; ip netns add {name}; \
         ip -n {name} link set lo up; ip -n {name} addr add 10.77.0.1/32 dev lo; \
         ip -n {name} addr add fd77::1/128 dev lo nodad"
    ));
    format!("/run/netns/{name}")
}

fn hz() {
    // The host passes the booted kernel's CONFIG_HZ (scripts/test).
    if let Some(hz) = std::env::var("XFRMSYNC_EXPECTED_HZ").ok().and_then(|v| v.parse().ok()) {
        xfrmsync::timer::set_kernel_hz(hz).unwrap();
    }
}

/// Thresholds as the kernel answers GETAE: replay packets and the timer in
/// its 100 ms units, found by walking the answer's attributes by hand.
fn raw_thresholds(netns: &str, sa: &SaId) -> (u32, u32) {
    raw_thresholds_of(netns, &[*sa])[0]
}

fn raw_thresholds_of(netns: &str, sas: &[SaId]) -> Vec<(u32, u32)> {
    // A socket of our own in the namespace, made on a thread that enters it.
    let ns = std::fs::File::open(netns).unwrap();
    let sas = sas.to_vec();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns moves this short-lived thread only.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_XFRM).unwrap();
        socket.bind_auto().unwrap();
        let (mut out, mut buf) = (Vec::new(), vec![0u8; 8192]);
        sas.iter()
            .map(|sa| {
                // As the library reads them: a marked SA one threshold a
                // request, which no kernel can crash on.
                let (mut replay, mut timer) = (None, None);
                for &ask in wire::threshold_reads(sa) {
                    wire::encode_getae(&mut out, Sender { seq: 77, port_id: 0 }, sa, ask);
                    socket.send(&out, 0).unwrap();
                    let (n, _) = socket.recv_from(&mut &mut buf[..], 0).unwrap();
                    let msg = Messages::new(&buf[..n]).next().unwrap().unwrap();
                    assert_eq!(msg.kind, wire::XFRM_MSG_NEWAE, "GETAE for {sa} answered with type {}", msg.kind);
                    // struct xfrm_aevent_id is 48 bytes; attributes follow, 4-aligned.
                    let (mut at, attrs) = (0, &msg.payload[48..]);
                    while at + 4 <= attrs.len() {
                        let len = u16::from_ne_bytes([attrs[at], attrs[at + 1]]) as usize;
                        let kind = u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]);
                        let value = || u32::from_ne_bytes(attrs[at + 4..at + 8].try_into().unwrap());
                        match kind {
                            11 => replay = Some(value()), // XFRMA_REPLAY_THRESH
                            12 => timer = Some(value()),  // XFRMA_ETIMER_THRESH
                            _ => {}
                        }
                        at += (len + 3) & !3;
                    }
                }
                (replay.expect("XFRMA_REPLAY_THRESH"), timer.expect("XFRMA_ETIMER_THRESH"))
            })
            .collect()
    })
    .join()
    .unwrap()
}

fn rule(name: &str, matches: SaMatch, replay_packets: u32, timer_ms: u32) -> Rule {
    Rule { name: name.into(), matches, thresholds: Thresholds { replay_packets, timer_ms } }
}

fn prefix(p: &str) -> Option<Prefix> {
    Some(p.parse().unwrap())
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/kernel-suite.sh)"]
fn rules_give_each_sa_the_most_specific_thresholds() {
    hz();
    let netns = namespace("rules");
    // spi, src, dst, reqid, extra
    let sas = [
        (0x100, "10.77.0.1", "10.77.1.1", 1, "replay-window 32"),
        (0x101, "10.77.1.1", "10.77.0.1", 1, "replay-window 32"),
        (0x200, "10.77.0.1", "10.77.1.2", 2, "flag esn replay-window 128"),
        (0x300, "10.77.0.1", "10.77.1.3", 3, "replay-window 64"),
        (0x400, "fd77::1", "fd77:1::1", 4, "replay-window 32"),
        (0x500, "10.77.0.1", "10.77.1.5", 5, "replay-window 32 mark 0x7 mask 0xff"),
    ];
    let add = |list: &[(u32, &str, &str, u32, &str)]| {
        let batch: String = list
            .iter()
            .map(|(spi, src, dst, reqid, extra)| {
                format!("xfrm state add src {src} dst {dst} proto esp spi {spi:#x} reqid {reqid} mode transport {extra} {AUTH}\n")
            })
            .collect();
        std::fs::write("/tmp/rules.batch", batch).unwrap();
        sh("ip -n rules -batch /tmp/rules.batch");
    };
    // Half exist before the registry starts, half appear while it runs.
    add(&sas[..3]);
    let registry = Registry::new(Handle::builder().netns_path(&netns).open().unwrap());
    let applied = Arc::new(Mutex::new(Vec::new()));
    let log = applied.clone();
    registry
        .on_applied(Some(Box::new(move |_, a| {
            log.lock().unwrap().push((a.sa.spi, a.thresholds, a.result.is_ok(), a.rule.map(str::to_string)))
        })))
        .unwrap();
    let rules = vec![
        rule("all", SaMatch::default(), 10, 3000),
        rule("reqid1-out", SaMatch { reqid: Some(1), direction: Some(Direction::Out), ..Default::default() }, 11, 1100),
        rule("v6", SaMatch { dst: prefix("fd77:1::/32"), ..Default::default() }, 12, 1200),
        rule("marked", SaMatch { mark: Some(Mark { value: 7, mask: 0xff }), ..Default::default() }, 13, 1300),
        rule("esn-spi", SaMatch { spi: Some(0x200), ..Default::default() }, 14, 1400),
        rule("dst24", SaMatch { dst: prefix("10.77.1.0/24"), ..Default::default() }, 15, 1500),
    ];
    registry.set_rules(rules).unwrap();
    add(&sas[3..]);
    let until = Instant::now() + Duration::from_secs(10);
    while applied.lock().unwrap().len() < sas.len() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        registry.dispatch().unwrap();
    }
    let id = |spi: u32, dst: &str| {
        let sa = SaId::esp(dst.parse().unwrap(), spi);
        if spi == 0x500 {
            sa.with_mark(7, 0xff)
        } else {
            sa
        }
    };
    let expect: HashMap<u32, (u32, u32)> = [
        (0x100, (11, 11)),
        (0x101, (10, 30)),
        (0x200, (14, 14)),
        (0x300, (15, 15)),
        (0x400, (12, 12)),
        (0x500, (15, 15)),
    ]
    .into();
    // Each application names the rule it came from.
    let rule_of: HashMap<u32, String> =
        [(0x100, "reqid1-out"), (0x101, "all"), (0x200, "esn-spi"), (0x300, "dst24"), (0x400, "v6"), (0x500, "dst24")]
            .map(|(spi, name)| (spi, name.to_string()))
            .into();
    for (spi, _, ok, rule) in applied.lock().unwrap().iter() {
        assert!(*ok, "SA {spi:#x}");
        assert_eq!(rule.as_ref(), rule_of.get(spi), "rule named for SA {spi:#x}");
    }
    for (spi, _, dst, _, _) in sas {
        let got = raw_thresholds(&netns, &id(spi, dst));
        println!("SA {spi:#x}: kernel says replay {} timer {} x100ms", got.0, got.1);
        assert_eq!(got, expect[&spi], "SA {spi:#x}");
    }
    // The ESN flag comes from NEWSA/GETSA; a wide window alone is no ESN.
    assert!(registry.tracked(&id(0x200, "10.77.1.2")).unwrap().esn);
    let wide = registry.tracked(&id(0x300, "10.77.1.3")).unwrap();
    assert!(!wide.esn, "window 64 without the flag wraps at 2^32");
    assert!(
        registry.handle().query(&id(0x300, "10.77.1.3")).unwrap().replay.is_esn(),
        "yet its state has the ESN format"
    );
    assert_eq!(registry.tracked(&id(0x100, "10.77.1.1")).unwrap().direction, Some(Direction::Out));
    assert_eq!(registry.tracked(&id(0x101, "10.77.0.1")).unwrap().direction, Some(Direction::In));

    // A rule change applies to the SAs there are.
    assert!(registry.remove_rule("dst24").unwrap());
    assert_eq!(raw_thresholds(&netns, &id(0x300, "10.77.1.3")), (10, 30), "now 'all'");
    assert_eq!(raw_thresholds(&netns, &id(0x500, "10.77.1.5")), (13, 13), "now 'marked'");
    // A registration for one SA beats every rule.
    registry.register_sa(id(0x100, "10.77.1.1"), Some(Thresholds { replay_packets: 99, timer_ms: 9900 })).unwrap();
    assert_eq!(raw_thresholds(&netns, &id(0x100, "10.77.1.1")), (99, 99));
    let last = applied.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.0, last.3), (0x100, None), "a registration names no rule");
    // A deleted SA is forgotten.
    sh("ip -n rules xfrm state del src 10.77.0.1 dst 10.77.1.2 proto esp spi 0x200");
    std::thread::sleep(Duration::from_millis(100));
    registry.dispatch().unwrap();
    assert!(registry.tracked(&id(0x200, "10.77.1.2")).is_none());
    assert!(applied.lock().unwrap().iter().all(|(_, _, ok, _)| *ok));
}

/// The `xfrmsync` binary built on the host (scripts/test builds it).
fn tool() -> String {
    std::env::var("XFRMSYNC_TOOL").unwrap_or_else(|_| "target/release/xfrmsync".into())
}

/// What `xfrmsync apply` printed, as the test read it: when each SA's
/// thresholds were first reported applied, and how often it said
/// notifications were lost.
#[derive(Default)]
struct ApplyOutput {
    ready: bool,
    applied_at: HashMap<u32, Instant>,
    lost: usize,
    exiting: bool,
    other_errors: Vec<String>,
}

/// The SPI of an `applied ... to esp dst D spi 0x...` line.
fn applied_spi(line: &str) -> Option<u32> {
    let rest = line.strip_prefix("applied ")?;
    let hex = rest.split(" spi 0x").nth(1)?.split_whitespace().next()?;
    u32::from_str_radix(hex, 16).ok()
}

/// Installs `count` SAs with `ip -batch` while `xfrmsync apply` runs with
/// a rule for them and the given notification buffer, and returns the
/// per-SA delay from the SA's announcement (seen by an independent
/// watcher) to the line in which `apply` reported its thresholds applied,
/// and how often `apply` said notifications were lost.
fn burst(count: u32, receive_buffer: &str) -> (Vec<Duration>, usize) {
    use std::io::BufRead;
    use std::process::Stdio;

    hz();
    let netns = namespace("burst");
    // An independent watcher with a large buffer times each SA's arrival.
    let watcher = Handle::builder().netns_path(&netns).events(false).receive_buffer(64 << 20).open().unwrap();
    watcher.watch_sas(true).unwrap();
    let wanted = Thresholds { replay_packets: 17, timer_ms: 1700 };
    let rules = "/tmp/burst-rules.toml";
    std::fs::write(
        rules,
        format!(
            "[[rule]]\nname = \"burst\"\nreqid = 42\nreplay_packets = {}\ntimer_ms = {}\n",
            wanted.replay_packets, wanted.timer_ms
        ),
    )
    .unwrap();
    let mut command = Command::new(tool());
    command.args(["--netns", "burst"]);
    if let Ok(hz) = std::env::var("XFRMSYNC_EXPECTED_HZ") {
        command.args(["--kernel-hz", &hz]);
    }
    let mut apply = command
        .args(["apply", "--receive-buffer", receive_buffer, rules])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", tool()));
    let output = Arc::new(Mutex::new(ApplyOutput::default()));
    let (stdout, stderr) = (apply.stdout.take().unwrap(), apply.stderr.take().unwrap());
    let out = output.clone();
    let stdout_reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let now = Instant::now();
            let mut out = out.lock().unwrap();
            if let Some(spi) = applied_spi(&line) {
                out.applied_at.entry(spi).or_insert(now);
            } else if line.starts_with("xfrmsync apply: ready:") {
                out.ready = true;
            } else if line.starts_with("xfrmsync apply: SIGTERM: exiting") {
                out.exiting = true;
            }
        }
    });
    let out = output.clone();
    let stderr_reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let mut out = out.lock().unwrap();
            if line.contains("SA notifications were lost; every SA is being listed again") {
                out.lost += 1;
            } else {
                out.other_errors.push(line);
            }
        }
    });
    let until = Instant::now() + Duration::from_secs(60);
    while !output.lock().unwrap().ready {
        assert!(
            Instant::now() < until,
            "xfrmsync apply never said it was ready: {:?}",
            output.lock().unwrap().other_errors
        );
        assert!(
            apply.try_wait().unwrap().is_none(),
            "xfrmsync apply exited: {:?}",
            output.lock().unwrap().other_errors
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let batch: String = (0..count)
        .map(|i| {
            let spi = 0x10000 + i;
            let dst = format!("10.78.{}.{}", i / 250, i % 250 + 1);
            format!("xfrm state add src 10.77.0.1 dst {dst} proto esp spi {spi:#x} reqid 42 mode transport replay-window 32 {AUTH}\n")
        })
        .collect();
    std::fs::write("/tmp/burst.batch", batch).unwrap();
    let mut announced = HashMap::new();
    let installer = std::thread::spawn(|| sh("ip -n burst -batch /tmp/burst.batch"));
    let until = Instant::now() + Duration::from_secs(300);
    // Woken by the kernel as `apply` is, so that each SA's announcement is
    // timed when the kernel sends it, not at the next turn of a sleep.
    watcher.set_dispatch_limit(usize::MAX).unwrap();
    while announced.len() < count as usize && Instant::now() < until {
        let mut readable = libc::pollfd { fd: watcher.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, alive for the call.
        unsafe { libc::poll(&mut readable, 1, 100) };
        watcher
            .dispatch_with(&mut |_, notice| {
                if notice.change == xfrmsync::SaChange::New {
                    announced.entry(notice.info.sa.spi).or_insert_with(Instant::now);
                }
            })
            .unwrap();
    }
    installer.join().unwrap();
    while output.lock().unwrap().applied_at.len() < count as usize && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM: a clean exit, status 0, as the systemd unit expects.
    // SAFETY: kill(2) on the child's pid, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(apply.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let status = apply.wait().unwrap();
    stdout_reader.join().unwrap();
    stderr_reader.join().unwrap();
    let output = output.lock().unwrap();
    assert!(
        status.success() && output.exiting,
        "xfrmsync apply on SIGTERM: {status}, stderr {:?}",
        output.other_errors
    );
    assert!(output.other_errors.is_empty(), "xfrmsync apply reported errors: {:?}", output.other_errors);

    // Every SA carries the rule's thresholds, in the kernel's own answer.
    let mut all = Vec::new();
    watcher.dump_sas(|info| all.push(info.sa)).unwrap();
    let burst_sas: Vec<SaId> = all.into_iter().filter(|sa| sa.spi >= 0x10000).collect();
    assert_eq!(burst_sas.len(), count as usize, "SAs in the GETSA dump");
    let on_defaults: Vec<_> = burst_sas
        .iter()
        .zip(raw_thresholds_of(&netns, &burst_sas))
        .filter(|(_, (replay, timer))| (*replay, timer * 100) != (wanted.replay_packets, wanted.timer_ms))
        .map(|(sa, (replay, timer))| (format!("{:#x}", sa.spi), replay, timer, output.applied_at.contains_key(&sa.spi)))
        .collect();
    assert!(
        on_defaults.is_empty(),
        "{} SAs without the rule's thresholds ({} reported applied, notifications lost {} times); first: {:?}",
        on_defaults.len(),
        output.applied_at.len(),
        output.lost,
        &on_defaults[..on_defaults.len().min(5)]
    );
    assert_eq!(output.applied_at.len(), count as usize, "SAs xfrmsync apply reported applied");
    let mut delays: Vec<Duration> = announced
        .iter()
        .filter_map(|(spi, at)| output.applied_at.get(spi).map(|done| done.saturating_duration_since(*at)))
        .collect();
    delays.sort();
    (delays, output.lost)
}

fn report(what: &str, delays: &[Duration], losses: usize) {
    let median = delays[delays.len() / 2];
    let worst = delays[delays.len() - 1];
    println!(
        "burst {what}: {} SAs, install to thresholds: median {median:?}, worst {worst:?}; ENOBUFS seen {losses} times",
        delays.len()
    );
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/kernel-suite.sh)"]
fn a_burst_of_sas_all_get_their_thresholds() {
    let count = std::env::var("XFRMSYNC_BURST").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let (delays, losses) = burst(count, "8M");
    report("xfrmsync apply, large buffer", &delays, losses);
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/kernel-suite.sh)"]
fn a_burst_with_lost_notifications_is_recovered_by_listing() {
    let count = std::env::var("XFRMSYNC_BURST").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    // A buffer for a handful of notifications: most are lost.
    let (delays, losses) = burst(count, "4096");
    report("xfrmsync apply, tiny buffer", &delays, losses);
    assert!(losses > 0, "the tiny buffer should have overflowed");
}
