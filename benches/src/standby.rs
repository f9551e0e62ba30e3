//! Memory a standby holds per SA (issue 13): a `Standby` given one record
//! for each of N distinct SAs, as it holds them between takeovers. Heap
//! bytes live afterwards, less before (the counting allocator), divided by
//! N; and the peak while it took them.

use std::net::Ipv4Addr;

use xfrmsync::registry::Direction;
use xfrmsync::sync::{Standby, SyncRecord};
use xfrmsync::{EsnReplay, LegacyReplay, Replay, SaId, Thresholds};

use crate::alloc;

/// The replay state the records carry.
#[derive(Clone, Copy)]
pub enum Form {
    Legacy,
    /// ESN-format, a bitmap of this many words (window 32 × words).
    Esn(usize),
}

impl Form {
    fn name(self) -> String {
        match self {
            Form::Legacy => "legacy".into(),
            Form::Esn(words) => format!("ESN, {words}-word bitmap (window {})", 32 * words),
        }
    }
}

/// The record of SA `i`: a destination of its own, half outbound, half
/// inbound, as an active node sends them.
pub fn record(form: Form, i: usize) -> SyncRecord {
    let bitmap = [0x5555_aaaa_u32; 128];
    let replay = match form {
        Form::Legacy => Replay::Legacy(LegacyReplay { oseq: i as u32, seq: 0, bitmap: 0 }),
        Form::Esn(words) => {
            Replay::Esn(EsnReplay::new(i as u32, 7, 0, 1, 32 * words as u32, &bitmap[..words]).expect("a valid state"))
        }
    };
    SyncRecord {
        sa: SaId::esp(Ipv4Addr::from(0x0a64_0000 + i as u32).into(), 0x0100_0000 + i as u32),
        saddr: Ipv4Addr::new(10, 97, 0, 1).into(),
        reqid: 1000 + (i % 4) as u32,
        direction: Some(if i.is_multiple_of(2) { Direction::Out } else { Direction::In }),
        esn: matches!(form, Form::Esn(_)),
        replay,
        lifetime_bytes: 1 << 30,
        lifetime_packets: 1 << 20,
        thresholds: Some(Thresholds { replay_packets: 256, timer_ms: 1000 }),
        epoch: 1,
        counter: 1 + i as u64,
        sent_at_ms: 1_796_000_000_000,
        rate_per_ks: 5_000_000,
    }
}

pub struct Held {
    /// Heap bytes live after the standby took the records, less before.
    pub live: usize,
    /// Highest heap use while it took them, less before.
    pub peak: usize,
}

/// A standby given one record of `form` for each of `n` SAs.
pub fn held(form: Form, n: usize) -> Held {
    let live0 = alloc::live();
    alloc::reset_peak();
    let mut standby = Standby::new(0);
    for i in 0..n {
        // `receive` answers what became of the record; the count below
        // checks that every one was held.
        let _ = standby.receive(record(form, i));
    }
    assert_eq!(standby.len(), n, "every record held");
    let held = Held { live: (alloc::live() - live0).max(0) as usize, peak: (alloc::peak() - live0).max(0) as usize };
    drop(standby);
    held
}

pub fn memory(sizes: &[usize]) {
    println!("\n## 8b. HA sync: memory a standby holds per SA (allocator totals)\n");
    println!("| SAs | records | encoded record | live heap | bytes per SA | peak while taking them, per SA |");
    println!("|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for &n in sizes {
        for form in [Form::Legacy, Form::Esn(4), Form::Esn(128)] {
            let h = held(form, n);
            println!(
                "| {n} | {} | {} B | {:.1} MB | {:.1} | {:.1} |",
                form.name(),
                record(form, 0).encoded_len(),
                h.live as f64 / 1e6,
                h.live as f64 / n as f64,
                h.peak as f64 / n as f64
            );
            summary.push(format!("RATIO standby {n} SAs, {}: {:.1} bytes/SA", form.name(), h.live as f64 / n as f64));
        }
    }
    println!();
    summary.iter().for_each(|line| println!("{line}"));
}
