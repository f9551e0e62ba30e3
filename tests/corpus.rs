//! Decodes every datagram Linux 6.1 sent or received in the captured
//! scenario (tests/corpus/linux-6.1, see its README) and checks the fields
//! against the README and the `ip -s xfrm state` output taken at the end.

use std::collections::HashMap;
use std::net::IpAddr;

mod common;
use common::{corpus_dir, datagrams};

use xfrmsync::aevent::flags;
use xfrmsync::wire::{self, GetaeAsk, Messages, NlMsg, Sender};
use xfrmsync::{Aevent, Replay, SaId};

fn messages(datagram: &[u8]) -> Vec<NlMsg<'_>> {
    Messages::new(datagram).map(|m| m.expect("well-formed message")).collect()
}

fn aevents(name: &str) -> Vec<(u32, Aevent)> {
    let mut out = Vec::new();
    for d in datagrams(name) {
        for m in messages(&d) {
            assert_eq!(m.kind, wire::XFRM_MSG_NEWAE, "{name}");
            out.push((m.seq, wire::decode_aevent(&m).expect("decodes")));
        }
    }
    out
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// What `ip -s xfrm state` printed for one SA.
#[derive(Debug, Default)]
struct IpState {
    src: String,
    reqid: u32,
    esn: bool,
    seq: u32,
    oseq: u32,
    seq_hi: u32,
    oseq_hi: u32,
    /// Bitmap words in kernel order (iproute2 prints the last word first).
    bitmap: Vec<u32>,
    bytes: u64,
    packets: u64,
}

fn hex(s: &str) -> u32 {
    u32::from_str_radix(s.trim_end_matches(',').trim_start_matches("0x"), 16).unwrap()
}

fn ip_states(name: &str) -> HashMap<u32, IpState> {
    let text = std::fs::read_to_string(corpus_dir().join(name)).unwrap();
    let mut states = HashMap::new();
    let mut cur: Option<(u32, IpState)> = None;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["src", src, "dst", _] => {
                if let Some((spi, s)) = cur.take() {
                    states.insert(spi, s);
                }
                cur = Some((0, IpState { src: src.to_string(), ..Default::default() }));
            }
            ["proto", "esp", "spi", spi, "reqid", reqid, ..] => {
                let c = cur.as_mut().unwrap();
                c.0 = hex(spi.split('(').next().unwrap());
                c.1.reqid = reqid.split('(').next().unwrap().parse().unwrap();
            }
            ["anti-replay", "context:", "seq", seq, "oseq", oseq, "bitmap", bitmap] => {
                let s = &mut cur.as_mut().unwrap().1;
                s.seq = hex(seq);
                s.oseq = hex(oseq);
                s.bitmap = vec![hex(bitmap)];
            }
            ["anti-replay", "esn", "context:"] => {
                let s = &mut cur.as_mut().unwrap().1;
                s.esn = true;
                let nums: Vec<u32> = lines.next().unwrap().split_whitespace().skip(1).step_by(2).map(hex).collect();
                (s.seq_hi, s.seq, s.oseq_hi, s.oseq) = (nums[0], nums[1], nums[2], nums[3]);
                lines.next(); // replay_window, bitmap-length
                s.bitmap = lines.next().unwrap().split_whitespace().rev().map(hex).collect();
            }
            ["lifetime", "current:"] => {
                let l = lines.next().unwrap().replace(['(', ')', ','], " ");
                let n: Vec<u64> = l.split_whitespace().filter_map(|w| w.parse().ok()).collect();
                let s = &mut cur.as_mut().unwrap().1;
                (s.bytes, s.packets) = (n[0], n[1]);
            }
            _ => {}
        }
    }
    if let Some((spi, s)) = cur.take() {
        states.insert(spi, s);
    }
    states
}

