//! The bench's real-kernel parts (issue 9), run as root inside the test VM
//! by scripts/bench-vm (built on the host; the guest sees its files):
//!
//!   vm_bench many N       thresholds on N SAs: batched (Handle::
//!                         set_thresholds_many, 64 NEWAE a datagram) against
//!                         one request and one ACK per SA
//!   vm_bench storm SECS [bound]
//!                         1,000 SAs with replay threshold 1 under traffic:
//!                         how long one dispatch call takes and how many
//!                         events it handles, with and without the bound,
//!                         while the application is busy now and then; then
//!                         events/s, the receive buffer that sees no ENOBUFS,
//!                         overruns with a small buffer and the resync after
//!                         them (`bound`: the first part only)
//!   vm_bench commit N     HA sync (issue 13): the same N SAs in namespaces
//!                         ka (active) and kb (standby); `Active` on ka
//!                         until a `Standby` in this process holds a record
//!                         of each, then `Standby::commit` on kb, timed;
//!                         every SA's outcome counted and its number read
//!                         back from kb; the standby's bytes per SA
//!   vm_bench send SECS    (internal) the traffic, run in namespace xa
//!
//! Prints figures; asserts no timing. The SAs use the null cipher, so what
//! is measured is the XFRM and netlink path, not crypto.

use std::io::Write;
use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xfrmsync::{Error, Handle, SaId};

// The counting allocator of the host bench: the standby's bytes per SA are
// allocator totals, as the host's memory figures are.
#[allow(dead_code)]
#[path = "../alloc.rs"]
mod alloc;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

const STORM_SAS: usize = 1000;
const PORT0: u16 = 20000;

fn sh(script: &str) {
    let status = Command::new("bash").args(["-ec", script]).status().expect("bash");
    assert!(status.success(), "failed: {script}");
}

/// `ip -batch` from lines, in namespace `ns`.
fn ip_batch(ns: &str, lines: &str) {
    let mut child = Command::new("ip").args(["-n", ns, "-batch", "-"]).stdin(Stdio::piped()).spawn().expect("ip");
    child.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "ip -batch in {ns} failed");
}

/// Storm SA `i`'s destination: one address each, so that each SA has an
/// exact /32 policy, which the kernel finds by hash (a port selector would
/// put 1,000 policies on a list searched per packet).
fn storm_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn sa_line(dst: Ipv4Addr, i: usize) -> String {
    format!(
        "xfrm state add src 10.99.0.1 dst {dst} proto esp spi 0x{:x} reqid {} mode transport replay-window 32 \
         enc ecb(cipher_null) \"\"\n",
        0x10000 + i,
        1000 + i
    )
}

fn many_sa(i: usize) -> SaId {
    SaId::esp("10.99.0.2".parse().unwrap(), 0x10000 + i as u32)
}

fn sa(i: usize) -> SaId {
    SaId::esp(storm_addr(i).into(), 0x10000 + i as u32)
}

fn learn_hz() {
    if let Some(hz) = std::env::var("XFRMSYNC_EXPECTED_HZ").ok().and_then(|v| v.parse().ok()) {
        xfrmsync::timer::set_kernel_hz(hz).unwrap();
    }
}

fn many(n: usize) {
    learn_hz();
    sh("modprobe -a xfrm_user esp4 crypto_null; ip netns del xm 2>/dev/null || true; ip netns add xm");
    let lines: String = (0..n).map(|i| sa_line(Ipv4Addr::new(10, 99, 0, 2), i)).collect();
    let t = Instant::now();
    ip_batch("xm", &lines);
    println!("{n} SAs added with ip -batch in {:.1} s", t.elapsed().as_secs_f64());
    let handle = Handle::builder().netns_path("/run/netns/xm").events(false).open().unwrap();
    let sas: Vec<SaId> = (0..n).map(many_sa).collect();
    // Warm up (HZ, caches) on a few SAs, then time each way twice, with
    // values that differ each time so every request changes the SA.
    for sa in sas.iter().take(10) {
        handle.set_thresholds(sa, 3, 1000).unwrap();
    }
    let mut single_best = f64::MAX;
    let mut batched_best = f64::MAX;
    for round in 0..2u32 {
        let t = Instant::now();
        for sa in &sas {
            handle.set_thresholds(sa, 10 + round, 2000).unwrap();
        }
        single_best = single_best.min(t.elapsed().as_secs_f64());
        let items: Vec<(SaId, u32, u32)> = sas.iter().map(|sa| (*sa, 20 + round, 3000)).collect();
        let mut failed = 0;
        let t = Instant::now();
        handle.set_thresholds_many(&items, |_, r| failed += usize::from(r.is_err())).unwrap();
        batched_best = batched_best.min(t.elapsed().as_secs_f64());
        assert_eq!(failed, 0);
    }
    let check = handle.query_with_thresholds(&sas[n / 2]).unwrap();
    assert_eq!(check.replay_threshold, Some(21), "the batched values are the SA's now");
    println!("| way | SAs/s | time for {n} SAs |");
    println!("|---|---|---|");
    println!(
        "| one request and one ACK per SA (set_thresholds) | {:.0} | {:.2} s |",
        n as f64 / single_best,
        single_best
    );
    println!(
        "| batched, 64 NEWAE a datagram (set_thresholds_many) | {:.0} | {:.2} s |",
        n as f64 / batched_best,
        batched_best
    );
    println!("RATIO batched/single {:.1}x (goal >= 10x)", single_best / batched_best);
    sh("ip netns del xm");
}

