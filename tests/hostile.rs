//! Decoding never trusts a length: cut, corrupted and crafted messages give
//! errors (or skip what is unknown), never a panic or an out-of-bounds read.

mod common;
use common::datagrams;

use xfrmsync::wire::{self, Messages};
use xfrmsync::Replay;

const ALL: [&str; 9] = [
    "events-esn.bin",
    "events-legacy-default.bin",
    "events-legacy-rthr5.bin",
    "events-sa-add.bin",
    "events-sa-lifecycle.bin",
    "getsa-dump.bin",
    "query-responses.bin",
    "requests.bin",
    "getsa-dump.bin",
];

/// Runs every decoder we have over whatever the datagram holds.
fn decode_everything(datagram: &[u8]) -> usize {
    let mut decoded = 0;
    for msg in Messages::new(datagram) {
        let Ok(msg) = msg else { break };
        decoded += usize::from(wire::decode_aevent(&msg).is_ok());
        decoded += usize::from(wire::decode_sa_message(&msg).is_ok());
        decoded += usize::from(wire::decode_ack(&msg).is_ok());
    }
    decoded
}

#[test]
fn every_truncation_of_every_captured_datagram() {
    for name in ALL {
        let mut whole = 0;
        for d in datagrams(name) {
            for cut in 0..d.len() {
                decode_everything(&d[..cut]);
            }
            whole += decode_everything(&d);
        }
        assert!(whole > 0, "{name} decodes when whole");
    }
}

#[test]
fn every_byte_set_to_extremes() {
    for name in ALL {
        for d in datagrams(name) {
            for at in 0..d.len() {
                for value in [0x00, 0xff, 0x7f, 0x80] {
                    let mut bad = d.clone();
                    bad[at] = value;
                    decode_everything(&bad);
                }
            }
        }
    }
}

/// The first legacy NEWAE of the corpus: header(16) aevent_id(48) then
/// REPLAY_VAL (16) and LTIME_VAL (36).
fn legacy_event() -> Vec<u8> {
    datagrams("events-legacy-default.bin").remove(0)
}

fn esn_event() -> Vec<u8> {
    datagrams("events-esn.bin").remove(0)
}

fn set_len(msg: &mut [u8]) {
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(payload);
    while a.len() % 4 != 0 {
        a.push(0);
    }
    a
}

fn decode(msg: &[u8]) -> xfrmsync::Result<xfrmsync::Aevent> {
    let m = Messages::new(msg).next().unwrap()?;
    wire::decode_aevent(&m)
}

#[test]
fn unknown_attributes_and_pad_are_skipped() {
    let original = decode(&legacy_event()).unwrap();
    let mut msg = legacy_event();
    // XFRMA_PAD (27) before the rest, an unknown type 200, and a nested-flag one.
    let mut extra = attr(27, &[]);
    extra.extend(attr(200, &[1, 2, 3, 4, 5]));
    extra.extend(attr(0x8000 | 201, &[0; 8]));
    msg.splice(64..64, extra);
    set_len(&mut msg);
    assert_eq!(decode(&msg).unwrap(), original);
}

#[test]
fn attribute_lengths_are_checked() {
    let mut short = legacy_event();
    short[64..66].copy_from_slice(&3u16.to_ne_bytes());
    assert!(decode(&short).is_err(), "attribute shorter than its header");

    let mut long = legacy_event();
    long[64..66].copy_from_slice(&200u16.to_ne_bytes());
    assert!(decode(&long).is_err(), "attribute past the message");

    let mut small_payload = legacy_event();
    small_payload[64..66].copy_from_slice(&8u16.to_ne_bytes()); // REPLAY_VAL of 4 bytes
    assert!(decode(&small_payload).is_err());
}

#[test]
fn esn_bitmap_length_is_checked() {
    let esn = esn_event();
    // ESN attribute header at 64, its xfrm_replay_state_esn at 68: bmp_len first.
    assert!(matches!(decode(&esn).unwrap().replay, Replay::Esn(_)));
    for bad_len in [5u32, 129, u32::MAX] {
        let mut m = esn.clone();
        m[68..72].copy_from_slice(&bad_len.to_ne_bytes());
        assert!(decode(&m).is_err(), "bmp_len {bad_len}");
    }
    let mut zero = esn.clone();
    zero[68..72].copy_from_slice(&0u32.to_ne_bytes());
    match decode(&zero).unwrap().replay {
        Replay::Esn(r) => assert!(r.bitmap().is_empty()),
        Replay::Legacy(_) => panic!("still ESN"),
    }
}