fn assert_matches_ip(state: &IpState, replay: &Replay, bytes: u64, packets: u64, what: &str) {
    match replay {
        Replay::Legacy(r) => {
            assert!(!state.esn, "{what}: ip says ESN");
            assert_eq!((r.seq, r.oseq, vec![r.bitmap]), (state.seq, state.oseq, state.bitmap.clone()), "{what}");
        }
        Replay::Esn(r) => {
            assert!(state.esn, "{what}: ip says legacy");
            assert_eq!(
                (r.seq, r.oseq, r.seq_hi, r.oseq_hi, r.bitmap().to_vec()),
                (state.seq, state.oseq, state.seq_hi, state.oseq_hi, state.bitmap.clone()),
                "{what}"
            );
        }
    }
    assert_eq!((bytes, packets), (state.bytes, state.packets), "{what}: lifetime");
}

fn sa_1001() -> SaId {
    SaId::esp(ip("10.9.0.2"), 0x1001)
}

fn sa_2001() -> SaId {
    SaId::esp(ip("10.9.0.2"), 0x2001)
}

/// On the receiving side the kernel advances the replay state, and so sends
/// a traffic-triggered event, before it counts the packet in the lifetime;
/// only the closing timer event (sent later, from the timer) is up to date.
fn packets_counted(index: usize, count: usize, seq: u32) -> u64 {
    let seq = u64::from(seq);
    if index + 1 == count {
        seq
    } else {
        seq - 1
    }
}

fn causes(events: &[(u32, Aevent)]) -> Vec<u32> {
    events.iter().map(|(_, e)| e.flags).collect()
}

fn legacy(e: &Aevent) -> xfrmsync::LegacyReplay {
    match e.replay {
        Replay::Legacy(r) => r,
        Replay::Esn(_) => panic!("expected legacy replay state"),
    }
}

#[test]
fn default_thresholds_give_timer_then_replay_every_two_packets() {
    let events = aevents("events-legacy-default.bin");
    assert_eq!(causes(&events), [flags::CE, flags::CR, flags::CR, flags::CR, flags::CR, flags::CR, flags::CE]);
    let seqs: Vec<u32> = events.iter().map(|(_, e)| legacy(e).seq).collect();
    assert_eq!(seqs, [1, 3, 5, 7, 9, 11, 12], "rseqth 2: an event each 2 packets after the first");
    for (i, (nl_seq, e)) in events.iter().enumerate() {
        assert_eq!(*nl_seq, 0, "traffic events carry nlmsg_seq 0");
        assert_eq!(e.sa, sa_1001());
        assert_eq!((e.saddr, e.reqid), (ip("10.9.0.1"), 1));
        assert_eq!(e.lifetime.packets, packets_counted(i, events.len(), legacy(e).seq));
        assert_eq!(e.lifetime.bytes, 72 * e.lifetime.packets, "64 bytes of payload + 8 of UDP header");
        assert_eq!((e.replay_threshold, e.timer_threshold_ms), (None, None), "events carry no thresholds");
        assert_eq!(legacy(e).oseq, 0, "inbound SA in namespace b");
    }
}

#[test]
fn replay_threshold_five_and_update_event() {
    let events = aevents("events-legacy-rthr5.bin");
    let (update_seq, update) = &events[0];
    assert_eq!(update.cause(), Some(xfrmsync::Cause::Update));
    assert_eq!(*update_seq, 101, "an update event carries the setter's nlmsg_seq");
    assert_eq!(update.timer_threshold_ms, None, "CU events never carry thresholds");
    assert_eq!(causes(&events[1..]), [flags::CE, flags::CR, flags::CR, flags::CR, flags::CE]);
    let seqs: Vec<u32> = events[1..].iter().map(|(_, e)| legacy(e).seq).collect();
    assert_eq!(seqs, [13, 18, 23, 28, 32], "after 12 earlier packets: first, then every 5");
    let last = &events.last().unwrap().1;
    let states = ip_states("ip-xfrm-state-b.txt");
    assert_matches_ip(&states[&0x1001], &last.replay, last.lifetime.bytes, last.lifetime.packets, "0x1001 in b");
}

