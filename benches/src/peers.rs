//! The peers: libnl's xfrmnl_ae_parse (c/libnl_shim.c) and
//! netlink-packet-xfrm 0.5, and which fields each decodes as the kernel
//! sent them.

use netlink_packet_core::Parseable;
use netlink_packet_xfrm::{NewAsyncEventMessage, XfrmAttrs};
use xfrmsync::wire::Messages;
use xfrmsync::{Aevent, Replay};

#[repr(C)]
pub struct ShimAe {
    daddr: [u8; 16],
    saddr: [u8; 16],
    daddr_len: u32,
    saddr_len: u32,
    spi: i32,
    family: i32,
    proto: i32,
    reqid: i32,
    flags: i32,
    esn: i32,
    oseq: u32,
    seq: u32,
    oseq_hi: u32,
    seq_hi: u32,
    window: u32,
    bmp_len: u32,
    bmp: [u32; 128],
    has_lifetime: i32,
    bytes: u64,
    packets: u64,
    add_time: u64,
    use_time: u64,
    has_mark: i32,
    mark_v: u32,
    mark_m: u32,
    replay_maxdiff: i32,
    replay_maxage: i32,
}

extern "C" {
    fn shim_parse_full(msg: *mut libc::c_void, out: *mut ShimAe) -> libc::c_int;
    fn shim_parse_read(msg: *mut libc::c_void) -> u64;
}

/// libnl: parse, read the fields, release. libnl takes a mutable header.
pub fn libnl_parse_read(msg: &[u8]) -> u64 {
    // SAFETY: `msg` is a whole netlink message (nlmsg_len within it);
    // libnl only reads it.
    unsafe { shim_parse_read(msg.as_ptr() as *mut libc::c_void) }
}

/// netlink-packet-xfrm: the header through netlink-packet-core's buffer,
/// then NewAsyncEventMessage and its attributes.
pub fn npx_parse_read(msg: &[u8]) -> u64 {
    let Ok(buf) = netlink_packet_core::NetlinkBuffer::new_checked(msg) else { return 0 };
    let Ok(ae) = NewAsyncEventMessage::parse(buf.payload()) else { return 0 };
    let mut sum = u64::from(ae.id.sa_id.spi) + u64::from(ae.id.reqid) + u64::from(ae.id.flags);
    for nla in &ae.nlas {
        match nla {
            XfrmAttrs::ReplayState(r) => sum += u64::from(r.seq) + u64::from(r.oseq),
            XfrmAttrs::ReplayStateEsn(r) => {
                sum += ((u64::from(r.seq_hi) << 32) | u64::from(r.seq))
                    + ((u64::from(r.oseq_hi) << 32) | u64::from(r.oseq))
            }
            XfrmAttrs::LifetimeBytes(l) => sum += l.bytes + l.packets,
            _ => {}
        }
    }
    sum
}

/// A replay state as a peer decoded it: ESN format or not, then oseq, seq,
/// oseq_hi, seq_hi, window and the bitmap words.
type ReplayFields = (bool, u32, u32, u32, u32, u32, Vec<u32>);

/// What one decoder says about an event, in xfrmsync's terms, `None` for
/// what it leaves out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Fields {
    daddr: Option<Vec<u8>>,
    saddr: Option<Vec<u8>>,
    spi: Option<u32>,
    family: Option<u16>,
    proto: Option<u8>,
    reqid: Option<u32>,
    flags: Option<u32>,
    replay: Option<ReplayFields>,
    lifetime: Option<(u64, u64, u64, u64)>,
    mark: Option<(u32, u32)>,
    if_id: Option<u32>,
    replay_threshold: Option<u32>,
    timer_threshold_100ms: Option<u32>,
    nlmsg_seq: Option<u32>,
    nlmsg_pid: Option<u32>,
}

const FIELD_NAMES: [&str; 15] = [
    "daddr",
    "saddr",
    "spi",
    "family",
    "proto",
    "reqid",
    "flags",
    "replay state",
    "lifetime counters",
    "mark",
    "if_id",
    "replay threshold",
    "timer threshold",
    "nlmsg_seq",
    "nlmsg_pid",
];