/// Namespaces xa (sender) and xb (receiver), a veth between them, 1,000
/// SAs on both sides with policies sending what goes to address i through
/// SA i, and in xb replay threshold 1 for every SA (the namespace default).
fn storm_setup() {
    sh("modprobe -a veth xfrm_user esp4 crypto_null
        for n in xa xb; do ip netns del $n 2>/dev/null || true; ip netns add $n; done
        ip link add xa-veth netns xa type veth peer name xb-veth netns xb
        ip -n xa addr add 10.99.0.1/24 dev xa-veth; ip -n xa link set xa-veth up; ip -n xa link set lo up
        ip -n xb addr add 10.99.0.2/24 dev xb-veth; ip -n xb link set xb-veth up; ip -n xb link set lo up
        ip -n xa route add 10.99.0.0/16 via 10.99.0.2
        ip netns exec xb sysctl -qw net.core.xfrm_aevent_rseqth=1");
    let addrs: String = (0..STORM_SAS).map(|i| format!("addr add {}/32 dev lo\n", storm_addr(i))).collect();
    ip_batch("xb", &addrs);
    for (ns, dir) in [("xa", "out"), ("xb", "in")] {
        let mut lines = String::new();
        for i in 0..STORM_SAS {
            let dst = storm_addr(i);
            lines.push_str(&sa_line(dst, i));
            lines.push_str(&format!(
                "xfrm policy add src 10.99.0.1/32 dst {dst}/32 dir {dir} \
                 tmpl src 10.99.0.1 dst {dst} proto esp reqid {} mode transport\n",
                1000 + i
            ));
        }
        ip_batch(ns, &lines);
    }
}

fn sender(seconds: f64) -> Child {
    Command::new("ip")
        .args(["netns", "exec", "xa"])
        .arg(std::env::current_exe().unwrap())
        .args(["send", &seconds.to_string()])
        .spawn()
        .expect("sender")
}

/// Round robin over the 1,000 SAs' addresses, as fast as it goes.
fn send(seconds: f64) {
    let s = UdpSocket::bind("10.99.0.1:0").unwrap();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let payload = [0u8; 32];
    let mut sent = 0u64;
    while Instant::now() < end {
        for i in 0..STORM_SAS {
            let _ = s.send_to(&payload, (storm_addr(i), PORT0));
            sent += 1;
        }
    }
    eprintln!("sender: {sent} packets in {seconds} s");
}

/// The kernel's drop count of the netlink socket with port `port`
/// (/proc/net/netlink of the namespace the caller is in).
fn kernel_drops(handle: &Handle) -> u64 {
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: getsockname into a sockaddr_nl of the right size.
    unsafe { libc::getsockname(handle.event_fd(), (&mut addr as *mut libc::sockaddr_nl).cast(), &mut len) };
    let text = std::process::Command::new("ip")
        .args(["netns", "exec", "xb", "cat", "/proc/net/netlink"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 8 && f[2] == addr.nl_pid.to_string() {
            return f[8].parse().unwrap_or(0);
        }
    }
    0
}

struct Run {
    events: u64,
    seconds: f64,
    overruns: u64,
    max_call: Duration,
    /// Most events one dispatch call handed to callbacks.
    max_events: usize,
    calls: u64,
    resyncs: u64,
    stale: usize,
    drops: u64,
}

/// One storm phase: traffic for `seconds`, a handle on xb with `rcvbuf`
/// and `limit`, per-SA state from events; after each overrun (ENOBUFS)
/// every SA is queried again when `resync`. At the end, traffic stopped and
/// the socket drained, every SA's state is compared with the kernel's.
/// `busy`: the application is busy elsewhere for 300 ms after each second
/// of dispatching (a daemon's other work), so a backlog builds up that the
/// next dispatch call meets.
fn phase(seconds: f64, rcvbuf: usize, limit: usize, resync: bool, busy: bool) -> Run {
    let handle =
        Handle::builder().netns_path("/run/netns/xb").receive_buffer(rcvbuf).dispatch_limit(limit).open().unwrap();
    let state: Arc<Vec<AtomicU64>> = Arc::new((0..STORM_SAS).map(|_| AtomicU64::new(0)).collect());
    let delivered = Arc::new(AtomicU64::new(0));
    for i in 0..STORM_SAS {
        let (state, delivered) = (state.clone(), delivered.clone());
        handle
            .on_sa_event_view(
                sa(i),
                Some(Box::new(move |_, ev| {
                    state[i].fetch_max(ev.replay().seq64(), Ordering::Relaxed);
                    delivered.fetch_add(1, Ordering::Relaxed);
                })),
            )
            .unwrap();
    }
    let query_all = |handle: &Handle| {
        for i in 0..STORM_SAS {
            if let Ok(now) = handle.query(&sa(i)) {
                state[i].fetch_max(now.replay.seq64(), Ordering::Relaxed);
            }
        }
    };
    let mut child = sender(seconds);
    let (mut overruns, mut max_call, mut calls, mut resyncs, mut max_events) = (0, Duration::ZERO, 0, 0, 0);
    let start = Instant::now();
    let mut p = libc::pollfd { fd: handle.event_fd(), events: libc::POLLIN, revents: 0 };
    let mut pump = |until: Instant, overruns: &mut u64, resyncs: &mut u64| {
        let mut next_break = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if busy && Instant::now() >= next_break {
                std::thread::sleep(Duration::from_millis(300));
                next_break = Instant::now() + Duration::from_secs(1);
            }
            // SAFETY: one pollfd.
            if unsafe { libc::poll(&mut p, 1, 20) } <= 0 {
                continue;
            }
            let t = Instant::now();
            let r = handle.dispatch();
            max_call = max_call.max(t.elapsed());
            calls += 1;
            match r {
                Ok(n) => max_events = max_events.max(n),
                Err(Error::EventsLost) => {
                    *overruns += 1;
                    if resync {
                        query_all(&handle);
                        *resyncs += 1;
                    }
                }
                Err(e) => panic!("dispatch: {e}"),
            }
        }
    };
    pump(start + Duration::from_secs_f64(seconds), &mut overruns, &mut resyncs);
    let traffic_time = start.elapsed().as_secs_f64();
    let events_during = delivered.load(Ordering::Relaxed);
    child.wait().unwrap();
    // Traffic over: what is still queued, and the last timer events.
    pump(Instant::now() + Duration::from_millis(1500), &mut overruns, &mut resyncs);
    let mut stale = 0;
    for i in 0..STORM_SAS {
        let now = handle.query(&sa(i)).unwrap();
        if now.replay.seq64() != state[i].load(Ordering::Relaxed) {
            stale += 1;
        }
    }
    let drops = kernel_drops(&handle);
    Run { events: events_during, seconds: traffic_time, overruns, max_call, max_events, calls, resyncs, stale, drops }
}

/// `only_bound`: just the dispatch bound's two runs.
fn storm(seconds: f64, only_bound: bool) {
    learn_hz();
    storm_setup();
    println!("1,000 SAs in namespace xb with replay threshold 1 (null cipher), UDP round robin over them from xa, {seconds} s a run\n");
    println!("| receive buffer | dispatch limit | application | events/s to callbacks | ENOBUFS seen | kernel drops | longest dispatch call | most events in a call | calls | SAs stale at the end |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let row = |rcvbuf: usize, limit: usize, busy: bool, r: &Run| {
        println!(
            "| {} KiB | {} | {} | {:.0} | {} | {} | {:.2} ms | {} | {} | {} |",
            rcvbuf >> 10,
            if limit == usize::MAX { "none".to_string() } else { limit.to_string() },
            if busy { "busy 300 ms a second" } else { "dispatching" },
            r.events as f64 / r.seconds,
            r.overruns,
            r.drops,
            r.max_call.as_secs_f64() * 1e3,
            r.max_events,
            r.calls,
            r.stale
        );
    };
    // Throughput and promptness, with and without the bound, on a buffer
    // large enough to lose nothing.
    // The application is busy now and then, so the next call meets a
    // backlog: the bound is what keeps that call short.
    let big = 32 << 20;
    let bounded = phase(seconds, big, 128, true, true);
    row(big, 128, true, &bounded);
    let unbounded = phase(seconds, big, usize::MAX, true, true);
    row(big, usize::MAX, true, &unbounded);
    println!(
        "RATIO storm: {:.0} events/s with the bound, {:.0} without; longest call {:.2} ms ({} events) bounded vs {:.2} ms ({} events) unbounded",
        bounded.events as f64 / bounded.seconds,
        unbounded.events as f64 / unbounded.seconds,
        bounded.max_call.as_secs_f64() * 1e3,
        bounded.max_events,
        unbounded.max_call.as_secs_f64() * 1e3,
        unbounded.max_events
    );
    if only_bound {
        sh("ip netns del xa; ip netns del xb");
        return;
    }
    // The receive buffer needed: the smallest of these that saw no ENOBUFS.
    let mut needed = None;
    for kib in [16usize, 64, 256, 1024, 4096] {
        let r = phase(seconds, kib << 10, 128, true, false);
        row(kib << 10, 128, false, &r);
        if r.overruns == 0 && needed.is_none() {
            needed = Some(kib);
        }
    }
    match needed {
        Some(kib) => println!(
            "RATIO storm: receive buffer needed for no ENOBUFS: {kib} KiB (SO_RCVBUFFORCE; the kernel doubles it)"
        ),
        None => println!("RATIO storm: even 4 MiB saw ENOBUFS"),
    }
    // A deliberately small buffer: every overrun must be seen and resynced.
    let small = phase(seconds, 8 << 10, 128, true, false);
    row(8 << 10, 128, false, &small);
    println!(
        "RATIO storm small buffer: {} overruns reported (kernel counted {} drops), {} resyncs, {} SAs stale of {STORM_SAS} after the last",
        small.overruns, small.drops, small.resyncs, small.stale
    );
    sh("ip netns del xa; ip netns del xb");
}

/// Concentrator SA `i`'s destination, one each: the kernel hashes SAs by
/// their addresses, and walks an SA's whole bucket on every add (its genid
/// bump), so SAs sharing addresses make installing them quadratic.
fn concentrator_dst(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// Concentrator SA `i`: its own destination, a unique SPI, four reqids.
fn concentrator_sa(i: usize) -> SaId {
    SaId::esp(concentrator_dst(i).into(), 0x100000 + i as u32)
}

fn concentrator_reqid(i: usize) -> u32 {
    1000 + (i % 4) as u32
}

fn concentrator_lines(from: usize, to: usize) -> String {
    (from..to)
        .map(|i| {
            format!(
                "xfrm state add src 10.98.0.1 dst {} proto esp spi 0x{:x} reqid {} mode transport \
                 replay-window 32 enc ecb(cipher_null) \"\"\n",
                concentrator_dst(i),
                0x100000 + i,
                concentrator_reqid(i)
            )
        })
        .collect()
}

const ALL: xfrmsync::Thresholds = xfrmsync::Thresholds { replay_packets: 16, timer_ms: 2000 };
const REQID_1001: xfrmsync::Thresholds = xfrmsync::Thresholds { replay_packets: 8, timer_ms: 1000 };

fn concentrator_rules() -> Vec<xfrmsync::Rule> {
    use xfrmsync::{Rule, SaMatch};
    vec![
        Rule {
            name: "all".into(),
            matches: SaMatch { dst: Some("10.96.0.0/11".parse().unwrap()), ..Default::default() },
            thresholds: ALL,
        },
        Rule {
            name: "reqid-1001".into(),
            matches: SaMatch { reqid: Some(1001), ..Default::default() },
            thresholds: REQID_1001,
        },
    ]
}

fn expected(i: usize) -> xfrmsync::Thresholds {
    if concentrator_reqid(i) == 1001 {
        REQID_1001
    } else {
        ALL
    }
}

/// VmRSS and VmHWM of this process, in MiB.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// The thresholds of `sas` as the kernel answers a raw GETAE (replay
/// packets, timer in 100 ms units), from a socket of our own in `netns`.
fn raw_thresholds(netns: &str, sas: Vec<SaId>) -> Vec<(u32, u32)> {
    let ns = std::fs::File::open(netns).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        use xfrmsync::wire::{self, GetaeAsk, Messages, Sender};
        // SAFETY: setns moves this short-lived thread only.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        // SAFETY: a plain socket(2); the fd is closed below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_XFRM) };
        assert!(fd >= 0);
        let (mut out, mut buf) = (Vec::new(), vec![0u8; 8192]);
        let answers = sas
            .iter()
            .map(|sa| {
                // Unmarked SAs: both thresholds in one request is safe.
                wire::encode_getae(&mut out, Sender { seq: 77, port_id: 0 }, sa, GetaeAsk::BothThresholds);
                // SAFETY: the pointers describe `out` and `buf`.
                unsafe { libc::send(fd, out.as_ptr().cast(), out.len(), 0) };
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
                assert!(n > 0);
                let msg = Messages::new(&buf[..n as usize]).next().unwrap().unwrap();
                assert_eq!(msg.kind, wire::XFRM_MSG_NEWAE, "GETAE for {sa} answered with type {}", msg.kind);
                let (mut replay, mut timer, mut at, attrs) = (0, 0, 0, &msg.payload[48..]);
                while at + 8 <= attrs.len() {
                    let len = u16::from_ne_bytes([attrs[at], attrs[at + 1]]) as usize;
                    let kind = u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]);
                    let value = u32::from_ne_bytes(attrs[at + 4..at + 8].try_into().unwrap());
                    match kind {
                        11 => replay = value, // XFRMA_REPLAY_THRESH
                        12 => timer = value,  // XFRMA_ETIMER_THRESH
                        _ => {}
                    }
                    at += (len.max(4) + 3) & !3;
                }
                (replay, timer)
            })
            .collect();
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        answers
    })
    .join()
    .unwrap()
}