#[test]
fn esn_events_carry_the_esn_state() {
    let events = aevents("events-esn.bin");
    assert_eq!(events.len(), 6);
    for (i, (_, e)) in events.iter().enumerate() {
        assert_eq!(e.lifetime.packets, packets_counted(i, events.len(), e.replay.seq64() as u32));
        assert_eq!(e.sa, sa_2001());
        assert_eq!(e.reqid, 2);
        match &e.replay {
            Replay::Esn(r) => {
                assert_eq!(r.bitmap().len(), 4);
                assert_eq!(r.replay_window, 128);
                assert_eq!(e.lifetime.bytes, 208 * e.lifetime.packets);
            }
            Replay::Legacy(_) => panic!("ESN SA decoded as legacy"),
        }
    }
    let last = &events.last().unwrap().1;
    let states = ip_states("ip-xfrm-state-b.txt");
    assert_matches_ip(&states[&0x2001], &last.replay, last.lifetime.bytes, last.lifetime.packets, "0x2001 in b");
}

#[test]
fn our_getae_encoding_is_byte_identical_to_the_captured_requests() {
    let requests = datagrams("requests.bin");
    let cases = [
        (101, sa_1001(), GetaeAsk::Counters),
        (102, sa_1001(), GetaeAsk::BothThresholds),
        (103, sa_2001(), GetaeAsk::Counters),
        (104, sa_2001(), GetaeAsk::BothThresholds),
    ];
    let mut out = Vec::new();
    for (i, (seq, sa, ask)) in cases.iter().enumerate() {
        // The captures were made from a socket that sent port id 0.
        wire::encode_getae(&mut out, Sender { seq: *seq, port_id: 0 }, sa, *ask);
        assert_eq!(out, requests[i], "GETAE #{i}");
    }
    wire::encode_getae(
        &mut out,
        Sender { seq: 105, port_id: 0 },
        &SaId::esp(ip("10.9.0.2"), 0xdead),
        GetaeAsk::Counters,
    );
    assert_eq!(out, requests[4], "GETAE for the unknown SPI");
}

#[test]
fn newae_sets_replace_and_ack() {
    let mut out = Vec::new();
    let set = wire::NewAe { replay_threshold: Some(5), etimer_jiffies: Some(250), ..Default::default() };
    wire::encode_newae(&mut out, Sender { seq: 7, port_id: 0x1234_5678 }, &sa_1001(), &set);
    let m = messages(&out)[0];
    assert_eq!(m.kind, wire::XFRM_MSG_NEWAE);
    assert_eq!(m.flags, wire::NLM_F_REQUEST | wire::NLM_F_ACK | wire::NLM_F_REPLACE);
    assert_eq!(m.seq, 7);
    // The kernel copies the sender's port id into the update event as it is.
    assert_eq!(m.port_id, 0x1234_5678);
    // The captured bad request: the same header without NLM_F_REPLACE.
    let captured = datagrams("requests.bin");
    assert_eq!(messages(&captured[5])[0].flags & wire::NLM_F_REPLACE, 0);
    assert_eq!(&out[16..16 + 24], &captured[0][16..16 + 24], "same xfrm_usersa_id as the GETAE");
}

