//! The sync record: what an active node tells a standby about one SA.
//!
//! Versioned, and in network byte order whatever the hosts' order, so two
//! nodes of different architectures agree. Version 1, every field
//! big-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | version (1) |
//! | 1 | 1 | flags: 0x01 the SA's ESN flag, 0x02 ESN-format replay state, 0x04 direction known, 0x08 outbound, 0x10 thresholds present |
//! | 2 | 2 | the record's length in bytes |
//! | 4 | 2 | address family (2 IPv4, 10 IPv6) |
//! | 6 | 1 | protocol (50 ESP, 51 AH, 108 IPComp) |
//! | 7 | 1 | 0 |
//! | 8 | 16 | destination address (IPv4: the first 4 bytes, the rest 0) |
//! | 24 | 16 | source address |
//! | 40 | 4 | SPI (host order value, sent big-endian) |
//! | 44 | 4+4 | mark value, mask |
//! | 52 | 4 | if_id |
//! | 56 | 4 | reqid |
//! | 60 | 4+4 | replay threshold (packets), timer threshold (ms) |
//! | 68 | 4 | 0 |
//! | 72 | 8 | the sender's epoch |
//! | 80 | 8 | the sender's counter for this SA |
//! | 88 | 8 | the sender's time, ms since the Unix epoch |
//! | 96 | 8 | the sender's estimate of the SA's rate, packets per 1,000 s |
//! | 104 | 8+8 | lifetime bytes, packets |
//! | 120 | 12 | legacy replay state: oseq, seq, bitmap |
//! | 120 | 24+4n | or ESN-format: oseq, seq, oseq_hi, seq_hi, replay_window, bmp_len (n), then n bitmap words |
//!
//! Decoding refuses, with [`Error::Malformed`] and nothing built, a record
//! that is cut short, longer than its fields, of another version, with
//! bits or padding the version does not define, with an unknown family or
//! protocol, or with a bitmap over 128 words or smaller than its window.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::aevent::{EsnReplay, LegacyReplay, Replay, MAX_BITMAP_WORDS};
use crate::error::{Error, Result};
use crate::registry::{Direction, Thresholds};
use crate::sa::{Mark, SaId};

pub const RECORD_VERSION: u8 = 1;
/// The fields before the replay state.
const FIXED_LEN: usize = 120;
const LEGACY_LEN: usize = FIXED_LEN + 12;
const ESN_HEAD_LEN: usize = FIXED_LEN + 24;
/// The longest record: an ESN-format state with the kernel's longest bitmap.
pub const MAX_RECORD_LEN: usize = ESN_HEAD_LEN + 4 * MAX_BITMAP_WORDS;

const FLAG_ESN: u8 = 0x01;
const FLAG_ESN_FORMAT: u8 = 0x02;
const FLAG_DIRECTION: u8 = 0x04;
const FLAG_OUTBOUND: u8 = 0x08;
const FLAG_THRESHOLDS: u8 = 0x10;
const KNOWN_FLAGS: u8 = FLAG_ESN | FLAG_ESN_FORMAT | FLAG_DIRECTION | FLAG_OUTBOUND | FLAG_THRESHOLDS;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// One SA's state as the active node saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncRecord {
    pub sa: SaId,
    pub saddr: IpAddr,
    pub reqid: u32,
    pub direction: Option<Direction>,
    /// The SA's `XFRM_STATE_ESN` flag, from `GETSA`/`NEWSA`: only then do
    /// its numbers go past 2^32 (a wide window alone keeps the ESN-format
    /// state, whose high halves stay 0).
    pub esn: bool,
    pub replay: Replay,
    pub lifetime_bytes: u64,
    pub lifetime_packets: u64,
    /// The thresholds in force on the active node.
    pub thresholds: Option<Thresholds>,
    /// The sender's epoch: each commit starts a higher one.
    pub epoch: u64,
    /// The sender's counter for this SA, higher in each later record of an
    /// epoch.
    pub counter: u64,
    /// When the sender read the state, ms since the Unix epoch.
    pub sent_at_ms: u64,
    /// The sender's estimate of the SA's packet rate, packets per 1,000 s.
    pub rate_per_ks: u64,
}