#[test]
fn netlink_lengths_are_checked() {
    let ev = legacy_event();
    let mut short = ev.clone();
    short[..4].copy_from_slice(&15u32.to_ne_bytes());
    assert!(Messages::new(&short).next().unwrap().is_err());
    let mut long = ev.clone();
    long[..4].copy_from_slice(&(ev.len() as u32 + 4).to_ne_bytes());
    assert!(Messages::new(&long).next().unwrap().is_err());
    assert!(Messages::new(&ev[..10]).next().unwrap().is_err());
    let mut body_short = ev[..40].to_vec();
    set_len(&mut body_short);
    assert!(decode(&body_short).is_err(), "aevent id cut");
    // A malformed message ends the walk: nothing after it is trusted.
    let mut two = short.clone();
    two.extend_from_slice(&ev);
    let walked: Vec<_> = Messages::new(&two).collect();
    assert_eq!(walked.len(), 1);
}

fn control(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&9u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

#[test]
fn done_overrun_and_multipart_walk() {
    let mut d = control(wire::NLMSG_DONE, wire::NLM_F_MULTI, &0i32.to_ne_bytes());
    d.extend(control(wire::NLMSG_OVERRUN, 0, &[]));
    d.extend(legacy_event());
    let kinds: Vec<u16> = Messages::new(&d).map(|m| m.unwrap().kind).collect();
    assert_eq!(kinds, [wire::NLMSG_DONE, wire::NLMSG_OVERRUN, wire::XFRM_MSG_NEWAE]);
}

#[test]
fn extended_ack_text_is_read_capped_or_not() {
    let request = control(wire::XFRM_MSG_NEWAE, 0x105, &[0u8; 48]);
    let text = attr(1, b"NLM_F_REPLACE flag is required\0");
    // Capped (NLM_F_CAPPED 0x100): only the request header is echoed.
    let mut capped = (-libc::EINVAL).to_ne_bytes().to_vec();
    capped.extend_from_slice(&request[..16]);
    capped.extend_from_slice(&text);
    let capped = control(wire::NLMSG_ERROR, 0x100 | 0x200, &capped);
    // Not capped: the whole request, then the TLVs.
    let mut full = (-libc::EINVAL).to_ne_bytes().to_vec();
    full.extend_from_slice(&request);
    full.extend_from_slice(&text);
    let full = control(wire::NLMSG_ERROR, 0x200, &full);
    for msg in [capped, full] {
        let m = Messages::new(&msg).next().unwrap().unwrap();
        let ack = wire::decode_ack(&m).unwrap();
        assert_eq!(ack.errno, libc::EINVAL);
        assert_eq!(ack.ext_ack, Some("NLM_F_REPLACE flag is required"));
        assert_eq!(ack.request_kind, wire::XFRM_MSG_NEWAE);
    }
    let mut success = 0i32.to_ne_bytes().to_vec();
    success.extend_from_slice(&request[..16]);
    let success = control(wire::NLMSG_ERROR, 0x100, &success);
    let m = Messages::new(&success).next().unwrap().unwrap();
    assert_eq!(wire::decode_ack(&m).unwrap().errno, 0);
}

// ---------------------------------------------------------------------------
// Hostile and odd input as the kernel means it (issue 9): each case decoded
// where it is valid, rejected with a clear error where it is not, and
// nothing else affected — the message behind it in the same datagram, the
// next datagram, the next request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_kernel::{FakeKernel, SaState, REQUEST_SEQ};
use xfrmsync::{Error, Handle};

/// `datagram` as one message of its own, then a good event behind it.
fn then_good(bad: &[u8]) -> Vec<u8> {
    let mut d = bad.to_vec();
    d.resize((d.len() + 3) & !3, 0);
    d.extend(legacy_event());
    d
}

/// The walk rejects the first message with an error and still decodes the
/// good event behind it.
fn rejected_alone(bad: &[u8], what: &str) -> Error {
    let datagram = then_good(bad);
    let mut walk = Messages::new(&datagram);
    let first = walk.next().unwrap();
    let err = match first.and_then(|m| wire::decode_aevent(&m)) {
        Err(e) => e,
        Ok(ev) => panic!("{what}: decoded as {ev:?}"),
    };
    assert!(matches!(err, Error::Malformed(_)), "{what}: {err:?}");
    assert!(!err.to_string().is_empty());
    let behind = walk.next().expect("the good event behind is still walked").unwrap();
    assert_eq!(wire::decode_aevent(&behind).unwrap(), decode(&legacy_event()).unwrap(), "{what}");
    err
}

/// A handle on a fake kernel whose callback records every event.
fn watched() -> (FakeKernel, Handle, Arc<Mutex<Vec<xfrmsync::Aevent>>>) {
    let (fake, handle) =
        FakeKernel::start(SaState::new(250), Handle::builder().request_timeout(Duration::from_millis(500)), 0x4242);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    handle.on_event(Some(Box::new(move |_, ev| record.lock().unwrap().push(*ev)))).unwrap();
    (fake, handle, seen)
}

/// Through dispatch: the bad datagram is an error of its own call, and the
/// good event that follows reaches its callback on the next.
fn dispatch_rejects_then_goes_on(datagram: &[u8], what: &str) {
    let (fake, handle, seen) = watched();
    assert!(fake.send_event_datagram(datagram));
    assert!(fake.send_event_datagram(&legacy_event()));
    let mut errors = 0;
    for _ in 0..4 {
        match handle.dispatch() {
            Ok(_) => {}
            Err(Error::Malformed(_)) => errors += 1,
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
    assert_eq!(errors, 1, "{what}: one error for the one bad message");
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty(), "{what}: the good event still arrived");
    assert_eq!(*seen.last().unwrap(), decode(&legacy_event()).unwrap(), "{what}");
}

#[test]
fn a_one_byte_datagram_is_rejected() {
    let err = Messages::new(&[0x14]).next().unwrap().unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
    assert_eq!(Messages::new(&[0x14]).count(), 1, "one error, then the walk ends");
    dispatch_rejects_then_goes_on(&[0x14], "1-byte datagram");
}

#[test]
fn an_attribute_overlapping_the_next_message_is_rejected() {
    // The first event's length is cut by 16 bytes, so its XFRMA_LTIME_VAL
    // (the last attribute) runs into the event that follows it.
    let mut first = legacy_event();
    let cut = first.len() - 16;
    first.truncate(cut);
    first[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
    let err = rejected_alone(&first, "overlapping attribute");
    assert!(err.to_string().contains("past the end of its message"), "{err}");
    dispatch_rejects_then_goes_on(&then_good(&first), "overlapping attribute");
}

#[test]
fn esn_bitmap_lengths_as_the_kernel_means_them() {
    for bad_len in [129u32, u32::MAX] {
        let mut m = esn_event();
        m[68..72].copy_from_slice(&bad_len.to_ne_bytes());
        let err = rejected_alone(&m, &format!("bmp_len {bad_len}"));
        assert!(err.to_string().contains("bmp_len"), "{err}");
        dispatch_rejects_then_goes_on(&m, &format!("bmp_len {bad_len}"));
    }
    // bmp_len 0: an empty bitmap, the rest of the state as sent.
    let mut zero = esn_event();
    zero[68..72].copy_from_slice(&0u32.to_ne_bytes());
    let whole = decode(&esn_event()).unwrap();
    let ev = decode(&zero).unwrap();
    match (ev.replay, whole.replay) {
        (Replay::Esn(r), Replay::Esn(w)) => {
            assert!(r.bitmap().is_empty());
            assert_eq!((r.seq64(), r.oseq64(), r.replay_window), (w.seq64(), w.oseq64(), w.replay_window));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(ev.lifetime, whole.lifetime);
}

#[test]
fn a_misaligned_64_bit_lifetime_after_pad_is_decoded() {
    // A replay event of the corpus, whose counters are not 0:
    // header(16) id(48) REPLAY_VAL(16) LTIME_VAL at 80.
    let event = datagrams("events-legacy-default.bin").remove(3);
    let original = decode(&event).unwrap();
    assert_ne!(original.lifetime.bytes, 0);
    assert_ne!(original.lifetime.add_time, 0);
    // An XFRMA_PAD of 8 bytes moves the lifetime's payload to offset 92:
    // 4 bytes off 8-byte alignment in the message.
    let mut msg = event;
    msg.splice(80..80, attr(27, &[0xaa; 4]));
    set_len(&mut msg);
    let lifetime_at = 80 + 8 + 4;
    assert_eq!(lifetime_at % 8, 4);
    assert_eq!(decode(&msg).unwrap(), original);
    // And the whole message at an odd address.
    for shift in 1..8 {
        let mut shifted = vec![0u8; shift];
        shifted.extend_from_slice(&msg);
        assert_eq!(decode(&shifted[shift..]).unwrap(), original, "message at offset {shift}");
    }
}

#[test]
fn an_error_whose_echo_is_cut_short_still_reports_its_errno() {
    for echoed in [0usize, 2, 6, 15] {
        let mut payload = (-libc::EPERM).to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0x11; 16][..echoed]);
        let msg = control(wire::NLMSG_ERROR, 0x200, &payload);
        let m = Messages::new(&msg).next().unwrap().unwrap();
        let ack = wire::decode_ack(&m).unwrap_or_else(|e| panic!("echo of {echoed} bytes: {e}"));
        assert_eq!(ack.errno, libc::EPERM, "echo of {echoed} bytes");
    }
    // Not even the errno: that one is malformed.
    let msg = control(wire::NLMSG_ERROR, 0, &[0xff, 0xff]);
    let m = Messages::new(&msg).next().unwrap().unwrap();
    assert!(matches!(wire::decode_ack(&m), Err(Error::Malformed(_))));

    // Through a request: the handle reports the kernel's errno.
    let (fake, handle, _) = watched();
    let sa = fake.state().sa;
    let mut cut = Vec::new();
    cut.extend_from_slice(&24u32.to_ne_bytes());
    cut.extend_from_slice(&wire::NLMSG_ERROR.to_ne_bytes());
    cut.extend_from_slice(&0u16.to_ne_bytes());
    cut.extend_from_slice(&REQUEST_SEQ.to_ne_bytes());
    cut.extend_from_slice(&0u32.to_ne_bytes());
    cut.extend_from_slice(&(-libc::EPERM).to_ne_bytes());
    cut.extend_from_slice(&[0x11; 4]);
    fake.script(vec![cut]);
    let err = handle.query(&sa).unwrap_err();
    assert_eq!(err.errno(), libc::EPERM, "{err:?}");
    assert!(handle.query(&sa).is_ok(), "the next request is not affected");
}

#[test]
fn replies_with_a_wrong_sequence_number_are_skipped() {
    let (fake, handle, _) = watched();
    let sa = fake.state().sa;
    let mut stale_state = fake.state();
    stale_state.seq = 999;
    let mut stale = Vec::new();
    common::fake_kernel::aevent(&mut stale, &stale_state, 0, 7, 0);
    let mut stale_error = control(wire::NLMSG_ERROR, 0x100, &{
        let mut p = (-libc::ENOENT).to_ne_bytes().to_vec();
        p.extend_from_slice(&[0; 16]);
        p
    });
    stale_error[8..12].copy_from_slice(&8u32.to_ne_bytes());
    let mut good = Vec::new();
    common::fake_kernel::aevent(&mut good, &fake.state(), 0, REQUEST_SEQ, 0);
    fake.script(vec![stale, stale_error, good]);
    let ev = handle.query(&sa).unwrap();
    assert_eq!(ev.replay.seq64(), u64::from(fake.state().seq), "the answer, not the stale ones");
}

#[test]
fn a_truncated_multipart_dump_is_rejected() {
    // The capture: 3 NEWSA (NLM_F_MULTI) in one datagram, NLMSG_DONE in
    // the next.
    let parts = datagrams("getsa-dump.bin");
    let kinds: Vec<u16> = parts.iter().flat_map(|d| Messages::new(d).map(|m| m.unwrap().kind)).collect();
    assert_eq!(kinds, [wire::XFRM_MSG_NEWSA, wire::XFRM_MSG_NEWSA, wire::XFRM_MSG_NEWSA, wire::NLMSG_DONE]);
    let (dump, done) = (parts[0].clone(), parts[1].clone());
    let with_seq = |mut d: Vec<u8>| {
        let mut at = 0;
        while at + 16 <= d.len() {
            let len = u32::from_ne_bytes(d[at..at + 4].try_into().unwrap()) as usize;
            d[at + 8..at + 12].copy_from_slice(&REQUEST_SEQ.to_ne_bytes());
            at += (len + 3) & !3;
        }
        d
    };
    // Cut inside the second NEWSA: its length now runs past the datagram.
    let first_len = u32::from_ne_bytes(dump[..4].try_into().unwrap()) as usize;
    let cut = with_seq(dump.clone())[..first_len + 100].to_vec();
    let (fake, handle, _) = watched();
    fake.script(vec![cut]);
    let mut listed = 0;
    let err = handle.dump_sas(|_| listed += 1).unwrap_err();
    assert!(matches!(err, Error::Malformed(_)), "{err:?}");
    assert_eq!(listed, 1, "what came before the cut was whole");

    // The parts end without NLMSG_DONE: the dump is not taken as complete.
    fake.script(vec![with_seq(dump.clone())]);
    let err = handle.dump_sas(|_| {}).unwrap_err();
    assert!(matches!(err, Error::TimedOut(_)), "{err:?}");

    // The whole dump still works afterwards.
    fake.script(vec![with_seq(dump), with_seq(done)]);
    let mut listed = 0;
    handle.dump_sas(|_| listed += 1).unwrap();
    assert_eq!(listed, 3);
}

/// A netlink socket of our own, which is not the kernel (port id != 0).
fn impostor() -> netlink_sys::Socket {
    let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_XFRM).expect("NETLINK_XFRM socket");
    s.bind_auto().unwrap();
    s
}

fn port_of(fd: std::os::fd::RawFd) -> u32 {
    // SAFETY: sockaddr_nl is plain data; getsockname fills at most its size.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: the pointers describe `addr` and `len`, alive for the call.
    let rc = unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_nl).cast(), &mut len) };
    assert_eq!(rc, 0);
    addr.nl_pid
}

