//! The HA sync engine apart from a real kernel (issue 13): what a standby
//! keeps of the records it gets, and where an active node's records come
//! from, against the fake kernel (its GETSA dumps scripted). The takeover
//! itself, on real SAs under traffic, is tests/vm_sync.rs.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::fake_kernel::{FakeKernel, Fault, SaState, REQUEST_SEQ};
use xfrmsync::aevent::LegacyReplay;
use xfrmsync::sync::{Active, ActiveConfig, Lag, MarginPolicy, Outgoing, Received, Standby, SyncRecord};
use xfrmsync::wire::{self, NewSa, Sender};
use xfrmsync::{Error, Handle, Replay, SaId, Thresholds};

fn sa(spi: u32) -> SaId {
    SaId::esp("10.9.0.2".parse().unwrap(), spi)
}

fn record(spi: u32, epoch: u64, counter: u64, oseq: u32) -> SyncRecord {
    SyncRecord {
        sa: sa(spi),
        saddr: "10.9.0.1".parse().unwrap(),
        reqid: 1,
        direction: None,
        esn: false,
        replay: Replay::Legacy(LegacyReplay { oseq, seq: 0, bitmap: 0 }),
        lifetime_bytes: 0,
        lifetime_packets: 0,
        thresholds: None,
        epoch,
        counter,
        sent_at_ms: 1,
        rate_per_ks: 0,
    }
}

#[test]
fn a_standby_keeps_the_latest_record_of_each_sa() {
    let mut standby = Standby::new(0);
    assert_eq!(standby.receive(record(1, 3, 10, 100)).unwrap(), Received::Held);
    assert_eq!(standby.receive(record(1, 3, 9, 999)).unwrap(), Received::Older, "a lower counter of the same epoch");
    assert_eq!(standby.receive(record(1, 3, 10, 999)).unwrap(), Received::Older, "a retransmission");
    assert_eq!(standby.get(&sa(1)).unwrap().replay.oseq64(), 100);
    assert_eq!(standby.receive(record(1, 3, 11, 200)).unwrap(), Received::Held);
    assert_eq!(standby.receive(record(2, 3, 1, 5)).unwrap(), Received::Held, "counters are compared per SA");
    assert_eq!(standby.len(), 2);
    assert_eq!(standby.epoch(), 3, "the highest epoch a record carried");

    // A node that took over sends at a higher epoch; its predecessor's
    // records are ignored from then on, whatever their counters.
    assert_eq!(standby.receive(record(1, 4, 1, 300)).unwrap(), Received::Held);
    assert_eq!(standby.receive(record(2, 3, 1000, 6)).unwrap(), Received::LowerEpoch);
    assert_eq!(standby.get(&sa(2)).unwrap().replay.oseq64(), 5, "unchanged by the lower epoch");
    assert_eq!(standby.epoch(), 4);

    assert!(standby.forget(&sa(1)));
    assert!(!standby.forget(&sa(1)));
    assert_eq!(standby.len(), 1);
    let stats = standby.stats();
    assert_eq!((stats.held, stats.older, stats.lower_epoch, stats.forgotten), (4, 2, 1, 1));
}

#[test]
fn a_standby_started_at_an_epoch_ignores_records_below_it() {
    let mut standby = Standby::new(5);
    assert_eq!(standby.receive(record(1, 4, u64::MAX, 1)).unwrap(), Received::LowerEpoch);
    assert!(standby.is_empty());
    assert_eq!(standby.receive(record(1, 5, 1, 1)).unwrap(), Received::Held);
}

#[test]
fn a_standby_measures_its_lag_against_a_sample_with_the_margin_of_a_commit_then() {
    let mut standby = Standby::new(0);
    let policy = MarginPolicy { detection_ms: 1000, safety_factor: 2.0, floor: 100, ceiling: 1 << 30 };
    let mut held = record(1, 3, 10, 1000);
    // 1,000 packets/s, a 64-packet threshold: at 500 ms, (1,500 + 64) * 2.
    held.rate_per_ks = 1_000_000;
    held.thresholds = Some(Thresholds { replay_packets: 64, timer_ms: 1000 });
    held.sent_at_ms = 10_000;
    standby.receive(held).unwrap();
    let mut sample = record(1, 3, 10, 1300);
    sample.sent_at_ms = 10_500;
    assert_eq!(standby.lag(&sample, &policy), Lag::Behind { packets: 300, margin: 3128 });
    sample.replay = Replay::Legacy(LegacyReplay { oseq: 900, seq: 0, bitmap: 0 });
    assert_eq!(
        standby.lag(&sample, &policy),
        Lag::Behind { packets: 0, margin: 3128 },
        "a record newer than the sample"
    );
    assert_eq!(standby.lag(&record(2, 3, 1, 5), &policy), Lag::NotHeld);
    standby.learn_epoch(4);
    assert_eq!(standby.lag(&sample, &policy), Lag::LowerEpoch, "a replaced sender's sample measures nothing");
    assert_eq!(standby.len(), 1);
}