impl SyncRecord {
    /// Whether this record replaces `held`, the one kept for the same SA: a
    /// higher epoch, or the same epoch and a higher counter.
    pub fn supersedes(&self, held: &SyncRecord) -> bool {
        self.order() > held.order()
    }

    /// Where the record stands among the records of its SA: by epoch, then
    /// by the sender's counter.
    pub fn order(&self) -> (u64, u64) {
        (self.epoch, self.counter)
    }

    /// Bytes the record takes encoded.
    pub fn encoded_len(&self) -> usize {
        match &self.replay {
            Replay::Legacy(_) => LEGACY_LEN,
            Replay::Esn(r) => ESN_HEAD_LEN + 4 * r.bitmap().len(),
        }
    }

    /// Appends the record to `out`. Fails for an SA whose addresses are of
    /// two families.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<()> {
        let (family, daddr, saddr) = match (self.sa.daddr, self.saddr) {
            (IpAddr::V4(d), IpAddr::V4(s)) => (AF_INET, v4_field(d), v4_field(s)),
            (IpAddr::V6(d), IpAddr::V6(s)) => (AF_INET6, d.octets(), s.octets()),
            _ => return Err(Error::invalid("a sync record's addresses are of one family")),
        };
        let mut flags = 0;
        if self.esn {
            flags |= FLAG_ESN;
        }
        if self.replay.is_esn() {
            flags |= FLAG_ESN_FORMAT;
        }
        match self.direction {
            Some(Direction::Out) => flags |= FLAG_DIRECTION | FLAG_OUTBOUND,
            Some(Direction::In) => flags |= FLAG_DIRECTION,
            None => {}
        }
        if self.thresholds.is_some() {
            flags |= FLAG_THRESHOLDS;
        }
        let thresholds = self.thresholds.unwrap_or(Thresholds { replay_packets: 0, timer_ms: 0 });
        let start = out.len();
        out.push(RECORD_VERSION);
        out.push(flags);
        out.extend_from_slice(&(self.encoded_len() as u16).to_be_bytes());
        out.extend_from_slice(&family.to_be_bytes());
        out.push(self.sa.proto);
        out.push(0);
        out.extend_from_slice(&daddr);
        out.extend_from_slice(&saddr);
        for word in [
            self.sa.spi,
            self.sa.mark.value,
            self.sa.mark.mask,
            self.sa.if_id,
            self.reqid,
            thresholds.replay_packets,
            thresholds.timer_ms,
            0,
        ] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        for wide in
            [self.epoch, self.counter, self.sent_at_ms, self.rate_per_ks, self.lifetime_bytes, self.lifetime_packets]
        {
            out.extend_from_slice(&wide.to_be_bytes());
        }
        match &self.replay {
            Replay::Legacy(r) => {
                for word in [r.oseq, r.seq, r.bitmap] {
                    out.extend_from_slice(&word.to_be_bytes());
                }
            }
            Replay::Esn(r) => {
                let bitmap = r.bitmap();
                for word in [r.oseq, r.seq, r.oseq_hi, r.seq_hi, r.replay_window, bitmap.len() as u32] {
                    out.extend_from_slice(&word.to_be_bytes());
                }
                for word in bitmap {
                    out.extend_from_slice(&word.to_be_bytes());
                }
            }
        }
        debug_assert_eq!(out.len() - start, self.encoded_len());
        Ok(())
    }

    /// The record that is all of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SyncRecord> {
        let (record, used) = SyncRecord::decode_prefix(bytes)?;
        if used != bytes.len() {
            return Err(Error::Malformed("bytes after a sync record"));
        }
        Ok(record)
    }

    /// The record at the start of `bytes` (a batch holds several), and its
    /// length.
    pub fn decode_prefix(bytes: &[u8]) -> Result<(SyncRecord, usize)> {
        if bytes.len() < 4 {
            return Err(Error::Malformed("sync record cut short"));
        }
        if bytes[0] != RECORD_VERSION {
            return Err(Error::Malformed("sync record of an unknown version"));
        }
        let flags = bytes[1];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::Malformed("sync record with flags its version does not define"));
        }
        let len = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if len > MAX_RECORD_LEN {
            return Err(Error::Malformed("sync record longer than any can be"));
        }
        if len > bytes.len() {
            return Err(Error::Malformed("sync record cut short"));
        }
        let r = Reader { bytes: &bytes[..len] };
        let expected = if flags & FLAG_ESN_FORMAT == 0 { LEGACY_LEN } else { ESN_HEAD_LEN };
        if len < expected {
            return Err(Error::Malformed("sync record shorter than its fields"));
        }
        if r.u8(7) != 0 || r.u32(68) != 0 {
            return Err(Error::Malformed("sync record with padding that is not 0"));
        }
        let proto = r.u8(6);
        if ![libc::IPPROTO_ESP as u8, libc::IPPROTO_AH as u8, libc::IPPROTO_COMP as u8].contains(&proto) {
            return Err(Error::Malformed("sync record of an unknown protocol"));
        }
        let (daddr, saddr) = match r.u16(4) {
            AF_INET => (r.v4(8)?, r.v4(24)?),
            AF_INET6 => (IpAddr::V6(Ipv6Addr::from(r.octets16(8))), IpAddr::V6(Ipv6Addr::from(r.octets16(24)))),
            _ => return Err(Error::Malformed("sync record of an unknown address family")),
        };
        let replay = if flags & FLAG_ESN_FORMAT == 0 {
            if len != LEGACY_LEN {
                return Err(Error::Malformed("sync record longer than its fields"));
            }
            Replay::Legacy(LegacyReplay { oseq: r.u32(120), seq: r.u32(124), bitmap: r.u32(128) })
        } else {
            let words = r.u32(140) as usize;
            if words > MAX_BITMAP_WORDS {
                return Err(Error::Malformed("sync record with a bitmap over 128 words"));
            }
            if len != ESN_HEAD_LEN + 4 * words {
                return Err(Error::Malformed("sync record whose length is not its bitmap's"));
            }
            let bitmap: Vec<u32> = (0..words).map(|i| r.u32(ESN_HEAD_LEN + 4 * i)).collect();
            let esn = EsnReplay::new(r.u32(120), r.u32(124), r.u32(128), r.u32(132), r.u32(136), &bitmap)
                .map_err(|_| Error::Malformed("sync record with a window larger than its bitmap"))?;
            Replay::Esn(esn)
        };
        let direction = match (flags & FLAG_DIRECTION != 0, flags & FLAG_OUTBOUND != 0) {
            (true, true) => Some(Direction::Out),
            (true, false) => Some(Direction::In),
            (false, false) => None,
            (false, true) => return Err(Error::Malformed("sync record outbound without a direction")),
        };
        let thresholds =
            (flags & FLAG_THRESHOLDS != 0).then(|| Thresholds { replay_packets: r.u32(60), timer_ms: r.u32(64) });
        if thresholds.is_none() && (r.u32(60) != 0 || r.u32(64) != 0) {
            return Err(Error::Malformed("sync record with thresholds it does not say it has"));
        }
        let sa =
            SaId { daddr, spi: r.u32(40), proto, mark: Mark { value: r.u32(44), mask: r.u32(48) }, if_id: r.u32(52) };
        let record = SyncRecord {
            sa,
            saddr,
            reqid: r.u32(56),
            direction,
            esn: flags & FLAG_ESN != 0,
            replay,
            lifetime_bytes: r.u64(104),
            lifetime_packets: r.u64(112),
            thresholds,
            epoch: r.u64(72),
            counter: r.u64(80),
            sent_at_ms: r.u64(88),
            rate_per_ks: r.u64(96),
        };
        Ok((record, len))
    }
}