#[test]
fn messages_from_a_non_kernel_port_are_dropped() {
    let handle = Handle::open().expect("open a handle (needs CAP_NET_ADMIN)");
    let seen = Arc::new(Mutex::new(0));
    let count = seen.clone();
    handle.on_event(Some(Box::new(move |_, _| *count.lock().unwrap() += 1))).unwrap();
    let forger = impostor();
    // An event sent straight to the event socket: read and dropped.
    let to_events = netlink_sys::SocketAddr::new(port_of(handle.event_fd()), 0);
    forger.send_to(&legacy_event(), &to_events, 0).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(handle.dispatch().unwrap(), 0, "nothing counted");
    assert_eq!(*seen.lock().unwrap(), 0, "no callback ran");

    // A forged answer to the first request (seq 1) on the request socket:
    // skipped, and the kernel's own answer (no such SA) is what counts.
    let mut forged = legacy_event();
    forged[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let to_requests = netlink_sys::SocketAddr::new(handle.port_id(), 0);
    forger.send_to(&forged, &to_requests, 0).unwrap();
    let sa = xfrmsync::SaId::esp("10.9.0.2".parse().unwrap(), 0xdead);
    let err = handle.query(&sa).unwrap_err();
    assert_eq!(err.errno(), libc::ESRCH, "{err:?}");
}

/// Events are routed by a key read from the message's bytes, not by the
/// decoded `SaId`: both must name the same SA. An IPv4 address's unused
/// 12 bytes (whatever the kernel left there) must not count; a mark and an
/// if_id must; and each batch of events in one call still reaches the right
/// callbacks, in order, with a catch-all for the rest.
#[test]
fn events_reach_the_callback_of_their_own_sa() {
    let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
    let handle = Handle::builder().events(false).open_with_sockets(a.into(), b.into(), None, 1).unwrap();
    let base = legacy_event();
    let plain = decode(&base).unwrap().sa;
    let mut garbage_tail = base.clone();
    garbage_tail[16 + 4..16 + 16].fill(0xa5);
    let with = |extra: &[u8]| {
        let mut m = base.clone();
        m.extend_from_slice(extra);
        set_len(&mut m);
        m
    };
    let marked = with(&attr(21, &[7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]));
    let with_if_id = with(&attr(31, &[9, 0, 0, 0]));
    let marked_sa = decode(&marked).unwrap().sa;
    let if_id_sa = decode(&with_if_id).unwrap().sa;
    assert_ne!(marked_sa, plain);
    assert_ne!(if_id_sa, plain);
    let mut v6 = base.clone();
    v6[16 + 20..16 + 22].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    v6[16 + 4..16 + 16].fill(0x11);
    let v6_sa = decode(&v6).unwrap().sa;

    let log = Arc::new(Mutex::new(Vec::new()));
    for (sa, name) in [(plain, "plain"), (marked_sa, "marked"), (if_id_sa, "if_id"), (v6_sa, "v6")] {
        let log = log.clone();
        handle
            .on_sa_event_view(
                sa,
                Some(Box::new(move |_, ev| {
                    assert_eq!(ev.sa(), sa);
                    log.lock().unwrap().push(name);
                })),
            )
            .unwrap();
    }
    let any = log.clone();
    handle.on_event_view(Some(Box::new(move |_, _| any.lock().unwrap().push("any")))).unwrap();
    let mut other = base.clone();
    other[16 + 16] ^= 0xff; // another SPI
    let order = [&base, &garbage_tail, &marked, &with_if_id, &v6, &other];
    // More than one batch's worth of events in one call.
    let datagrams: Vec<&[u8]> = order.iter().cycle().take(6 * 13).map(|m| m.as_slice()).collect();
    assert_eq!(handle.dispatch_datagrams(datagrams.iter().copied()).unwrap(), 6 * 13);
    let expected: Vec<&str> =
        ["plain", "plain", "marked", "if_id", "v6", "any"].iter().copied().cycle().take(6 * 13).collect();
    assert_eq!(*log.lock().unwrap(), expected);
}
