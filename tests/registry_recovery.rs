//! The registry when the kernel fails it (issue 14, items 3 and 4): lost SA
//! notifications always reach the caller, a listing that fails is owed and
//! retried, what a broken listing did list still gets its thresholds, and
//! registrations are counted and never left behind by an error. Against
//! the fake kernel, whose GETSA dumps are scripted.

mod common;

use std::time::{Duration, Instant};

use common::fake_kernel::{FakeKernel, Fault, SaState, REQUEST_SEQ};
use xfrmsync::wire::{self, NewSa, Sender};
use xfrmsync::{Error, Handle, Registry, Rule, SaId, SaMatch, Thresholds};

const RULE: Thresholds = Thresholds { replay_packets: 7, timer_ms: 700 };
const REGISTERED: Thresholds = Thresholds { replay_packets: 3, timer_ms: 300 };

fn sa(spi: u32) -> SaId {
    SaId::esp("10.9.0.2".parse().unwrap(), spi)
}

/// A registry on the fake kernel; HZ declared, so no probe runs.
fn registry() -> (FakeKernel, Registry) {
    xfrmsync::timer::set_kernel_hz(250).unwrap();
    let (fake, handle) =
        FakeKernel::start(SaState::new(250), Handle::builder().request_timeout(Duration::from_millis(300)), 0x4343);
    (fake, Registry::new(handle))
}

/// One datagram of a GETSA dump's answers listing `spis`, as the kernel
/// sends them (`NLM_F_MULTI`, the request's seq).
fn listed(spis: &[u32]) -> Vec<u8> {
    let mut datagram = Vec::new();
    for &spi in spis {
        let id = sa(spi);
        let new = NewSa::new(&id, "10.9.0.1".parse().unwrap(), "ecb(cipher_null)", &[]).unwrap();
        let mut msg = Vec::new();
        wire::encode_newsa(&mut msg, Sender { seq: REQUEST_SEQ, port_id: 0x4343 }, &new);
        msg[6..8].copy_from_slice(&wire::NLM_F_MULTI.to_ne_bytes());
        datagram.extend_from_slice(&msg);
    }
    datagram
}

fn control(kind: u16, errno: i32) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(if kind == wire::NLMSG_DONE { 20u32 } else { 36u32 }).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&wire::NLM_F_MULTI.to_ne_bytes());
    out.extend_from_slice(&REQUEST_SEQ.to_ne_bytes());
    out.extend_from_slice(&0x4343u32.to_ne_bytes());
    out.extend_from_slice(&(-errno).to_ne_bytes());
    if kind != wire::NLMSG_DONE {
        out.extend_from_slice(&[0; 16]);
    }
    out
}

fn done() -> Vec<u8> {
    control(wire::NLMSG_DONE, 0)
}

/// SPIs the fake was sent NEWAE for, with the thresholds asked, in order.
fn newae_spis(fake: &FakeKernel) -> Vec<(u32, Option<u32>)> {
    fake.seen().iter().filter(|s| s.kind == wire::XFRM_MSG_NEWAE).map(|s| (s.spi, s.replay_threshold)).collect()
}

fn dumps_sent(fake: &FakeKernel) -> usize {
    fake.seen().iter().filter(|s| s.kind == wire::XFRM_MSG_GETSA).count()
}

fn rule_for_all() -> Rule {
    Rule { name: "all".into(), matches: SaMatch::default(), thresholds: RULE }
}

/// Lost notifications, with the kernel in their way: the NLMSG_OVERRUN the
/// fake can send stands for ENOBUFS, which a socket pair cannot produce.
fn lose_notifications(fake: &FakeKernel) {
    let mut overrun = control(wire::NLMSG_OVERRUN, 0);
    overrun[8..12].copy_from_slice(&0u32.to_ne_bytes());
    assert!(fake.send_event_datagram(&overrun));
}

/// Dispatches while a listing in steps runs (its next step is due at once),
/// as a caller's loop does with `relist_due` as its poll timeout; returns
/// each call's result.
fn settle(registry: &Registry) -> Vec<Result<usize, Error>> {
    let until = Instant::now() + Duration::from_secs(5);
    let mut results = Vec::new();
    while registry.relist_due().is_some_and(|due| due <= Instant::now()) && Instant::now() < until {
        results.push(registry.dispatch());
        // The fake answers from its own thread.
        std::thread::sleep(Duration::from_millis(2));
    }
    results
}

