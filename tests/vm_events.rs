//! The Rust API on a real kernel with SAs: run inside the test VM by
//! vmtest/guest/kernel-suite.sh (`--ignored`), after net-setup.sh built
//! namespaces a and b. On the host, where the kernel has no ESP, it is
//! listed as ignored.
//!
//! Among others it proves that dispatching events allocates nothing: a
//! counting allocator watches this thread during `Handle::dispatch`.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use xfrmsync::{AeUpdate, Cause, Error, Handle, LegacyReplay, Replay, SaId};

mod common;
use common::{allocations, CountingAllocator};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn in_ns(name: &str) -> Handle {
    Handle::builder()
        .netns_path(format!("/run/netns/{name}"))
        .open()
        .expect("netns a and b exist (vmtest/guest/net-setup.sh)")
}

fn udp_send(dst: &str, port: u16, count: u32) {
    let status = Command::new("target/vmtest/udp-send")
        .args(["--netns", "/run/netns/a", dst, &port.to_string(), &count.to_string(), "32", "10"])
        .status()
        .expect("run target/vmtest/udp-send");
    assert!(status.success());
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/kernel-suite.sh)"]
fn dispatch_allocates_nothing_per_event() {
    let watcher = in_ns("b");
    let setter = in_ns("b");
    // An SA no other test touches, so its traffic events are certain.
    let sa = SaId::esp("fd00:9::2".parse().unwrap(), 0x7101);
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    watcher
        .on_sa_event(
            sa,
            Some(Box::new(move |_, _| {
                counter.fetch_add(1, Ordering::Relaxed);
            })),
        )
        .unwrap();
    watcher.dispatch().unwrap();
    // 64 update events, ending on the default threshold of 2 packets.
    for i in 0..64 {
        setter.update(&sa, &AeUpdate { replay_threshold: Some(65 - i), ..Default::default() }).unwrap();
    }
    udp_send("fd00:9::2", 9008, 20);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let before = allocations();
    let delivered = watcher.dispatch().unwrap();
    let during = allocations() - before;
    // 64 update events, then traffic: a timer event and a replay event
    // every 2 packets (the default threshold) at least.
    assert!(delivered >= 64 + 5, "{delivered} events dispatched");
    assert_eq!(seen.load(Ordering::Relaxed), delivered);
    assert_eq!(during, 0, "{during} allocations while dispatching {delivered} events");
    println!("dispatched {delivered} events with {during} allocations");
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/kernel-suite.sh)"]
fn rust_api_round_trip_and_event_iterator() {
    let b = in_ns("b");
    let sa = SaId::esp("10.9.0.1".parse().unwrap(), 0x1002);
    let before = b.query_with_thresholds(&sa).unwrap();
    assert_eq!(before.sa, sa);
    let replay = Replay::Legacy(LegacyReplay { oseq: 4242, seq: 17, bitmap: 0x1ffff });
    b.update(
        &sa,
        &AeUpdate {
            replay: Some(replay),
            replay_threshold: Some(9),
            timer_threshold_ms: Some(700),
            ..Default::default()
        },
    )
    .unwrap();
    let after = b.query_with_thresholds(&sa).unwrap();
    assert_eq!(after.replay, replay);
    assert_eq!((after.replay_threshold, after.timer_threshold_ms), (Some(9), Some(700)));
    let updates: Vec<_> =
        b.events().map(|e| e.unwrap()).filter(|e| e.sa == sa && e.cause() == Some(Cause::Update)).collect();
    assert!(!updates.is_empty(), "the update event arrives through the iterator");
    assert_eq!(updates.last().unwrap().replay, replay);

    let marked = SaId::esp("10.9.0.2".parse().unwrap(), 0x4001);
    assert!(matches!(b.query(&marked), Err(Error::Kernel { errno: libc::ESRCH, .. })));
    assert_eq!(b.query(&marked.with_mark(7, 0xff)).unwrap().sa.mark.value, 7);
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM (vmtest/guest/kernel-suite.sh)"]
fn update_events_name_the_handle_that_caused_them() {
    let watcher = in_ns("b");
    let setter = in_ns("b");
    let sa = SaId::esp("10.9.0.1".parse().unwrap(), 0x1002);
    assert_ne!(watcher.port_id(), setter.port_id());
    watcher.dispatch().unwrap();
    let mine = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = mine.clone();
    let setter_port = setter.port_id();
    watcher
        .on_sa_event(
            sa,
            Some(Box::new(move |handle: &Handle, ev| {
                if ev.cause() == Some(Cause::Update) {
                    // A callback reaches its handle: it queries through it.
                    let now = handle.query_with_thresholds(&ev.sa).unwrap();
                    record.lock().unwrap().push((ev.nlmsg_pid, ev.nlmsg_seq, handle.caused(ev), now.replay_threshold));
                }
            })),
        )
        .unwrap();
    setter.update(&sa, &AeUpdate { replay_threshold: Some(13), ..Default::default() }).unwrap();
    watcher.update(&sa, &AeUpdate { replay_threshold: Some(14), ..Default::default() }).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    watcher.dispatch().unwrap();
    let seen = mine.lock().unwrap().clone();
    println!("update events (pid, seq, caused by watcher, threshold now): {seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    // The kernel copies the request's port id into the event it multicasts.
    assert_eq!((seen[0].0, seen[0].2), (setter_port, false), "the setter's update");
    assert_ne!(seen[0].1, 0, "and the request's seq");
    assert_eq!((seen[1].0, seen[1].2), (watcher.port_id(), true), "the watcher's own update");
    assert_eq!(seen[1].3, Some(14));
}