/// A concentrator's namespace (issue 14): `n` SAs, then rules through a
/// Registry: the first application, a relist, and recovery from a forced
/// overrun (a 4 KiB buffer while `storm` more SAs arrive); every SA's
/// thresholds checked in the kernel's raw GETAE answers.
fn concentrator(n: usize, storm: usize) {
    learn_hz();
    sh("modprobe -a xfrm_user esp4 crypto_null; ip netns del xc 2>/dev/null || true; ip netns add xc; ip -n xc link set lo up");
    let netns = "/run/netns/xc";
    let t = Instant::now();
    ip_batch("xc", &concentrator_lines(0, n));
    println!("{n} SAs added with ip -batch in {:.1} s\n", t.elapsed().as_secs_f64());
    println!("| step | time | dispatch calls | longest call | ENOBUFS | tool RSS after (peak) |");
    println!("|---|---|---|---|---|---|");
    let row = |step: &str, took: Duration, calls: u64, longest: Duration, lost: u64| {
        let (rss, hwm) = memory();
        println!(
            "| {step} | {:.2} s | {calls} | {:.1} ms | {lost} | {rss:.1} MiB ({hwm:.1}) |",
            took.as_secs_f64(),
            longest.as_secs_f64() * 1e3
        );
    };
    let (rss0, _) = memory();
    let handle = Handle::builder().netns_path(netns).events(false).receive_buffer(8 << 20).open().unwrap();
    let registry = xfrmsync::Registry::new(handle);
    let t = Instant::now();
    registry.set_rules(concentrator_rules()).unwrap();
    row(&format!("first application: {n} SAs listed and given thresholds"), t.elapsed(), 0, Duration::ZERO, 0);
    assert_eq!(registry.tracked_count(), n);
    let t = Instant::now();
    registry.resync().unwrap();
    row("a relist (every SA listed, none lacking thresholds)", t.elapsed(), 0, Duration::ZERO, 0);

    // Forced overrun: a 4 KiB buffer while more SAs arrive.
    registry.handle().set_receive_buffer(4096).unwrap();
    let lines = concentrator_lines(n, n + storm);
    let adder = std::thread::spawn(move || {
        let t = Instant::now();
        ip_batch("xc", &lines);
        t.elapsed()
    });
    let (mut calls, mut longest, mut lost) = (0u64, Duration::ZERO, 0u64);
    let t = Instant::now();
    let mut adds_took = None;
    let mut settled_at = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline {
        let wait =
            registry.relist_due().map_or(50, |d| d.saturating_duration_since(Instant::now()).as_millis().min(50));
        let mut p = libc::pollfd { fd: registry.handle().event_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd.
        unsafe { libc::poll(&mut p, 1, wait as i32) };
        let started = Instant::now();
        match registry.dispatch() {
            Ok(_) => {}
            Err(Error::EventsLost) => lost += 1,
            Err(e) => println!("dispatch: {e}"),
        }
        longest = longest.max(started.elapsed());
        calls += 1;
        if adds_took.is_none() && adder.is_finished() {
            adds_took = Some(t.elapsed());
        }
        if adds_took.is_some() {
            let applied = (n..n + storm)
                .all(|i| registry.tracked(&concentrator_sa(i)).and_then(|tr| tr.applied) == Some(expected(i)));
            if applied && registry.relist_due().is_none() {
                settled_at = Some(t.elapsed());
                break;
            }
        }
    }
    let adds_took = adds_took.unwrap_or(t.elapsed());
    let settled = settled_at.expect("every SA of the storm given its thresholds within 600 s");
    row(
        &format!(
            "overrun: {storm} SAs added ({:.1} s) with a 4 KiB buffer; until every one has its thresholds",
            adds_took.as_secs_f64()
        ),
        settled,
        calls,
        longest,
        lost,
    );
    println!(
        "\nRATIO concentrator: recovered {:.2} s after the last add; longest dispatch call {:.1} ms; ENOBUFS {lost} times",
        settled.saturating_sub(adds_took).as_secs_f64(),
        longest.as_secs_f64() * 1e3
    );

    let all = n + storm;
    let t = Instant::now();
    let answers = raw_thresholds(netns, (0..all).map(concentrator_sa).collect());
    let wrong: Vec<usize> =
        (0..all).filter(|&i| answers[i] != (expected(i).replay_packets, expected(i).timer_ms / 100)).collect();
    println!(
        "raw GETAE of all {all} SAs ({:.1} s): {} on the wrong thresholds{}",
        t.elapsed().as_secs_f64(),
        wrong.len(),
        wrong.first().map_or(String::new(), |&i| format!(", first SPI 0x{:x}: {:?}", 0x100000 + i, answers[i]))
    );
    let (rss, hwm) = memory();
    println!("RATIO concentrator memory: {:.1} MiB RSS before the handle, {rss:.1} MiB after, peak {hwm:.1} MiB", rss0);
    assert!(wrong.is_empty(), "every SA on its rule's thresholds");
    sh("ip netns del xc");
}

/// The local address of both commit namespaces: outbound SAs leave from
/// it, inbound ones arrive at it, which is how either node tells their
/// direction.
const COMMIT_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);

