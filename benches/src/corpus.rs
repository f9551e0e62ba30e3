//! The captured events, re-addressed to many SAs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xfrmsync::SaId;

fn corpus_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/linux-6.1")
}

/// The datagrams of a corpus file (4-byte little-endian length, bytes).
pub fn datagrams(name: &str) -> Vec<Vec<u8>> {
    let data = std::fs::read(corpus_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        out.push(data[at + 4..at + 4 + len].to_vec());
        at += 4 + len;
    }
    out
}

const NEWAE: u16 = 0x1e;

/// The NEWAE messages of a file (each event is a datagram of its own).
fn events(name: &str) -> Vec<Vec<u8>> {
    datagrams(name).into_iter().filter(|d| u16::from_ne_bytes([d[4], d[5]]) == NEWAE).collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Legacy,
    Esn,
    Ipv6,
    Mixed,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Legacy, Kind::Esn, Kind::Ipv6, Kind::Mixed];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Legacy => "legacy",
            Kind::Esn => "ESN",
            Kind::Ipv6 => "IPv6",
            Kind::Mixed => "mixed",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name().eq_ignore_ascii_case(s))
    }
}

/// Event templates of a kind: the captured traffic and query events.
pub fn templates(kind: Kind) -> Vec<Vec<u8>> {
    let legacy = || {
        let mut t = events("events-legacy-default.bin");
        t.extend(events("events-legacy-rthr5.bin"));
        t
    };
    match kind {
        Kind::Legacy => legacy(),
        Kind::Esn => events("events-esn.bin"),
        Kind::Ipv6 => legacy().into_iter().map(|m| to_ipv6(&m)).collect(),
        Kind::Mixed => {
            let mut all = legacy();
            all.extend(events("events-esn.bin"));
            all.extend(legacy().into_iter().map(|m| to_ipv6(&m)));
            all
        }
    }
}

/// Offsets in a NEWAE message: header(16), then xfrm_aevent_id.
const DADDR: usize = 16;
const SPI: usize = 32;
const FAMILY: usize = 36;
const SADDR: usize = 40;

fn to_ipv6(msg: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[FAMILY..FAMILY + 2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
    m[SADDR..SADDR + 16].copy_from_slice(&"fd00:9::1".parse::<Ipv6Addr>().unwrap().octets());
    m
}

/// SA number `i`'s destination in a message of `family`.
fn daddr(i: usize, v6: bool) -> IpAddr {
    if v6 {
        let mut o = "fd00:9::".parse::<Ipv6Addr>().unwrap().octets();
        o[12..16].copy_from_slice(&(i as u32).to_be_bytes());
        IpAddr::V6(o.into())
    } else {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i as u32 & 0x00ff_ffff)))
    }
}

/// One event per SA for `n` SAs, templates taken in turn, each message at
/// a 4-byte aligned offset of one buffer.
pub struct Stream {
    buf: Vec<u8>,
    at: Vec<(usize, usize)>,
    sas: Vec<SaId>,
}

impl Stream {
    pub fn build(kind: Kind, n: usize) -> Stream {
        let templates = templates(kind);
        let mut buf = Vec::with_capacity(n * 200);
        let mut at = Vec::with_capacity(n);
        let mut sas = Vec::with_capacity(n);
        for i in 0..n {
            let t = &templates[i % templates.len()];
            let start = buf.len();
            buf.extend_from_slice(t);
            let m = &mut buf[start..];
            let v6 = u16::from_ne_bytes([m[FAMILY], m[FAMILY + 1]]) == libc::AF_INET6 as u16;
            let spi = 0x1000_0000 + i as u32;
            m[SPI..SPI + 4].copy_from_slice(&spi.to_be_bytes());
            let d = daddr(i, v6);
            match d {
                IpAddr::V4(a) => m[DADDR..DADDR + 4].copy_from_slice(&a.octets()),
                IpAddr::V6(a) => m[DADDR..DADDR + 16].copy_from_slice(&a.octets()),
            }
            sas.push(SaId::esp(d, spi));
            at.push((start, t.len()));
            buf.resize((buf.len() + 3) & !3, 0);
        }
        Stream { buf, at, sas }
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        self.at.iter().map(|&(s, l)| &self.buf[s..s + l])
    }

    /// The identity of SA `i` (the one event `i` is about).
    pub fn sa(&self, i: usize) -> SaId {
        self.sas[i]
    }
}