impl Fields {
    fn list(&self) -> [String; 15] {
        [
            format!("{:?}", self.daddr),
            format!("{:?}", self.saddr),
            format!("{:?}", self.spi),
            format!("{:?}", self.family),
            format!("{:?}", self.proto),
            format!("{:?}", self.reqid),
            format!("{:?}", self.flags),
            format!("{:?}", self.replay),
            format!("{:?}", self.lifetime),
            format!("{:?}", self.mark),
            format!("{:?}", self.if_id),
            format!("{:?}", self.replay_threshold),
            format!("{:?}", self.timer_threshold_100ms),
            format!("{:?}", self.nlmsg_seq),
            format!("{:?}", self.nlmsg_pid),
        ]
    }
}

fn addr_bytes(a: &std::net::IpAddr) -> Vec<u8> {
    match a {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn ours(ev: &Aevent) -> Fields {
    let replay = match &ev.replay {
        Replay::Legacy(r) => (false, r.oseq, r.seq, 0, 0, 0, vec![r.bitmap]),
        Replay::Esn(r) => (true, r.oseq, r.seq, r.oseq_hi, r.seq_hi, r.replay_window, r.bitmap().to_vec()),
    };
    Fields {
        daddr: Some(addr_bytes(&ev.sa.daddr)),
        saddr: Some(addr_bytes(&ev.saddr)),
        spi: Some(ev.sa.spi),
        family: Some(ev.sa.family()),
        proto: Some(ev.sa.proto),
        reqid: Some(ev.reqid),
        flags: Some(ev.flags),
        replay: Some(replay),
        lifetime: Some((ev.lifetime.bytes, ev.lifetime.packets, ev.lifetime.add_time, ev.lifetime.use_time)),
        // The kernel sends XFRMA_MARK only for a marked SA; unmarked is {0,0}.
        mark: Some((ev.sa.mark.value, ev.sa.mark.mask)),
        if_id: Some(ev.sa.if_id),
        replay_threshold: ev.replay_threshold,
        timer_threshold_100ms: ev.timer_threshold_ms.map(|ms| ms / 100),
        nlmsg_seq: Some(ev.nlmsg_seq),
        nlmsg_pid: Some(ev.nlmsg_pid),
    }
}

fn libnl(msg: &[u8]) -> Option<Fields> {
    let mut out = std::mem::MaybeUninit::<ShimAe>::zeroed();
    let mut copy = msg.to_vec();
    // SAFETY: a whole message, and an out struct of the shim's layout.
    let rc = unsafe { shim_parse_full(copy.as_mut_ptr().cast(), out.as_mut_ptr()) };
    if rc < 0 {
        return None;
    }
    // SAFETY: the shim wrote it.
    let a = unsafe { out.assume_init() };
    let replay = match a.esn {
        0 => Some((false, a.oseq, a.seq, 0, 0, 0, vec![a.bmp[0]])),
        1 => {
            Some((true, a.oseq, a.seq, a.oseq_hi, a.seq_hi, a.window, a.bmp[..(a.bmp_len as usize).min(128)].to_vec()))
        }
        _ => None,
    };
    Some(Fields {
        daddr: Some(a.daddr[..a.daddr_len.min(16) as usize].to_vec()),
        saddr: Some(a.saddr[..a.saddr_len.min(16) as usize].to_vec()),
        spi: Some(a.spi as u32),
        family: Some(a.family as u16),
        proto: Some(a.proto as u8),
        reqid: Some(a.reqid as u32),
        flags: Some(a.flags as u32),
        replay,
        lifetime: (a.has_lifetime != 0).then_some((a.bytes, a.packets, a.add_time, a.use_time)),
        mark: Some(if a.has_mark != 0 { (a.mark_v, a.mark_m) } else { (0, 0) }),
        if_id: None,
        replay_threshold: (a.replay_maxdiff >= 0).then_some(a.replay_maxdiff as u32),
        timer_threshold_100ms: (a.replay_maxage >= 0).then_some(a.replay_maxage as u32),
        nlmsg_seq: None,
        nlmsg_pid: None,
    })
}

fn npx(msg: &[u8]) -> Option<Fields> {
    let buf = netlink_packet_core::NetlinkBuffer::new_checked(msg).ok()?;
    let ae = NewAsyncEventMessage::parse(buf.payload()).ok()?;
    let family = ae.id.sa_id.family;
    let len = if i32::from(family) == libc::AF_INET { 4 } else { 16 };
    let mut f = Fields {
        daddr: Some(ae.id.sa_id.daddr.addr[..len].to_vec()),
        saddr: Some(ae.id.saddr.addr[..len].to_vec()),
        spi: Some(ae.id.sa_id.spi), // netlink-packet-xfrm converts it to host order
        family: Some(family),
        proto: Some(ae.id.sa_id.proto),
        reqid: Some(ae.id.reqid),
        flags: Some(ae.id.flags),
        mark: Some((0, 0)),
        if_id: Some(0),
        nlmsg_seq: Some(buf.sequence_number()),
        nlmsg_pid: Some(buf.port_number()),
        ..Fields::default()
    };
    for nla in &ae.nlas {
        match nla {
            XfrmAttrs::ReplayState(r) => f.replay = Some((false, r.oseq, r.seq, 0, 0, 0, vec![r.bitmap])),
            XfrmAttrs::ReplayStateEsn(r) => {
                f.replay = Some((true, r.oseq, r.seq, r.oseq_hi, r.seq_hi, r.replay_window, r.bmp.clone()))
            }
            XfrmAttrs::LifetimeBytes(l) => f.lifetime = Some((l.bytes, l.packets, l.add_time, l.use_time)),
            XfrmAttrs::Mark(m) => f.mark = Some((m.value, m.mask)),
            XfrmAttrs::IfId(i) => f.if_id = Some(*i),
            XfrmAttrs::ReplayThreshold(t) => f.replay_threshold = Some(*t),
            XfrmAttrs::EventTimeThreshold(t) => f.timer_threshold_100ms = Some(*t),
            _ => {}
        }
    }
    Some(f)
}

/// Every NEWAE of the corpus (events and query answers), the legacy ones
/// again as IPv6, and a marked one with an if_id: each peer's fields
/// against xfrmsync's.
pub fn compare_fields() {
    println!("\n## 3. Fields: what each peer decodes, against xfrmsync, on every captured NEWAE\n");
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    for name in ["events-legacy-default.bin", "events-legacy-rthr5.bin", "events-esn.bin", "query-responses.bin"] {
        for d in crate::corpus::datagrams(name) {
            if u16::from_ne_bytes([d[4], d[5]]) == 0x1e {
                msgs.push(d);
            }
        }
    }
    let captured = msgs.len();
    // The same events of an IPv6 SA (family and addresses rewritten).
    let v6 = crate::corpus::templates(crate::corpus::Kind::Ipv6);
    let v6_count = v6.len();
    msgs.extend(v6);
    // A marked SA bound to an XFRM interface: XFRMA_MARK and XFRMA_IF_ID
    // appended, as the kernel sends them for such an SA.
    let mut marked = msgs[0].clone();
    for (kind, payload) in
        [(21u16, [7u32.to_ne_bytes(), 0xffu32.to_ne_bytes()].concat()), (31, 9u32.to_ne_bytes().to_vec())]
    {
        marked.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        marked.extend_from_slice(&kind.to_ne_bytes());
        marked.extend_from_slice(&payload);
    }
    let len = marked.len() as u32;
    marked[..4].copy_from_slice(&len.to_ne_bytes());
    msgs.push(marked);
    println!(
        "{} messages: {captured} captured (traffic, update and query answers, legacy and ESN), {v6_count} legacy ones rewritten to IPv6, 1 marked with an if_id\n",
        msgs.len()
    );
    let mut wrong = [[0usize; 15]; 2];
    let mut missing = [[0usize; 15]; 2];
    let mut failed = [0usize; 2];
    for msg in &msgs {
        let m = Messages::new(msg).next().unwrap().unwrap();
        let truth = ours(&xfrmsync::wire::decode_aevent(&m).expect("xfrmsync decodes every captured event")).list();
        for (p, got) in [libnl(msg), npx(msg)].into_iter().enumerate() {
            let Some(got) = got else {
                failed[p] += 1;
                continue;
            };
            for (i, v) in got.list().iter().enumerate() {
                if v == "None" && truth[i] != "None" {
                    missing[p][i] += 1;
                } else if *v != truth[i] {
                    wrong[p][i] += 1;
                }
            }
        }
    }
    println!("| field | libnl xfrmnl_ae_parse | netlink-packet-xfrm 0.5 |");
    println!("|---|---|---|");
    for (i, name) in FIELD_NAMES.iter().enumerate() {
        let cell = |p: usize| {
            if wrong[p][i] == 0 && missing[p][i] == 0 {
                "right".to_string()
            } else if wrong[p][i] == 0 {
                format!("left out ({} of {})", missing[p][i], msgs.len())
            } else {
                format!("WRONG in {} of {}", wrong[p][i], msgs.len())
            }
        };
        println!("| {name} | {} | {} |", cell(0), cell(1));
    }
    println!("| messages refused | {} | {} |", failed[0], failed[1]);
}
