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