/// An SA that is gone on the active node (deleted, or hard-expired): the
/// standby forgets its record. Version 1, 48 bytes, big-endian:
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 1 | version (1) |
/// | 1 | 1 | 0 |
/// | 2 | 2 | length (48) |
/// | 4 | 2 | address family (2 IPv4, 10 IPv6) |
/// | 6 | 1 | protocol |
/// | 7 | 1 | 0 |
/// | 8 | 16 | destination address (IPv4: the first 4 bytes) |
/// | 24 | 4 | SPI |
/// | 28 | 4+4 | mark value, mask |
/// | 36 | 4 | if_id |
/// | 40 | 8 | the sender's epoch |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Departure {
    pub sa: SaId,
    pub epoch: u64,
}

pub const DEPARTURE_LEN: usize = 48;

impl Departure {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (family, daddr) = match self.sa.daddr {
            IpAddr::V4(d) => (AF_INET, v4_field(d)),
            IpAddr::V6(d) => (AF_INET6, d.octets()),
        };
        out.extend_from_slice(&[RECORD_VERSION, 0]);
        out.extend_from_slice(&(DEPARTURE_LEN as u16).to_be_bytes());
        out.extend_from_slice(&family.to_be_bytes());
        out.extend_from_slice(&[self.sa.proto, 0]);
        out.extend_from_slice(&daddr);
        for word in [self.sa.spi, self.sa.mark.value, self.sa.mark.mask, self.sa.if_id] {
            out.extend_from_slice(&word.to_be_bytes());
        }
        out.extend_from_slice(&self.epoch.to_be_bytes());
    }

    /// Decodes the departure at the start of `bytes`; returns it and its
    /// length. Refused as a record is: nothing is built from a departure
    /// that is not exactly what version 1 defines.
    pub fn decode_prefix(bytes: &[u8]) -> Result<(Departure, usize)> {
        if bytes.len() < DEPARTURE_LEN {
            return Err(Error::Malformed("departure cut short"));
        }
        let r = Reader { bytes: &bytes[..DEPARTURE_LEN] };
        if r.u8(0) != RECORD_VERSION || r.u8(1) != 0 || usize::from(r.u16(2)) != DEPARTURE_LEN || r.u8(7) != 0 {
            return Err(Error::Malformed("departure of an unknown version or form"));
        }
        let proto = r.u8(6);
        if ![libc::IPPROTO_ESP as u8, libc::IPPROTO_AH as u8, libc::IPPROTO_COMP as u8].contains(&proto) {
            return Err(Error::Malformed("departure of an unknown protocol"));
        }
        let daddr = match r.u16(4) {
            AF_INET => r.v4(8)?,
            AF_INET6 => IpAddr::V6(Ipv6Addr::from(r.octets16(8))),
            _ => return Err(Error::Malformed("departure of an unknown address family")),
        };
        let sa =
            SaId { daddr, spi: r.u32(24), proto, mark: Mark { value: r.u32(28), mask: r.u32(32) }, if_id: r.u32(36) };
        Ok((Departure { sa, epoch: r.u64(40) }, DEPARTURE_LEN))
    }
}

fn v4_field(addr: Ipv4Addr) -> [u8; 16] {
    let mut field = [0; 16];
    field[..4].copy_from_slice(&addr.octets());
    field
}

/// Big-endian fields of a record whose length was checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn u8(&self, at: usize) -> u8 {
        self.bytes[at]
    }

    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    fn octets16(&self, at: usize) -> [u8; 16] {
        self.bytes[at..at + 16].try_into().expect("16 bytes")
    }

    fn v4(&self, at: usize) -> Result<IpAddr> {
        let field = self.octets16(at);
        if field[4..].iter().any(|&b| b != 0) {
            return Err(Error::Malformed("sync record with an IPv4 address longer than 4 bytes"));
        }
        Ok(IpAddr::V4(Ipv4Addr::new(field[0], field[1], field[2], field[3])))
    }
}