#[test]
fn lost_notifications_reach_the_caller_and_a_failed_listing_is_retried() {
    let (fake, registry) = registry();
    fake.script(vec![listed(&[0x100, 0x101]), done()]);
    registry.add_rule(rule_for_all()).unwrap();
    assert_eq!(newae_spis(&fake), [(0x100, Some(7)), (0x101, Some(7))]);
    assert_eq!(registry.relist_due(), None);

    // Notifications lost; the listing after it fails.
    lose_notifications(&fake);
    fake.faults(&[Fault::Errno(libc::ENOMEM)]);
    assert_eq!(registry.dispatch(), Err(Error::EventsLost), "the loss reaches the caller");
    // The listing's first step may read the refusal within that same call
    // (the fake answers from its thread at once): the loss is what that
    // call returns, and the failure shows in relist_failures. Otherwise a
    // later call returns the failure itself.
    let results = settle(&registry);
    assert!(
        results.iter().all(|r| r.is_ok() || matches!(r, Err(Error::Kernel { errno, .. }) if *errno == libc::ENOMEM)),
        "only the listing's failure: {results:?}"
    );
    let due = registry.relist_due().expect("the failed listing is owed");
    assert_eq!(registry.relist_failures(), 1, "the listing's failure is counted: {results:?}");
    assert!(due > Instant::now(), "retried after a wait, not at once");

    // Once due, dispatch lists again, with nothing on the event socket; the
    // SA whose notification was lost gets its thresholds, and the one the
    // listing no longer shows is forgotten.
    fake.script(vec![listed(&[0x100, 0x102]), done()]);
    let dumps = dumps_sent(&fake);
    registry.dispatch().unwrap();
    assert_eq!(dumps_sent(&fake), dumps, "not before it is due");
    std::thread::sleep(due.saturating_duration_since(Instant::now()));
    registry.dispatch().unwrap();
    assert!(settle(&registry).iter().all(Result::is_ok));
    assert_eq!(dumps_sent(&fake), dumps + 1, "listed again once due");
    assert_eq!(newae_spis(&fake).last(), Some(&(0x102, Some(7))));
    assert_eq!(registry.relist_due(), None, "nothing owed after a listing that worked");
    assert!(registry.tracked(&sa(0x101)).is_none(), "an SA the whole listing did not show is forgotten");
    assert!(registry.tracked(&sa(0x100)).is_some());
}

#[test]
fn failed_listings_back_off() {
    let (fake, registry) = registry();
    fake.script(vec![listed(&[0x100]), done()]);
    registry.add_rule(rule_for_all()).unwrap();
    lose_notifications(&fake);
    let mut waits = Vec::new();
    fake.faults(&[Fault::Errno(libc::ENOMEM); 4]);
    assert_eq!(registry.dispatch(), Err(Error::EventsLost));
    settle(&registry);
    for _ in 0..3 {
        let due = registry.relist_due().unwrap();
        waits.push(due.saturating_duration_since(Instant::now()));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let mut results = vec![registry.dispatch()];
        results.extend(settle(&registry));
        assert!(results.iter().any(Result::is_err), "the retried listing fails again, and says so: {results:?}");
    }
    assert_eq!(registry.relist_failures(), 4);
    assert!(waits.windows(2).all(|w| w[1] > w[0]), "each wait longer than the last: {waits:?}");
}

