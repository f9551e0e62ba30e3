//! What a multi-threaded daemon embedding the library relies on, against a
//! fake kernel that injects the faults a real one rarely shows: HZ
//! calibration that restores on every path, a bounded dispatch, one
//! deadline per call, callbacks that reach the handle, and update events a
//! handle can recognise as its own.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xfrmsync::{AeUpdate, Cause, Error, Handle, LegacyReplay, Replay};

mod common;
use common::fake_kernel::{FakeKernel, Fault, SaState};

const PORT: u32 = 0x4242;
/// The probe value of the HZ measurement (1,000,000 jiffies).
const PROBE: u32 = 1_000_000;

fn start(timer_jiffies: u32) -> (FakeKernel, Handle) {
    FakeKernel::start(SaState::new(timer_jiffies), Handle::builder(), PORT)
}

fn fake_with(timer_jiffies: u32, builder: xfrmsync::HandleBuilder) -> (FakeKernel, Handle) {
    FakeKernel::start(SaState::new(timer_jiffies), builder, PORT)
}

/// Runs `f` on another thread and waits at most `limit` for it, so a call
/// that never returns fails the test instead of hanging the suite.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("the call did not return within {limit:?}"))
}

fn newae_timers(fake: &FakeKernel) -> Vec<u32> {
    fake.seen().iter().filter_map(|s| s.timer_jiffies).collect()
}

// Defect 1: a failed calibration left the SA's timer at 1,000,000 jiffies.

#[test]
fn calibration_restores_the_timer_when_the_read_back_fails() {
    let (fake, handle) = start(250);
    let sa = fake.state().sa;
    // GETAE before, the probe, then the read-back fails as GFP_ATOMIC may.
    fake.faults(&[Fault::Pass, Fault::Pass, Fault::Errno(libc::ENOMEM)]);
    let err = handle.calibrate_hz(&sa).unwrap_err();
    assert_eq!(err.errno(), libc::ENOMEM, "{err}");
    let timers = newae_timers(&fake);
    assert_eq!(timers.len(), 2, "the probe and its undo: {timers:?}");
    assert_eq!(timers[0], PROBE);
    assert_ne!(fake.state().timer_jiffies, PROBE, "the probe must not stay on the SA");
}

#[test]
fn calibration_restores_the_timer_when_the_probe_goes_unanswered() {
    let (fake, handle) = fake_with(500, Handle::builder().request_timeout(Duration::from_millis(200)));
    let sa = fake.state().sa;
    fake.faults(&[Fault::Pass, Fault::Silent]);
    let err = handle.calibrate_hz(&sa).unwrap_err();
    assert!(matches!(err, Error::TimedOut(_)), "{err:?}");
    assert_eq!(newae_timers(&fake).len(), 2, "the undo was sent after the time ran out");
    assert_ne!(fake.state().timer_jiffies, PROBE);
}

#[test]
fn calibration_that_measures_restores_the_exact_value() {
    let (fake, handle) = start(250);
    let sa = fake.state().sa;
    assert_eq!(handle.calibrate_hz(&sa).unwrap(), 250);
    assert_eq!(fake.state().timer_jiffies, 250);
    assert_eq!(newae_timers(&fake), [PROBE, 250]);
}

#[test]
fn a_failed_restore_is_its_own_error() {
    let (fake, handle) = start(250);
    let sa = fake.state().sa;
    fake.faults(&[Fault::Pass, Fault::Pass, Fault::Pass, Fault::Errno(libc::ENOMEM)]);
    let err = handle.calibrate_hz(&sa).unwrap_err();
    assert!(matches!(err, Error::RestoreFailed { .. }), "{err:?}");
    assert_eq!(err.errno(), libc::ENOTRECOVERABLE);
    let text = err.to_string();
    assert!(text.contains("spi 0x00001001") && text.contains("1000000 jiffies"), "{text}");
    assert_eq!(fake.state().timer_jiffies, PROBE, "the fake refused the undo");

    // The read-back and the undo both fail: still reported as the undo's.
    let (fake, handle) = start(250);
    fake.faults(&[Fault::Pass, Fault::Pass, Fault::Errno(libc::ENOMEM), Fault::Errno(libc::ENOMEM)]);
    assert!(matches!(handle.calibrate_hz(&sa), Err(Error::RestoreFailed { .. })));
}