/// One datagram of a GETSA dump listing each `(spi, seq)` with its legacy
/// replay state, as the kernel sends them (`NLM_F_MULTI`).
fn listed(sas: &[(u32, u32)]) -> Vec<u8> {
    let mut datagram = Vec::new();
    for &(spi, seq) in sas {
        let id = sa(spi);
        let new = NewSa::new(&id, "10.9.0.1".parse::<IpAddr>().unwrap(), "ecb(cipher_null)", &[]).unwrap();
        let mut msg = Vec::new();
        wire::encode_newsa(&mut msg, Sender { seq: REQUEST_SEQ, port_id: 0x4343 }, &new);
        msg[6..8].copy_from_slice(&wire::NLM_F_MULTI.to_ne_bytes());
        // The install time the fake's events carry: xfrm_usersa_info's
        // curlft.add_time (header 16, selector 56, id 24, saddr 16, lft 64,
        // then bytes and packets).
        msg[16 + 56 + 24 + 16 + 64 + 16..][..8].copy_from_slice(&1_700_000_000u64.to_ne_bytes());
        // XFRMA_REPLAY_VAL, which every listed SA carries.
        msg.extend_from_slice(&16u16.to_ne_bytes());
        msg.extend_from_slice(&10u16.to_ne_bytes());
        for word in [0u32, seq, 0] {
            msg.extend_from_slice(&word.to_ne_bytes());
        }
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        datagram.extend_from_slice(&msg);
    }
    datagram
}

fn done() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&20u32.to_ne_bytes());
    out.extend_from_slice(&wire::NLMSG_DONE.to_ne_bytes());
    out.extend_from_slice(&wire::NLM_F_MULTI.to_ne_bytes());
    out.extend_from_slice(&REQUEST_SEQ.to_ne_bytes());
    out.extend_from_slice(&0x4343u32.to_ne_bytes());
    out.extend_from_slice(&0i32.to_ne_bytes());
    out
}

/// Dispatches until nothing is due, collecting what the node sends.
fn run(active: &mut Active) -> (Vec<SyncRecord>, Vec<SaId>, Vec<Result<usize, Error>>) {
    let (mut records, mut gone, mut results) = (Vec::new(), Vec::new(), Vec::new());
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        results.push(active.dispatch(&mut |o| match o {
            Outgoing::Record(r) => records.push(*r),
            Outgoing::Gone(sa) => gone.push(*sa),
        }));
        let due = active.registry().relist_due();
        if due.map_or(true, |d| d > Instant::now()) || Instant::now() > until {
            break;
        }
        // The fake answers from its own thread.
        std::thread::sleep(Duration::from_millis(2));
    }
    (records, gone, results)
}

#[test]
fn an_active_node_sends_listings_and_events_but_never_an_older_state() {
    xfrmsync::timer::set_kernel_hz(250).unwrap();
    let (fake, handle) =
        FakeKernel::start(SaState::new(250), Handle::builder().request_timeout(Duration::from_millis(300)), 0x4343);
    let thresholds = Thresholds { replay_packets: 16, timer_ms: 400 };
    // The rules' first listing, the thresholds it gives, then the
    // snapshot's listing.
    fake.script(vec![listed(&[(0x1001, 0)]), done()]);
    fake.faults(&[Fault::Pass]);
    fake.script(vec![listed(&[(0x1001, 0)]), done()]);
    let config =
        ActiveConfig { default_thresholds: thresholds, refresh: Duration::from_secs(600), ..Default::default() };
    let mut active = Active::new(handle, 7, config).unwrap();

    let (records, _, results) = run(&mut active);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(records.len(), 1, "the snapshot: {records:?}");
    let first = records[0];
    assert_eq!((first.sa, first.epoch, first.thresholds), (sa(0x1001), 7, Some(thresholds)));
    assert!(!first.esn);
    assert_eq!(active.stats().own_updates, 1, "the update event of its own thresholds is skipped");

    // Traffic events: a record each, with a rising counter.
    assert_eq!(fake.send_events(2, 1), 2);
    let (records, _, _) = run(&mut active);
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1].replay.seq64(), 2);
    assert!(records[0].counter > first.counter && records[1].counter > records[0].counter);
    assert_eq!(active.stats().from_events, 2);

    // A sample reads the kernel now and is no record: the last counter,
    // not a new one; each SA once a call. A standby measures its lag by it.
    fake.set_state(SaState { seq: 5, ..fake.state() });
    let samples = active.sample(8);
    assert_eq!(samples.len(), 1, "{samples:?}");
    assert_eq!((samples[0].sa, samples[0].replay.seq64(), samples[0].epoch), (sa(0x1001), 5, 7));
    assert_eq!(samples[0].counter, records[1].counter);
    assert_eq!(active.stats().samples, 1);
    let mut standby = Standby::new(0);
    assert_eq!(standby.lag(&samples[0], &MarginPolicy::default()), Lag::NotHeld);
    standby.receive(records[1]).unwrap();
    assert!(matches!(standby.lag(&samples[0], &MarginPolicy::default()), Lag::Behind { packets: 3, .. }));
    assert_eq!(standby.len(), 1, "the sample is not held");

    // A snapshot whose state is older than the events already sent: the
    // standby must never go back, so nothing is sent for it.
    fake.script(vec![listed(&[(0x1001, 1)]), done()]);
    active.snapshot().unwrap();
    let (records, _, _) = run(&mut active);
    assert!(records.is_empty(), "an older state sent: {records:?}");
    assert_eq!(active.stats().older_states, 1);

    // A node that learns of a higher epoch was replaced: it sends nothing more.
    assert!(!active.learn_epoch(7), "its own epoch replaces nothing");
    assert!(active.learn_epoch(8));
    assert!(!active.learn_epoch(8), "said once");
    assert_eq!(active.replaced_by(), Some(8));
    assert_eq!(fake.send_events(1, 1), 1);
    let (records, _, _) = run(&mut active);
    assert!(records.is_empty(), "a replaced node sent {records:?}");
    assert_eq!(active.stats().withheld, 1);
}

#[test]
fn a_record_of_two_address_families_is_refused_and_changes_nothing() {
    let mut standby = Standby::new(0);
    let mixed = SyncRecord { saddr: "fd00::1".parse().unwrap(), ..record(1, 1, 1, 1) };
    assert!(standby.receive(mixed).is_err());
    assert!(standby.is_empty());
    assert_eq!(standby.epoch(), 0);
}
