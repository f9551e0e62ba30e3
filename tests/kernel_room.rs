//! No request may ask the kernel for an answer larger than the room it
//! makes for it: Linux before 7081d46d3231 (Debian 11's 5.10) panics when
//! a GETAE asks for both thresholds of an SA with a mark and an `if_id`.
//! The fake kernel makes exactly 5.10's room, with no allocator slack, and
//! stops answering for good where a request outgrows it.

mod common;
use common::fake_kernel::{aevent, FakeKernel, SaState, AEVENT_ROOM_5_10};
use xfrmsync::aevent::flags;
use xfrmsync::wire::{self, GetaeAsk};
use xfrmsync::{Handle, SaId};

const PORT: u32 = 0x4242;

fn with_identity(sa: SaId) -> SaState {
    SaState { sa, replay_threshold: 7, ..SaState::new(500) }
}

fn route_based() -> SaId {
    SaId::esp("10.9.0.2".parse().unwrap(), 0x108).with_mark(7, 0xff).with_if_id(5)
}

fn getae_flags(fake: &FakeKernel) -> Vec<u32> {
    fake.seen().iter().filter(|s| s.kind == wire::XFRM_MSG_GETAE).map(|s| s.ae_flags).collect()
}

#[test]
fn the_fake_outgrows_5_10s_room_exactly_where_the_kernel_does() {
    let room = |sa: SaId, ae_flags: u32| {
        let mut out = Vec::new();
        aevent(&mut out, &with_identity(sa), ae_flags, 1, 1);
        out.len() - 16 <= AEVENT_ROOM_5_10
    };
    let both = flags::RTHR | flags::ETHR;
    assert!(!room(route_based(), both), "mark + if_id, both thresholds: the crash");
    assert!(room(route_based(), flags::RTHR) && room(route_based(), flags::ETHR), "one at a time");
    assert!(room(route_based(), 0) && room(route_based(), flags::CU), "no threshold, update events");
    let unmarked = SaId { mark: Default::default(), ..route_based() };
    assert!(room(unmarked, both), "if_id alone fits in the mark's room");
}

#[test]
fn a_marked_sa_is_read_one_threshold_a_request_and_gets_both() {
    let (fake, handle) = FakeKernel::start(with_identity(route_based()), Handle::builder(), PORT);
    let read = handle.query_with_thresholds(&route_based()).expect("both thresholds, no panic");
    assert!(!fake.panicked());
    assert_eq!(getae_flags(&fake), [flags::RTHR, flags::ETHR]);
    assert_eq!(read.replay_threshold, Some(7));
    assert_eq!(read.timer_threshold_ms, Some(2000), "500 jiffies at HZ 250");
    assert_eq!(read.flags, flags::RTHR | flags::ETHR, "as one answer would say");
    assert_eq!(read.sa.spi, 0x108);
}

#[test]
fn a_marked_sa_without_if_id_is_split_too_since_a_query_cannot_tell() {
    let marked = SaId { if_id: 0, ..route_based() };
    let (fake, handle) = FakeKernel::start(with_identity(route_based()), Handle::builder(), PORT);
    handle.query_with_thresholds(&marked).unwrap();
    assert!(!fake.panicked());
    assert_eq!(getae_flags(&fake), [flags::RTHR, flags::ETHR]);
    assert_eq!(wire::threshold_reads(&marked), [GetaeAsk::ReplayThreshold, GetaeAsk::TimerThreshold]);
}

#[test]
fn an_unmarked_sa_keeps_its_single_request() {
    let unmarked = SaId { mark: Default::default(), ..route_based() };
    let (fake, handle) = FakeKernel::start(with_identity(unmarked), Handle::builder(), PORT);
    let read = handle.query_with_thresholds(&unmarked).unwrap();
    assert_eq!(getae_flags(&fake), [flags::RTHR | flags::ETHR]);
    assert_eq!((read.replay_threshold, read.timer_threshold_ms), (Some(7), Some(2000)));
    assert!(!fake.panicked());
}

#[test]
fn counters_alone_and_updates_stay_single_requests() {
    let (fake, handle) = FakeKernel::start(with_identity(route_based()), Handle::builder(), PORT);
    handle.query(&route_based()).unwrap();
    handle.update(&route_based(), &xfrmsync::AeUpdate { replay_threshold: Some(3), ..Default::default() }).unwrap();
    assert!(!fake.panicked());
    let kinds: Vec<(u16, u32)> = fake.seen().iter().map(|s| (s.kind, s.ae_flags)).collect();
    assert_eq!(kinds, [(wire::XFRM_MSG_GETAE, 0), (wire::XFRM_MSG_NEWAE, flags::RTHR)]);
}