#[test]
fn a_refused_probe_needs_no_restore() {
    let (fake, handle) = start(250);
    let sa = fake.state().sa;
    fake.faults(&[Fault::Pass, Fault::Errno(libc::EPERM)]);
    assert_eq!(handle.calibrate_hz(&sa).unwrap_err().errno(), libc::EPERM);
    assert_eq!(newae_timers(&fake), [PROBE]);
    assert_eq!(fake.state().timer_jiffies, 250);
}

// Defect 2: calibration switched off a timer under 100 ms.

#[test]
fn calibration_refuses_a_timer_it_cannot_read() {
    // 20 jiffies at HZ 250 = 80 ms, which the kernel reads back as 0.
    let (fake, handle) = start(20);
    let sa = fake.state().sa;
    let err = handle.calibrate_hz(&sa).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("reads 0"), "{err}");
    assert_eq!(fake.state().timer_jiffies, 20, "the timer is untouched");
    assert!(newae_timers(&fake).is_empty(), "nothing was written");
}

// Defect 3: dispatch had no bound per call.

#[test]
fn dispatch_reads_at_most_its_limit_of_datagrams() {
    let (fake, handle) = fake_with(250, Handle::builder().dispatch_limit(10));
    assert_eq!(fake.send_events(35, 1), 35);
    let calls: Vec<usize> = (0..5).map(|_| handle.dispatch().unwrap()).collect();
    assert_eq!(calls, [10, 10, 10, 5, 0]);
}

#[test]
fn dispatch_has_a_default_bound_and_finishes_the_datagram_it_started() {
    let (fake, handle) = start(250);
    let queued = fake.send_events(200, 1);
    assert!(queued > xfrmsync::handle::DEFAULT_DISPATCH_LIMIT, "{queued} datagrams queued");
    assert_eq!(handle.dispatch().unwrap(), xfrmsync::handle::DEFAULT_DISPATCH_LIMIT);
    assert_eq!(handle.dispatch().unwrap(), queued - xfrmsync::handle::DEFAULT_DISPATCH_LIMIT);

    // Several events in one datagram: none is left behind where poll
    // cannot see it.
    handle.set_dispatch_limit(1).unwrap();
    assert_eq!(fake.send_events(2, 5), 2);
    assert_eq!(handle.dispatch().unwrap(), 5);
    assert_eq!(handle.dispatch().unwrap(), 5);
    assert_eq!(handle.dispatch().unwrap(), 0);
    assert!(handle.set_dispatch_limit(0).is_err());
}

/// Dispatch reads datagrams ahead and routes their events in batches; a
/// callback that panics must still leave the events behind its own pending,
/// as when they were read one by one: none lost, none run twice.
#[test]
fn events_behind_a_panicking_callback_stay_pending() {
    let (fake, handle) = start(250);
    assert_eq!(fake.send_events(40, 1), 40);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    handle
        .on_event(Some(Box::new(move |_, ev| {
            let mut seen = record.lock().unwrap();
            seen.push(ev.replay.seq64());
            if seen.len() == 5 {
                drop(seen);
                panic!("the application's bug");
            }
        })))
        .unwrap();
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handle.dispatch()));
    assert!(first.is_err(), "the panic goes through to the caller");
    assert_eq!(handle.dispatch().unwrap(), 35);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 40);
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "in order, once each: {seen:?}");
}