/// Commit SA `i`'s peer: one address each (as `concentrator_dst`), so that
/// no two SAs share the kernel's hash bucket of their addresses.
fn commit_peer(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

/// Commit SA `i`: even ones outbound, odd ones inbound.
fn commit_outbound(i: usize) -> bool {
    i.is_multiple_of(2)
}

/// One pair of commit SAs in four ESN, with a window of 128 (a 4-word
/// bitmap).
fn commit_esn(i: usize) -> bool {
    (i / 2) % 4 == 3
}

fn commit_sa(i: usize) -> SaId {
    let daddr = if commit_outbound(i) { commit_peer(i) } else { COMMIT_LOCAL };
    SaId::esp(daddr.into(), 0x200000 + i as u32)
}

/// The moving number the active node's SA `i` starts at: the active side
/// has sent or received that much; ESN SAs past 2^32.
fn commit_number(i: usize) -> u64 {
    let low = 1000 + 7 * i as u64;
    if commit_esn(i) {
        (1 << 32) + low
    } else {
        low
    }
}

/// The `ip -batch` lines of the N commit SAs: the same SPIs, reqids and
/// (null) keys in both namespaces; `numbers`: each SA's moving number as
/// on the active node, else 0 as freshly installed on a standby.
fn commit_lines(n: usize, numbers: bool) -> String {
    (0..n)
        .map(|i| {
            let (src, dst, which) = if commit_outbound(i) {
                (COMMIT_LOCAL, commit_peer(i), "oseq")
            } else {
                (commit_peer(i), COMMIT_LOCAL, "seq")
            };
            let number = if numbers { commit_number(i) } else { 0 };
            let replay = if commit_esn(i) {
                format!(
                    "flag esn replay-window 128 replay-{which} {} replay-{which}-hi {}",
                    number as u32,
                    number >> 32
                )
            } else {
                format!("replay-window 32 replay-{which} {number}")
            };
            format!(
                "xfrm state add src {src} dst {dst} proto esp spi 0x{:x} reqid {} mode transport {replay} \
                 enc ecb(cipher_null) \"\"\n",
                0x200000 + i,
                1000 + (i % 4)
            )
        })
        .collect()
}

/// HA sync's takeover on N SAs (issue 13). Namespaces ka (the active node)
/// and kb (the standby) hold the same N SAs, ka's with traffic counted;
/// `Active` on ka hands its records to a `Standby` in this process until it
/// holds one of each SA (the link between them is the daemon's business,
/// measured on the host); then `Standby::commit` on kb, timed, and every
/// SA's outcome counted and its number read back from kb.
fn commit(n: usize) {
    use xfrmsync::sync::{Active, ActiveConfig, CommitOptions, Outcome, Outgoing, Standby};
    use xfrmsync::Replay;

    learn_hz();
    sh("modprobe -a xfrm_user esp4 crypto_null authencesn
        for n in ka kb; do ip netns del $n 2>/dev/null || true; ip netns add $n; done");
    for (ns, numbers) in [("ka", true), ("kb", false)] {
        let t = Instant::now();
        ip_batch(ns, &format!("link set lo up\naddr add {COMMIT_LOCAL}/32 dev lo\n{}", commit_lines(n, numbers)));
        println!(
            "{n} SAs added in {ns} with ip -batch in {:.1} s ({} outbound, {} inbound, {} ESN with a 128-packet window)",
            t.elapsed().as_secs_f64(),
            (0..n).filter(|&i| commit_outbound(i)).count(),
            (0..n).filter(|&i| !commit_outbound(i)).count(),
            (0..n).filter(|&i| commit_esn(i)).count()
        );
    }

    // The active side, until the standby holds a record of every SA.
    let live0 = alloc::live();
    let mut standby = Standby::new(0);
    let t = Instant::now();
    let handle = Handle::builder().netns_path("/run/netns/ka").receive_buffer(8 << 20).open().unwrap();
    let mut active = Active::new(handle, 1, ActiveConfig::default()).unwrap();
    let (mut calls, mut lost) = (0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(300);
    while standby.len() < n {
        assert!(Instant::now() < deadline, "the standby holds {} of {n} records after 300 s", standby.len());
        let wait = active.next_due().saturating_duration_since(Instant::now()).min(Duration::from_millis(50));
        let mut p = libc::pollfd { fd: active.registry().handle().event_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd.
        unsafe { libc::poll(&mut p, 1, wait.as_millis() as i32) };
        let dispatched = active.dispatch(&mut |outgoing| {
            if let Outgoing::Record(record) = outgoing {
                // What became of it is in the standby's stats.
                let _ = standby.receive(*record);
            }
        });
        calls += 1;
        match dispatched {
            Ok(_) => {}
            Err(Error::EventsLost) => lost += 1,
            Err(e) => panic!("active dispatch: {e}"),
        }
    }
    let collected = t.elapsed();
    let stats = active.stats();
    drop(active);
    let unheld = (0..n).filter(|&i| standby.get(&commit_sa(i)).is_none()).count();
    assert_eq!(unheld, 0, "the standby holds a record of each of the N SAs");

    // The takeover.
    let handle = Handle::builder().netns_path("/run/netns/kb").events(false).open().unwrap();
    let t = Instant::now();
    let done = standby.commit(&handle, &CommitOptions::default()).unwrap();
    let committed = t.elapsed();
    let t = Instant::now();
    let again = standby.commit(&handle, &CommitOptions::default()).unwrap();
    let committed_again = t.elapsed();
    assert_eq!(again.written(), n, "the second commit wrote every SA too");
    // For comparison: the listing a commit starts with, alone.
    let t = Instant::now();
    let mut listed = 0;
    handle.dump_sas(|_| listed += 1).unwrap();
    let listing = t.elapsed();

    let (mut written, mut rekey, mut mismatch, mut failed) = (0, 0, 0, 0);
    let mut expect = std::collections::HashMap::new();
    for sa in &done.sas {
        match &sa.outcome {
            Outcome::Written { written: number, .. } => {
                written += 1;
                expect.insert(sa.sa, *number);
            }
            Outcome::NeedsRekey { .. } => rekey += 1,
            Outcome::Mismatch(_) => mismatch += 1,
            Outcome::Failed(_) => failed += 1,
        }
    }
    // Every SA's number as the kernel now holds it; the second commit
    // wrote the same numbers again (nothing moved in between).
    let (mut read_back, mut as_written, mut first_wrong) = (0, 0, None);
    handle
        .dump_sas(|info| {
            let Some(number) = expect.get(&info.sa) else { return };
            read_back += 1;
            let replay: Option<Replay> = info.replay;
            let now =
                replay
                    .map(|r| if info.sa.daddr == std::net::IpAddr::V4(COMMIT_LOCAL) { r.seq64() } else { r.oseq64() });
            if now == Some(*number) {
                as_written += 1;
            } else if first_wrong.is_none() {
                first_wrong = Some(format!("{}: {now:?}, written {number}", info.sa));
            }
        })
        .unwrap();
    // The standby's records, from the allocator: what its drop frees.
    let held = alloc::live();
    drop(standby);
    let standby_bytes = (held - alloc::live()).max(0) as f64;
    let everything = (held - live0).max(0) as f64;

    println!();
    println!("| step | time | SAs/s |");
    println!("|---|---|---|");
    println!(
        "| records collected: `Active` on ka (its listing of every SA) until the standby holds {n} | {:.2} s | {:.0} |",
        collected.as_secs_f64(),
        n as f64 / collected.as_secs_f64()
    );
    println!(
        "| **`Standby::commit` on kb: list, plan, write {n} SAs** | **{:.3} s** | **{:.0}** |",
        committed.as_secs_f64(),
        n as f64 / committed.as_secs_f64()
    );
    println!(
        "| the same commit again | {:.3} s | {:.0} |",
        committed_again.as_secs_f64(),
        n as f64 / committed_again.as_secs_f64()
    );
    println!(
        "| for comparison: a listing of kb's {listed} SAs alone (`dump_sas`) | {:.3} s | {:.0} |",
        listing.as_secs_f64(),
        listed as f64 / listing.as_secs_f64()
    );
    println!();
    println!(
        "active: {} records ({} from listings, {} from events, {} from notifications), {} own updates skipped, {calls} dispatch calls, ENOBUFS {lost}",
        stats.records, stats.from_listings, stats.from_events, stats.from_notifications, stats.own_updates
    );
    println!(
        "commit: epoch {}, {} SAs: {written} written, {rekey} need a rekey, {mismatch} mismatched, {failed} failed; {} records without a local SA",
        done.epoch,
        done.sas.len(),
        done.missing_locally.len()
    );
    println!(
        "read back from kb: {read_back} SAs, {as_written} with the number written{}",
        first_wrong.map_or(String::new(), |w| format!(" (first that is not: {w})"))
    );
    println!(
        "standby memory: {:.1} MB for {n} SAs, {:.1} bytes/SA (allocator totals; the whole process grew {:.1} MB)",
        standby_bytes / 1e6,
        standby_bytes / n as f64,
        everything / 1e6
    );
    println!(
        "RATIO commit {n} SAs: {:.3} s ({:.0} SAs/s); records collected in {:.2} s; standby {:.1} bytes/SA",
        committed.as_secs_f64(),
        n as f64 / committed.as_secs_f64(),
        collected.as_secs_f64(),
        standby_bytes / n as f64
    );
    sh("ip netns del ka; ip netns del kb");
    assert_eq!((written, rekey, mismatch, failed), (n, 0, 0, 0), "every SA written");
    assert_eq!(as_written, n, "every SA holds the number written");
}

/// The SAs of namespace `ns` whose destination is in `prefix` (a.b.c.0/24
/// style, by its first three octets), their thresholds read raw: how many
/// are on `replay`/`timer_ms`, and the first that is not.
fn check(ns: &str, prefix: &str, replay: u32, timer_ms: u32) {
    let netns = format!("/run/netns/{ns}");
    let handle = Handle::builder().netns_path(&netns).events(false).open().unwrap();
    let net = prefix.split('/').next().unwrap().rsplit_once('.').unwrap().0.to_string() + ".";
    let mut sas = Vec::new();
    handle
        .dump_sas(|info| {
            if info.sa.daddr.to_string().starts_with(&net) {
                sas.push(info.sa);
            }
        })
        .unwrap();
    let answers = raw_thresholds(&netns, sas.clone());
    let wrong: Vec<(SaId, (u32, u32))> =
        sas.iter().zip(&answers).filter(|(_, a)| **a != (replay, timer_ms / 100)).map(|(sa, a)| (*sa, *a)).collect();
    println!(
        "thresholds in {ns}: {} SAs to {prefix}, {} on {replay} packets/{timer_ms} ms, {} not{}",
        sas.len(),
        sas.len() - wrong.len(),
        wrong.len(),
        wrong.first().map_or(String::new(), |(sa, a)| format!(" (first: {sa}: {} packets, {} x100 ms)", a.0, a.1))
    );
    if !wrong.is_empty() {
        std::process::exit(1);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("check") if args.len() == 5 => {
            check(&args[1], &args[2], args[3].parse().unwrap(), args[4].parse().unwrap())
        }
        Some("concentrator") => concentrator(
            args.get(1).and_then(|v| v.parse().ok()).unwrap_or(100_000),
            args.get(2).and_then(|v| v.parse().ok()).unwrap_or(20_000),
        ),
        Some("commit") => commit(args.get(1).and_then(|v| v.parse().ok()).unwrap_or(10_000)),
        Some("many") => many(args.get(1).and_then(|v| v.parse().ok()).unwrap_or(10_000)),
        Some("storm") => storm(
            args.get(1).and_then(|v| v.parse().ok()).unwrap_or(5.0),
            args.get(2).map(String::as_str) == Some("bound"),
        ),
        Some("send") => send(args[1].parse().unwrap()),
        _ => {
            eprintln!(
                "usage: vm_bench many N | storm SECONDS [bound] | concentrator SAS STORM_SAS | commit N | check NETNS \
                 PREFIX REPLAY TIMER_MS"
            );
            std::process::exit(2);
        }
    }
}
