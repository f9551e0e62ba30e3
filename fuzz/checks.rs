//! What each fuzz target asserts about one input, shared with the
//! regression tests (tests/fuzz_regressions.rs includes this file), so a
//! crash found by fuzzing is replayed by `cargo test` exactly as it failed.

use xfrmsync::sync::SyncRecord;
use xfrmsync::view::AeventView;
use xfrmsync::wire::{self, Messages};

/// netlink_decode: a datagram as the kernel (or anyone) might send it. Every
/// decoder runs on every message; none may panic or read out of bounds,
/// and the view and the owned decoder must agree on everything.
pub fn netlink_decode(data: &[u8]) {
    for msg in Messages::new(data) {
        let Ok(msg) = msg else { break };
        let view = AeventView::parse(&msg);
        let owned = wire::decode_aevent(&msg);
        match (&view, &owned) {
            (Ok(view), Ok(owned)) => {
                assert_eq!(view.to_aevent(), *owned);
                assert_eq!(view.sa(), owned.sa);
                let replay = view.replay();
                assert_eq!(replay.seq64(), owned.replay.seq64());
                assert_eq!(replay.oseq64(), owned.replay.oseq64());
                let words: Vec<u32> = replay.bitmap_words().collect();
                assert_eq!(words.len(), replay.bitmap_len());
                for (i, w) in words.iter().enumerate() {
                    assert_eq!(replay.bitmap_word(i), Some(*w));
                }
                assert_eq!(replay.bitmap_word(words.len()), None);
                if let xfrmsync::Replay::Esn(esn) = &owned.replay {
                    assert_eq!(esn.bitmap(), &words[..]);
                }
                assert_eq!(view.to_string(), owned.to_string());
                let _ = owned.json().to_string();
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("view {view:?} and owned decoder {owned:?} disagree"),
        }
        let _ = wire::decode_sa_message(&msg).map(|info| info.esn());
        if let Ok(ack) = wire::decode_ack(&msg) {
            assert!(ack.errno >= 0);
        }
        let _ = wire::decode_newaddr(&msg);
    }
}

/// newsa_request: what a C caller hands `xfrmsync_newsa_add_thresholds`:
/// a NEWSA being built, in a buffer of some capacity. The first byte says
/// how much room there is past the data.
pub fn newsa_request(data: &[u8]) {
    let Some((&room, bytes)) = data.split_first() else { return };
    let mut buf = bytes.to_vec();
    buf.resize(bytes.len() + usize::from(room), 0);
    let before = wire::decode_sa_request(&buf);
    match wire::append_thresholds(&mut buf, 7, 250) {
        Ok(len) => {
            assert!(len <= buf.len());
            assert_eq!(u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize, len);
            let after = wire::decode_sa_request(&buf[..len]);
            if let (Ok(before), Ok(after)) = (&before, &after) {
                assert_eq!(before.sa, after.sa, "appending thresholds kept the SA");
            }
            // A second append is refused: the message carries them now.
            assert!(wire::append_thresholds(&mut buf, 7, 250).is_err());
        }
        Err(_) => assert_eq!(&buf[..bytes.len()], bytes, "a refused append leaves the message alone"),
    }
}

/// sync_record: bytes off the sync link. Decoding never panics, and a
/// record (or a departure) it takes encodes back to exactly the bytes it
/// took: no field is dropped or bent on the way.
pub fn sync_record(data: &[u8]) {
    if let Ok((record, used)) = SyncRecord::decode_prefix(data) {
        let mut out = Vec::new();
        record.encode(&mut out).expect("a decoded record encodes");
        assert_eq!(&out[..], &data[..used]);
        assert_eq!(SyncRecord::decode(&out), Ok(record));
    }
    if let Ok((departure, used)) = xfrmsync::sync::Departure::decode_prefix(data) {
        let mut out = Vec::new();
        departure.encode(&mut out);
        assert_eq!(&out[..], &data[..used]);
    }
}