#[test]
fn a_zero_dispatch_limit_is_refused() {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let err = Handle::builder().dispatch_limit(0).open_with_sockets(a.into(), b.into(), None, 1).err().unwrap();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

// Defect 5: Rust callbacks could not reach the handle.

#[test]
fn a_callback_queries_and_updates_through_its_handle() {
    let (fake, handle) = start(250);
    let sa = fake.state().sa;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    handle
        .on_sa_event(
            sa,
            Some(Box::new(move |handle: &Handle, event| {
                if event.cause() != Some(Cause::Replay) {
                    return;
                }
                let now = handle.query_with_thresholds(&event.sa).unwrap();
                handle
                    .update(
                        &event.sa,
                        &AeUpdate { replay_threshold: Some(now.replay_threshold.unwrap() + 30), ..Default::default() },
                    )
                    .unwrap();
                record.lock().unwrap().push(now.replay_threshold.unwrap());
                // Dispatching again from inside is refused, not deadlocked.
                assert!(matches!(handle.dispatch(), Err(Error::Busy(_))));
            })),
        )
        .unwrap();
    fake.send_events(2, 1);
    // Two traffic events, then the two update events the callbacks caused.
    let dispatched = handle.dispatch().unwrap() + handle.dispatch().unwrap();
    assert_eq!(dispatched, 4);
    assert_eq!(*seen.lock().unwrap(), [2, 32]);
    assert_eq!(fake.state().replay_threshold, 62);
}

// Defect 6: a request could block forever.

#[test]
fn a_zero_request_timeout_is_refused() {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let err =
        Handle::builder().request_timeout(Duration::ZERO).open_with_sockets(a.into(), b.into(), None, 1).err().unwrap();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

#[test]
fn a_sub_microsecond_timeout_still_ends() {
    let (fake, handle) = fake_with(250, Handle::builder().request_timeout(Duration::from_nanos(1)));
    let sa = fake.state().sa;
    fake.faults(&[Fault::Silent]);
    let result = within(Duration::from_secs(10), move || handle.query(&sa).map(|_| ()));
    assert!(matches!(result, Err(Error::TimedOut(_))), "{result:?}");
}

#[test]
fn stale_answers_do_not_extend_the_wait() {
    let (fake, handle) = fake_with(250, Handle::builder().request_timeout(Duration::from_millis(300)));
    let sa = fake.state().sa;
    // An answer with a wrong seq every 100 ms, for 5 s.
    fake.faults(&[Fault::Stale(50)]);
    let started = Instant::now();
    let result = within(Duration::from_secs(30), move || handle.query(&sa).map(|_| ()));
    let took = started.elapsed();
    assert!(matches!(result, Err(Error::TimedOut(_))), "{result:?}");
    assert!(took < Duration::from_secs(3), "timed out only after {took:?} for a 300 ms timeout");
    drop(fake);
}

#[test]
fn one_deadline_covers_every_request_of_a_call() {
    let (fake, handle) = fake_with(250, Handle::builder().request_timeout(Duration::from_millis(500)));
    let sa = fake.state().sa;
    // update() with a replay value: a GETAE (form check), then the NEWAE.
    // Each answer alone comes in time; both together do not.
    fake.faults(&[Fault::Delay(300), Fault::Delay(300)]);
    let replay = Replay::Legacy(LegacyReplay { oseq: 5, seq: 5, bitmap: 1 });
    let result = within(Duration::from_secs(10), move || {
        handle.update(&sa, &AeUpdate { replay: Some(replay), ..Default::default() })
    });
    assert!(matches!(result, Err(Error::TimedOut(_))), "{result:?}");
}

// Defect 7: a daemon could not tell its own updates from anyone else's.

#[test]
fn requests_carry_the_port_id_and_own_updates_are_recognised() {
    let (fake, handle) = start(250);
    let sa = fake.state().sa;
    assert_eq!(handle.port_id(), PORT);
    handle.update(&sa, &AeUpdate { replay_threshold: Some(7), ..Default::default() }).unwrap();
    let sent = fake.seen();
    assert!(sent.iter().all(|s| s.port_id == PORT), "{sent:?}");
    let update = handle.events().next().unwrap().unwrap();
    assert_eq!(update.cause(), Some(Cause::Update));
    assert_eq!((update.nlmsg_pid, update.nlmsg_seq), (PORT, sent.last().unwrap().seq));
    assert!(handle.caused(&update));
    let someone_else = xfrmsync::Aevent { nlmsg_pid: PORT + 1, ..update };
    assert!(!handle.caused(&someone_else));
    let traffic = xfrmsync::Aevent { flags: xfrmsync::aevent::flags::CR, ..update };
    assert!(!handle.caused(&traffic), "only update events are caused by requests");
}

#[test]
fn real_handles_have_distinct_nonzero_port_ids() {
    let a = Handle::builder().events(false).open().expect("open (needs CAP_NET_ADMIN)");
    let b = Handle::builder().events(false).open().unwrap();
    assert_ne!(a.port_id(), 0);
    assert_ne!(a.port_id(), b.port_id());
}
