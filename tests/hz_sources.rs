//! Where the library learns the kernel's HZ (src/hz.rs): on this machine's
//! kernel, which has XFRM netlink but no ESP, and against the fake kernel for
//! the last resort, a live SA. The probe's success is checked in the VM
//! (tests/vm_hz.rs).
//!
//! HZ is kept process-wide, so the tests here take turns.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

use xfrmsync::hz;
use xfrmsync::{timer, Error, Handle, HzSource, SaId};

mod common;
use common::fake_kernel::{FakeKernel, SaState};

const PORT: u32 = 0x4243;
const PROBE: u32 = 1_000_000;

fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The log records at warn level and above, from every test of this binary.
fn warnings() -> &'static Mutex<Vec<String>> {
    struct Collect;
    static WARNINGS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    impl log::Log for Collect {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                warnings().lock().unwrap().push(record.args().to_string());
            }
        }
        fn flush(&self) {}
    }
    static LOGGER: Collect = Collect;
    WARNINGS.get_or_init(|| {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Info);
        Mutex::new(Vec::new())
    })
}

fn netns_of_this_thread() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

/// CONFIG_HZ of /proc/config.gz by other means than the library's.
fn proc_config_hz() -> Option<u32> {
    let out = Command::new("sh").args(["-c", "zcat /proc/config.gz | sed -n 's/^CONFIG_HZ=//p'"]).output().ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse().ok()
}

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xfrmsync-hz-sources-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_private_probe_fails_cleanly_where_the_kernel_has_no_esp() {
    let _turn = turn();
    let home = netns_of_this_thread();
    let err = hz::probe_private_netns().unwrap_err();
    println!("probe on this kernel: {err}");
    // The kernel refuses the SA (no ESP type, or no such algorithm); what
    // matters is that it is the SA's refusal, named, and nothing else.
    assert!(matches!(err, Error::Kernel { operation: "XFRM_MSG_NEWSA (HZ probe)", .. }), "{err:?}");
    assert_ne!(err.errno(), 0);
    assert_eq!(netns_of_this_thread(), home, "the calling thread stayed in its namespace");
    // The SA would have been invisible here anyway: it is not in this namespace.
    let here = Handle::builder().events(false).open().expect("open (needs CAP_NET_ADMIN)");
    let probe_sa = SaId::esp("192.0.2.2".parse().unwrap(), 0x485a);
    assert!(matches!(here.query(&probe_sa), Err(Error::Kernel { errno: libc::ESRCH, .. })));
}

#[test]
fn this_host_has_hz_in_its_kernel_config_and_declared_hz_wins() {
    let _turn = turn();
    hz::restart_for_tests(None);
    assert_eq!((timer::kernel_hz(), timer::kernel_hz_source()), (None, None));
    let learnt = hz::kernel_hz_without_sa();
    match proc_config_hz() {
        Some(expected) => {
            assert_eq!(learnt, Ok((expected, HzSource::KernelConfig("/proc/config.gz".into()))));
        }
        // Another machine: some config file, or the probe's clean refusal.
        None => {
            assert!(matches!(&learnt, Ok((_, HzSource::KernelConfig(_))) | Err(Error::Kernel { .. })), "{learnt:?}")
        }
    }
    if let Ok((hz, source)) = learnt {
        assert_eq!(timer::kernel_hz(), Some(hz), "kept for the process");
        assert_eq!(timer::kernel_hz_source(), Some(source));
    }
    timer::set_kernel_hz(300).unwrap();
    assert_eq!(hz::kernel_hz_without_sa(), Ok((300, HzSource::Declared)));
    assert_eq!(timer::kernel_hz_source(), Some(HzSource::Declared));
}

#[test]
fn config_files_are_tried_in_order_and_the_answer_is_kept() {
    let _turn = turn();
    let none = temp_config("config-none", "CONFIG_HZ_PERIODIC=y\n");
    let hz_300 = temp_config("config-300", "CONFIG_HZ_300=y\nCONFIG_HZ=300\n");
    let hz_1000 = temp_config("config-1000", "CONFIG_HZ=1000\n");
    let order = vec![PathBuf::from("/nonexistent/config.gz"), none, hz_300.clone(), hz_1000];
    hz::restart_for_tests(Some((order, false)));
    assert_eq!(hz::kernel_hz_without_sa(), Ok((300, HzSource::KernelConfig(hz_300.clone()))));
    std::fs::remove_file(&hz_300).unwrap();
    assert_eq!(hz::kernel_hz_without_sa(), Ok((300, HzSource::KernelConfig(hz_300))), "not read again");

    // No source at all: an error, and nothing kept.
    hz::restart_for_tests(Some((vec![Path::new("/nonexistent").into()], false)));
    assert!(hz::kernel_hz_without_sa().is_err());
    assert_eq!(timer::kernel_hz(), None);
    hz::restart_for_tests(None);
}

