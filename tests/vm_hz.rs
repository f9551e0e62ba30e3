//! HZ without a live SA (src/hz.rs) and a namespace's defaults for new SAs
//! (src/defaults.rs) on a real kernel with ESP. Ignored on the host, whose
//! kernel has no ESP; run inside the test VM after net-setup.sh:
//!
//! ```text
//! cargo test --test vm_hz --no-run   # then copy the binary to target/vmtest/vm_hz
//! XFRMSYNC_EXPECTED_HZ=250 vmtest/run-in-vm 6.1 bash -c \
//!     'vmtest/guest/net-setup.sh >/dev/null && target/vmtest/vm_hz --ignored --test-threads=1 --nocapture'
//! ```
//!
//! `XFRMSYNC_EXPECTED_HZ`, when set, is the booted kernel's `CONFIG_HZ`.
//! The tests share the process-wide HZ, so each starts from "unknown".

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use xfrmsync::defaults::{self, NamespaceDefaults};
use xfrmsync::hz;
use xfrmsync::{timer, Cause, Error, Handle, HzSource, NetnsRef, SaId};

fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    logs().lock().unwrap().clear();
    turn
}

/// Prints the library's log lines and keeps them for the test to check.
fn logs() -> &'static Mutex<Vec<String>> {
    struct Print;
    static LINES: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    impl log::Log for Print {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Info
        }
        fn log(&self, record: &log::Record<'_>) {
            let line = format!("{}: {}", record.level(), record.args());
            println!("  log {line}");
            logs().lock().unwrap().push(line);
        }
        fn flush(&self) {}
    }
    static LOGGER: Print = Print;
    LINES.get_or_init(|| {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Info);
        Mutex::new(Vec::new())
    })
}

fn expected_hz() -> Option<u32> {
    std::env::var("XFRMSYNC_EXPECTED_HZ").ok().and_then(|v| v.parse().ok())
}

fn netns_of_this_thread() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

fn in_ns(name: &str) -> Handle {
    Handle::builder()
        .netns_path(format!("/run/netns/{name}"))
        .open()
        .expect("netns b exists (vmtest/guest/net-setup.sh)")
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}");
}

/// Update events of `sa` pending on `watcher`.
fn updates(watcher: &Handle, sa: &SaId) -> Vec<u32> {
    std::thread::sleep(Duration::from_millis(200));
    watcher
        .events()
        .map(|e| e.unwrap())
        .filter(|e| e.sa == *sa && e.cause() == Some(Cause::Update))
        .map(|e| e.nlmsg_seq)
        .collect()
}

