//! The Rust API on route-based SAs, each with a mark and an `if_id`: run
//! inside the test VM by vmtest/guest/route-based-suite.sh (`--ignored`),
//! after its C half, on the SAs it lists in `XFRMSYNC_ROUTE_SAS`. On Linux
//! before 7081d46d3231 (Debian 11's 5.10) a GETAE for both thresholds of
//! such an SA can panic the kernel; these reads must not. On the host,
//! where the kernel has no ESP, it is listed as ignored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use xfrmsync::{Handle, Mark, Registry, Rule, SaId, SaMatch, Thresholds};

const NETNS: &str = "/run/netns/rb";

/// The suite's SAs: (SaId, ESN, window), from the file the suite wrote.
fn route_sas() -> Vec<(SaId, bool, u32)> {
    let path = std::env::var("XFRMSYNC_ROUTE_SAS").expect("XFRMSYNC_ROUTE_SAS: run by route-based-suite.sh");
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} set by route-based-suite.sh"));
    let num = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), if s.starts_with("0x") { 16 } else { 10 });
    let daddr = var("XFRMSYNC_ROUTE_DADDR").parse().unwrap();
    let (mark, mask, if_id) = (
        num(&var("XFRMSYNC_ROUTE_MARK")).unwrap(),
        num(&var("XFRMSYNC_ROUTE_MASK")).unwrap(),
        num(&var("XFRMSYNC_ROUTE_IF_ID")).unwrap(),
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let sa = SaId::esp(daddr, num(f[0]).unwrap()).with_mark(mark, mask).with_if_id(if_id);
            (sa, f[1] == "1", f[2].parse().unwrap())
        })
        .collect()
}

fn open() -> Handle {
    Handle::builder().netns_path(NETNS).open().expect("netns rb (route-based-suite.sh)")
}

/// Waits until `handle`'s event socket has something, or `ms` pass.
fn readable(handle: &Handle, ms: i32) {
    let mut pfd = libc::pollfd { fd: handle.event_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd, valid for the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// One test, so that its steps run in this order and the thresholds each
/// SA is left with are the last step's (the suite's `xfrmsync get` checks
/// them).
#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/route-based-suite.sh)"]
fn rules_then_updates_on_every_route_based_sa() {
    let sas = route_sas();
    assert!(sas.len() >= 2, "{} SAs", sas.len());

    // The registry: a rule on the mark reaches every SA already there.
    let registry = Registry::new(open());
    let mark = sas[0].0.mark;
    registry
        .add_rule(Rule {
            name: "route-based".into(),
            matches: SaMatch { mark: Some(Mark { value: mark.value, mask: mark.mask }), ..Default::default() },
            thresholds: Thresholds { replay_packets: 77, timer_ms: 7_700 },
        })
        .unwrap();
    let handle = open();
    for (sa, _, _) in &sas {
        let read = handle.query_with_thresholds(sa).unwrap_or_else(|e| panic!("read {sa}: {e}"));
        assert_eq!((read.replay_threshold, read.timer_threshold_ms), (Some(77), Some(7_700)), "rule on {sa}");
    }
    drop(registry);

    // Set and read back each, with a listener joined: every update event
    // must arrive, since the kernel builds them in the same room.
    let watcher = Handle::builder().netns_path(NETNS).events(true).open().unwrap();
    let updates = Arc::new(AtomicUsize::new(0));
    let counter = updates.clone();
    watcher
        .on_event(Some(Box::new(move |_, ev| {
            if ev.cause() == Some(xfrmsync::Cause::Update) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })))
        .unwrap();
    for (i, (sa, esn, window)) in sas.iter().enumerate() {
        let (replay, timer_ms) = (10 + i as u32, 2_000 + 100 * (i as u32 % 7));
        handle.set_thresholds(sa, replay, timer_ms).unwrap_or_else(|e| panic!("set {sa}: {e}"));
        let read = handle.query_with_thresholds(sa).unwrap_or_else(|e| panic!("read {sa}: {e}"));
        assert_eq!(
            (read.replay_threshold, read.timer_threshold_ms),
            (Some(replay), Some(timer_ms)),
            "{sa} (ESN {esn}, window {window})"
        );
        assert_eq!(read.sa.mark, sa.mark, "{sa}: the answer names the mark");
        assert_eq!(matches!(read.replay, xfrmsync::Replay::Esn(_)), *esn || *window > 32, "{sa}: replay form");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while updates.load(Ordering::Relaxed) < sas.len() && std::time::Instant::now() < deadline {
        readable(&watcher, 200);
        watcher.dispatch().unwrap();
    }
    assert_eq!(updates.load(Ordering::Relaxed), sas.len(), "one update event for each NEWAE");
}