#[test]
fn a_listing_after_lost_notifications_is_read_in_steps() {
    let (fake, registry) = registry();
    fake.script(vec![listed(&[]), done()]);
    registry.add_rule(rule_for_all()).unwrap();
    // 20 datagrams of 3 SAs: more than one dispatch call reads.
    let datagrams = 20;
    let mut script: Vec<Vec<u8>> =
        (0..datagrams).map(|d| listed(&[0x500 + 3 * d, 0x501 + 3 * d, 0x502 + 3 * d])).collect();
    script.push(done());
    fake.script(script);
    lose_notifications(&fake);
    assert_eq!(registry.dispatch(), Err(Error::EventsLost));
    // Each call lists at most the documented 8 datagrams (of 3 SAs here).
    let step = 8;
    assert_eq!(xfrmsync::registry::LISTING_STEP, step, "the bound the header states");
    let (mut before, mut growth, mut calls) = (registry.tracked_count(), Vec::new(), 1);
    let until = Instant::now() + Duration::from_secs(5);
    while registry.relist_due().is_some() && Instant::now() < until {
        registry.dispatch().unwrap();
        calls += 1;
        growth.push(registry.tracked_count() - before);
        before = registry.tracked_count();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        growth.iter().all(|&g| g <= 3 * step),
        "SAs listed per dispatch call: {growth:?}, at most {step} datagrams"
    );
    assert!(calls > datagrams as usize / step, "{calls} dispatch calls for {datagrams} datagrams");
    let given: Vec<u32> = newae_spis(&fake).into_iter().map(|(spi, _)| spi).collect();
    for spi in 0x500..0x500 + 3 * datagrams {
        assert!(given.contains(&spi), "SA {spi:#x} of the listing given its thresholds");
    }
    assert_eq!(registry.tracked_count(), 3 * datagrams as usize);
    assert_eq!(registry.relist_due(), None);
}

#[test]
fn a_listing_that_fails_partway_still_applies_what_it_listed() {
    let (fake, registry) = registry();
    fake.script(vec![listed(&[0x200, 0x201]), control(wire::NLMSG_ERROR, libc::ENOMEM)]);
    let err = registry.add_rule(rule_for_all()).unwrap_err();
    assert!(matches!(err, Error::Kernel { errno, .. } if errno == libc::ENOMEM), "{err:?}");
    assert_eq!(newae_spis(&fake), [(0x200, Some(7)), (0x201, Some(7))], "the SAs listed before the failure");
    assert!(registry.relist_due().is_some(), "the rest is owed");
    assert_eq!(registry.rules().len(), 1, "the rule is in force for new SAs");
}

#[test]
fn registrations_are_counted() {
    let (fake, registry) = registry();
    fake.script(vec![listed(&[0x300]), done()]);
    registry.register_sa(sa(0x300), Some(REGISTERED)).unwrap();
    registry.register_sa(sa(0x300), Some(REGISTERED)).unwrap();
    assert_eq!(registry.registrations(&sa(0x300)), 2);

    // One owner lets go: the other's registration stands.
    registry.register_sa(sa(0x300), None).unwrap();
    assert_eq!(registry.registrations(&sa(0x300)), 1);
    fake.script(vec![listed(&[0x300]), done()]);
    registry.add_rule(rule_for_all()).unwrap();
    let facts = xfrmsync::registry::SaFacts { sa: sa(0x300), saddr: None, reqid: 0, direction: None };
    assert_eq!(registry.thresholds_for(&facts), Some(REGISTERED), "the registration comes before every rule");

    registry.register_sa(sa(0x300), None).unwrap();
    assert_eq!(registry.registrations(&sa(0x300)), 0);
    assert_eq!(registry.thresholds_for(&facts), Some(RULE), "the last owner gone, the rule applies");
    registry.register_sa(sa(0x300), None).unwrap();
    assert_eq!(registry.registrations(&sa(0x300)), 0, "never below zero");
}

#[test]
fn a_registration_that_cannot_reach_the_kernel_is_kept_and_owed_or_undone() {
    let (fake, registry) = registry();
    fake.script(vec![listed(&[]), done()]);
    registry.add_rule(rule_for_all()).unwrap();
    // The kernel never answers the NEWAE: the call times out.
    fake.faults(&[Fault::Silent]);
    let result = registry.register_sa(sa(0x400), Some(REGISTERED));
    let count = registry.registrations(&sa(0x400));
    match result {
        Err(e) => assert_eq!(count, 0, "an error ({e}) must leave no registration for a later SA to inherit"),
        Ok(()) => {
            assert_eq!(count, 1);
            assert!(registry.relist_due().is_some(), "kept: its thresholds are owed by a listing");
        }
    }
}