#[test]
#[ignore = "needs ESP: runs inside the VM"]
fn private_probe_measures_hz_and_leaves_nothing_behind() {
    let _turn = turn();
    hz::restart_for_tests(None);
    let home = netns_of_this_thread();
    let watcher = Handle::open().unwrap();
    let started = Instant::now();
    let hz = hz::probe_private_netns().expect("the probe works where the kernel has ESP");
    println!("private probe: HZ {hz} in {:?}", started.elapsed());
    if let Some(expected) = expected_hz() {
        assert_eq!(hz, expected, "CONFIG_HZ of the booted kernel");
    }
    assert_eq!(netns_of_this_thread(), home);
    assert_eq!(watcher.events().count(), 0, "a listener here sees nothing of the probe");
    let probe_sa = SaId::esp("192.0.2.2".parse().unwrap(), 0x485a);
    assert!(matches!(watcher.query(&probe_sa), Err(Error::Kernel { errno: libc::ESRCH, .. })));
    assert_eq!(timer::kernel_hz(), None, "probing alone keeps nothing");
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM after net-setup.sh"]
fn a_timer_set_learns_hz_without_the_live_sa() {
    let _turn = turn();
    hz::restart_for_tests(None);
    let watcher = in_ns("b");
    let setter = in_ns("b");
    let sa = SaId::esp("10.9.0.2".parse().unwrap(), 0x5001);
    let started = Instant::now();
    setter.set_thresholds(&sa, 6, 1_500).unwrap();
    let (hz, source) = (timer::kernel_hz().unwrap(), timer::kernel_hz_source().unwrap());
    println!("first timer set: HZ {hz}, {source}; the set took {:?}", started.elapsed());
    if let Some(expected) = expected_hz() {
        assert_eq!(hz, expected);
    }
    assert_ne!(source, HzSource::LiveSa);
    assert_eq!(updates(&watcher, &sa).len(), 1, "one update event: the set itself, no probe on the SA");
    let now = setter.query_with_thresholds(&sa).unwrap();
    assert_eq!((now.replay_threshold, now.timer_threshold_ms), (Some(6), Some(1_500)));
    assert!(!logs().lock().unwrap().iter().any(|l| l.starts_with("WARN")));
}

#[test]
#[ignore = "needs ESP SAs: runs inside the VM after net-setup.sh"]
fn the_live_sa_is_measured_only_as_the_last_resort() {
    let _turn = turn();
    hz::restart_for_tests(Some((Vec::new(), false)));
    let watcher = in_ns("b");
    let setter = in_ns("b");
    let sa = SaId::esp("10.9.0.2".parse().unwrap(), 0x5001);
    setter.set_thresholds(&sa, 6, 1_000).unwrap();
    assert_eq!(timer::kernel_hz_source(), Some(HzSource::LiveSa));
    if let Some(expected) = expected_hz() {
        assert_eq!(timer::kernel_hz(), Some(expected));
    }
    assert_eq!(updates(&watcher, &sa).len(), 3, "probe, restore, set");
    assert!(logs().lock().unwrap().iter().any(|l| l.starts_with("WARN") && l.contains("live SA")));
    hz::restart_for_tests(None);
}

#[test]
#[ignore = "needs ESP: runs inside the VM"]
fn namespace_defaults_reach_new_sas_only() {
    let _turn = turn();
    // Left over from an earlier run, if any.
    let _ = Command::new("ip").args(["netns", "del", "hzdef"]).stderr(std::process::Stdio::null()).status();
    ip(&["netns", "add", "hzdef"]);
    let ns = NetnsRef::Path("/run/netns/hzdef".as_ref());
    // The null cipher takes no key: an empty one.
    let add = |spi: &str| {
        let sa = "xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi";
        let mut args = vec!["-n", "hzdef"];
        args.extend(sa.split(' '));
        args.extend([spi, "mode", "transport", "enc", "ecb(cipher_null)", ""]);
        ip(&args)
    };
    let thresholds = |handle: &Handle, spi: u32| {
        let now = handle.query_with_thresholds(&SaId::esp("192.0.2.2".parse().unwrap(), spi)).unwrap();
        (now.timer_threshold_ms.unwrap(), now.replay_threshold.unwrap())
    };
    assert_eq!(defaults::read(ns).unwrap(), NamespaceDefaults { timer_ms: 1_000, replay_packets: 2 });
    defaults::write(ns, &NamespaceDefaults { timer_ms: 2_000, replay_packets: 7 }).unwrap();
    add("0x100");
    let handle = Handle::builder().netns_path("/run/netns/hzdef").events(false).open().unwrap();
    assert_eq!(thresholds(&handle, 0x100), (2_000, 7), "a new SA takes the namespace's defaults");
    defaults::write(ns, &NamespaceDefaults { timer_ms: 500, replay_packets: 3 }).unwrap();
    assert_eq!(thresholds(&handle, 0x100), (2_000, 7), "an existing SA keeps its own");
    add("0x101");
    assert_eq!(thresholds(&handle, 0x101), (500, 3));
    println!("defaults: SA 0x100 made at 2000 ms/7 kept them; SA 0x101 made after got 500 ms/3");
    drop(handle);
    ip(&["netns", "del", "hzdef"]);
}