#[test]
fn query_answers_and_errors() {
    let answers = datagrams("query-responses.bin");
    let decoded: Vec<(u32, Aevent)> = answers[..4]
        .iter()
        .map(|d| {
            let m = messages(d)[0];
            (m.seq, wire::decode_aevent(&m).unwrap())
        })
        .collect();
    assert_eq!(decoded.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [101, 102, 103, 104]);
    assert_eq!(decoded[0].1.sa, sa_1001());
    assert!(!decoded[0].1.replay.is_esn());
    assert_eq!((decoded[0].1.replay_threshold, decoded[0].1.timer_threshold_ms), (None, None));
    assert_eq!((decoded[1].1.replay_threshold, decoded[1].1.timer_threshold_ms), (Some(5), Some(1000)));
    assert_eq!(decoded[2].1.sa, sa_2001());
    assert!(decoded[2].1.replay.is_esn());
    assert_eq!((decoded[3].1.replay_threshold, decoded[3].1.timer_threshold_ms), (Some(2), Some(1000)));
    assert_eq!(decoded[0].1.flags, 0, "a query answer has no cause");
    assert_eq!(decoded[1].1.flags, flags::RTHR | flags::ETHR);

    let expect = [
        (105, libc::ESRCH, wire::XFRM_MSG_GETAE),
        (106, libc::EINVAL, wire::XFRM_MSG_NEWAE),
        (107, libc::EINVAL, wire::XFRM_MSG_NEWAE),
    ];
    for (d, (seq, errno, kind)) in answers[4..].iter().zip(expect) {
        let m = messages(d)[0];
        assert_eq!((m.kind, m.seq), (wire::NLMSG_ERROR, seq));
        let ack = wire::decode_ack(&m).unwrap();
        assert_eq!((ack.errno, ack.ext_ack, ack.request_kind, ack.request_seq), (errno, None, kind, seq));
    }
}

#[test]
fn getsa_dump_is_multipart_and_matches_ip_state() {
    let dump = datagrams("getsa-dump.bin");
    let states = ip_states("ip-xfrm-state-b.txt");
    let mut seen = Vec::new();
    let mut done = false;
    for d in &dump {
        for m in messages(d) {
            assert_ne!(m.flags & wire::NLM_F_MULTI, 0, "dump parts are multipart");
            if m.kind == wire::NLMSG_DONE {
                done = true;
                continue;
            }
            let info = wire::decode_sa_message(&m).unwrap();
            let state = &states[&info.sa.spi];
            assert_eq!(info.saddr.unwrap().to_string(), state.src);
            assert_eq!(info.reqid, state.reqid);
            let l = info.lifetime.unwrap();
            assert_matches_ip(state, &info.replay.unwrap(), l.bytes, l.packets, "dump");
            seen.push(info.sa.spi);
        }
    }
    assert!(done, "NLMSG_DONE ends the dump");
    seen.sort();
    assert_eq!(seen, [0x1001, 0x2001, 0x2002], "0x1002 was deleted");
}

#[test]
fn sa_add_and_lifecycle_messages() {
    let mut added = Vec::new();
    for d in datagrams("events-sa-add.bin") {
        for m in messages(&d) {
            assert_eq!(m.kind, wire::XFRM_MSG_NEWSA);
            let info = wire::decode_sa_message(&m).unwrap();
            added.push((info.sa.spi, info.reqid, info.replay.unwrap().is_esn()));
        }
    }
    assert_eq!(added, [(0x1001, 1, false), (0x1002, 1, false), (0x2001, 2, true), (0x2002, 2, true)]);

    let mut life = Vec::new();
    for d in datagrams("events-sa-lifecycle.bin") {
        for m in messages(&d) {
            let info = wire::decode_sa_message(&m).unwrap();
            life.push((m.kind, info.sa.spi, info.hard_expire));
        }
    }
    assert_eq!(
        life,
        [
            (wire::XFRM_MSG_UPDSA, 0x1001, None),
            (wire::XFRM_MSG_NEWSA, 0x3001, None),
            (wire::XFRM_MSG_EXPIRE, 0x3001, Some(false)),
            (wire::XFRM_MSG_EXPIRE, 0x3001, Some(true)),
            (wire::XFRM_MSG_DELSA, 0x1002, None),
        ]
    );
}

#[test]
fn ip_state_of_namespace_a_matches_the_sender_side() {
    // In namespace a the same SAs are outbound: oseq counts what b received.
    let a = ip_states("ip-xfrm-state-a.txt");
    let b = ip_states("ip-xfrm-state-b.txt");
    assert_eq!(a[&0x1001].oseq, b[&0x1001].seq);
    assert_eq!(a[&0x2001].oseq, b[&0x2001].seq);
    assert_eq!(a[&0x1001].bytes, b[&0x1001].bytes);
}