#[test]
fn a_failure_to_learn_hz_is_remembered() {
    let _turn = turn();
    let late = std::env::temp_dir().join(format!("xfrmsync-hz-late-{}", std::process::id()));
    let _ = std::fs::remove_file(&late);
    hz::restart_for_tests(Some((vec![late.clone()], false)));
    let first = hz::kernel_hz_without_sa().unwrap_err();
    // Were it tried again, the file would answer now: a daemon registering
    // SA after SA would re-read the config and restart the probe each time.
    std::fs::write(&late, "CONFIG_HZ=100\n").unwrap();
    assert_eq!(hz::kernel_hz_without_sa(), Err(first), "the failure is the answer, without trying again");
    // A declared HZ still wins.
    timer::set_kernel_hz(100).unwrap();
    assert_eq!(hz::kernel_hz_without_sa(), Ok((100, HzSource::Declared)));
    std::fs::remove_file(&late).unwrap();
    hz::restart_for_tests(None);
}

#[test]
fn a_timer_set_learns_hz_from_the_config_and_leaves_the_sa_alone() {
    let _turn = turn();
    let config = temp_config("config-250", "CONFIG_HZ=250\n");
    hz::restart_for_tests(Some((vec![config.clone()], false)));
    let (fake, handle) = FakeKernel::start(SaState::new(250), Handle::builder(), PORT);
    let sa = fake.state().sa;
    handle.set_thresholds(&sa, 5, 2_000).unwrap();
    let timers: Vec<u32> = fake.seen().iter().filter_map(|s| s.timer_jiffies).collect();
    assert_eq!(timers, [500], "one NEWAE, no probe on the SA");
    assert_eq!(timer::kernel_hz_source(), Some(HzSource::KernelConfig(config)));
    hz::restart_for_tests(None);
}

#[test]
fn the_live_sa_is_the_last_resort_and_says_so() {
    let _turn = turn();
    let warnings = warnings();
    hz::restart_for_tests(Some((Vec::new(), false)));
    // A kernel with HZ 300, which no config here names.
    let (fake, handle) = FakeKernel::start(SaState { hz: 300, ..SaState::new(300) }, Handle::builder(), PORT);
    let sa = fake.state().sa;
    handle.set_thresholds(&sa, 5, 2_000).unwrap();
    let timers: Vec<u32> = fake.seen().iter().filter_map(|s| s.timer_jiffies).collect();
    assert_eq!(timers, [PROBE, 300, 600], "probe, restore, then the 2 s asked for");
    assert_eq!((timer::kernel_hz(), timer::kernel_hz_source()), (Some(300), Some(HzSource::LiveSa)));
    let said = warnings.lock().unwrap().clone();
    assert!(
        said.iter().any(|w| w.contains("live SA") && w.contains("spi 0x00001001")),
        "a warning names the SA: {said:?}"
    );
    hz::restart_for_tests(None);
}

#[test]
fn measuring_on_a_route_based_sa_reads_the_timer_alone() {
    let _turn = turn();
    hz::restart_for_tests(Some((Vec::new(), false)));
    // Mark and if_id: a GETAE for both thresholds would panic 5.10, which
    // the fake kernel models (tests/kernel_room.rs).
    let sa = SaId::esp("10.9.0.2".parse().unwrap(), 0x108).with_mark(7, 0xff).with_if_id(5);
    let (fake, handle) = FakeKernel::start(SaState { sa, hz: 300, ..SaState::new(300) }, Handle::builder(), PORT);
    handle.set_thresholds(&sa, 5, 2_000).unwrap();
    assert!(!fake.panicked());
    let asked: Vec<u32> =
        fake.seen().iter().filter(|s| s.kind == xfrmsync::wire::XFRM_MSG_GETAE).map(|s| s.ae_flags).collect();
    assert_eq!(asked, [8, 8], "XFRM_AE_ETHR alone, before and after the probe");
    assert_eq!(timer::kernel_hz(), Some(300));
    hz::restart_for_tests(None);
}

extern "C" {
    fn xfrmsync_learn_kernel_hz(hz_out: *mut u32) -> std::ffi::c_int;
    fn xfrmsync_kernel_hz_source() -> std::ffi::c_int;
    fn xfrmsync_set_kernel_hz(hz: u32) -> std::ffi::c_int;
}

#[test]
fn the_c_functions_name_the_source() {
    let _turn = turn();
    let config = temp_config("config-100", "CONFIG_HZ=100\n");
    hz::restart_for_tests(Some((vec![config], false)));
    let mut hz = 0;
    // SAFETY: a valid out-pointer, or NULL where the header allows it.
    unsafe {
        assert_eq!(xfrmsync_kernel_hz_source(), 0, "XFRMSYNC_HZ_SOURCE_NONE");
        assert_eq!(xfrmsync_learn_kernel_hz(&mut hz), 2, "XFRMSYNC_HZ_SOURCE_KERNEL_CONFIG");
        assert_eq!(hz, 100);
        assert_eq!(xfrmsync_kernel_hz_source(), 2);
        assert_eq!(xfrmsync_set_kernel_hz(1000), 0);
        assert_eq!(xfrmsync_learn_kernel_hz(std::ptr::null_mut()), 1, "XFRMSYNC_HZ_SOURCE_DECLARED");
        hz::restart_for_tests(Some((Vec::new(), false)));
        assert_eq!(xfrmsync_learn_kernel_hz(&mut hz), -libc::ENOENT, "no source: the error");
        assert_eq!(hz, 100, "out-parameter untouched on failure");
    }
    hz::restart_for_tests(None);
}
