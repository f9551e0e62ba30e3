//! How SAs and events are printed: human lines that fit a terminal, and
//! JSON lines with everything in them.
//!
//! The replay structure's format is not the SA's sequence number width: the
//! kernel reports an SA with a window above 32 in the ESN-format structure
//! whether or not it has the ESN flag, and only an SA with the flag counts
//! past 2^32. So the form is named from both, when the flag is known.

use std::fmt::Write as _;
use std::io::Write as _;

use xfrmsync::{Aevent, Replay};

/// Bitmap words shown on a human line: 4 words are the whole bitmap of the
/// usual 128-packet window, and a 4096-bit one (128 words) would not fit a
/// terminal line. JSON carries every word.
pub const BITMAP_WORDS_SHOWN: usize = 4;

/// How an SA keeps its replay state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// `struct xfrm_replay_state`: a window of at most 32, 32-bit numbers.
    Legacy,
    /// ESN flag set: 64-bit sequence numbers.
    Esn,
    /// ESN-format structure for a window above 32, but no ESN flag: the
    /// sequence numbers wrap at 2^32.
    WideWindow,
    /// ESN-format structure, flag not known (an SA not seen in a dump).
    EsnFormat,
}

impl Form {
    pub fn of(replay: &Replay, esn_flag: Option<bool>) -> Form {
        match (replay, esn_flag) {
            (Replay::Legacy(_), _) => Form::Legacy,
            (Replay::Esn(_), Some(true)) => Form::Esn,
            (Replay::Esn(_), Some(false)) => Form::WideWindow,
            (Replay::Esn(_), None) => Form::EsnFormat,
        }
    }

    /// The short word for lines and JSON.
    pub fn word(self) -> &'static str {
        match self {
            Form::Legacy => "legacy",
            Form::Esn => "esn",
            Form::WideWindow => "wide-window",
            Form::EsnFormat => "esn-format",
        }
    }

    /// Width of the sequence numbers, when known.
    pub fn seq_bits(self) -> Option<u32> {
        match self {
            Form::Legacy | Form::WideWindow => Some(32),
            Form::Esn => Some(64),
            Form::EsnFormat => None,
        }
    }

    fn explained(self) -> &'static str {
        match self {
            Form::Legacy => "legacy structure, 32-bit sequence numbers",
            Form::Esn => "ESN (extended sequence numbers, 64 bits)",
            Form::WideWindow => {
                "ESN-format structure for a window above 32, but no ESN flag: sequence numbers wrap at 2^32"
            }
            Form::EsnFormat => "ESN-format structure (whether the SA has the ESN flag is unknown)",
        }
    }
}

/// The bitmap words as hex, the first [`BITMAP_WORDS_SHOWN`] of them, with
/// how many there are and how many bits are set when some are left out.
pub fn bitmap(words: &[u32]) -> String {
    let mut out = String::new();
    for (i, word) in words.iter().take(BITMAP_WORDS_SHOWN).enumerate() {
        let sep = if i == 0 { "" } else { " " };
        let _ = write!(out, "{sep}{word:08x}");
    }
    if words.len() > BITMAP_WORDS_SHOWN {
        let set: u32 = words.iter().map(|w| w.count_ones()).sum();
        let _ = write!(out, " ... ({} words, {set} bits set)", words.len());
    }
    out
}

fn replay_words(replay: &Replay, form: Form) -> String {
    match replay {
        Replay::Legacy(r) => format!("oseq 0x{:x} seq 0x{:x} bitmap 0x{:08x}", r.oseq, r.seq, r.bitmap),
        Replay::Esn(r) => {
            let (oseq, seq) = match form {
                // Without the flag the high halves are not part of the number.
                Form::WideWindow => (u64::from(r.oseq), u64::from(r.seq)),
                _ => (r.oseq64(), r.seq64()),
            };
            format!("oseq 0x{oseq:x} seq 0x{seq:x} window {} bitmap {}", r.replay_window, bitmap(r.bitmap()))
        }
    }
}

/// One event (or query answer) on one line.
pub fn event_line(ev: &Aevent, esn_flag: Option<bool>) -> String {
    let form = Form::of(&ev.replay, esn_flag);
    let cause = ev.cause().map_or("query", |c| c.name());
    let mut line = format!(
        "{cause} {} src {} reqid {} {} {} bytes {} packets {}",
        ev.sa,
        ev.saddr,
        ev.reqid,
        form.word(),
        replay_words(&ev.replay, form),
        ev.lifetime.bytes,
        ev.lifetime.packets
    );
    if let Some(t) = ev.replay_threshold {
        let _ = write!(line, " replay-threshold {t}");
    }
    if let Some(t) = ev.timer_threshold_ms {
        let _ = write!(line, " timer-threshold {t}ms");
    }
    if ev.cause() == Some(xfrmsync::Cause::Update) {
        let _ = write!(line, " by port {} seq {}", ev.nlmsg_pid, ev.nlmsg_seq);
    }
    line
}

/// One SA's counters and thresholds, a few lines, for `get`.
pub fn sa_block(ev: &Aevent, esn_flag: Option<bool>) -> String {
    let form = Form::of(&ev.replay, esn_flag);
    let mut out = format!("{} src {} reqid {}\n", ev.sa, ev.saddr, ev.reqid);
    let _ = writeln!(out, "  replay      {}", form.explained());
    let _ = writeln!(out, "              {}", replay_words(&ev.replay, form));
    let l = &ev.lifetime;
    let _ = writeln!(
        out,
        "  lifetime    {} packets, {} bytes, added {}, last used {}",
        l.packets, l.bytes, l.add_time, l.use_time
    );
    let threshold = |t: Option<u32>, unit: &str| t.map_or("?".to_string(), |t| format!("{t} {unit}"));
    let _ = writeln!(
        out,
        "  thresholds  replay {}, timer {} (the kernel reports the timer in 100 ms steps, rounded down)",
        threshold(ev.replay_threshold, "packets"),
        threshold(ev.timer_threshold_ms, "ms")
    );
    out
}

/// The library's JSON object, plus the SA in words and its replay form:
/// `"sa"`, `"esn_flag"` (null when unknown), `"replay_form"` (see [`Form`])
/// and `"seq_bits"` (32, 64, or null).
pub fn json(ev: &Aevent, esn_flag: Option<bool>) -> String {
    let form = Form::of(&ev.replay, esn_flag);
    let mut value: serde_json::Value = match serde_json::from_str(&ev.json().to_string()) {
        Ok(v) => v,
        // The library's JSON is produced by fixed code; should it ever not
        // parse, print it as it is rather than lose the event.
        Err(_) => return ev.json().to_string(),
    };
    if let Some(object) = value.as_object_mut() {
        object.insert("sa".into(), ev.sa.to_string().into());
        object.insert("esn_flag".into(), esn_flag.into());
        object.insert("replay_form".into(), form.word().into());
        object.insert("seq_bits".into(), form.seq_bits().into());
    }
    value.to_string()
}

/// Writes a line to stdout. A reader that went away (`| head`) ends the
/// program quietly, as it does for other Unix tools.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("xfrmsync: writing to stdout: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xfrmsync::{EsnReplay, LegacyReplay, Lifetime, SaId};

    fn event(replay: Replay) -> Aevent {
        Aevent {
            sa: SaId::esp("10.9.0.2".parse().unwrap(), 0x2001),
            saddr: "10.9.0.1".parse().unwrap(),
            reqid: 2,
            flags: xfrmsync::aevent::flags::CE,
            replay,
            lifetime: Lifetime { bytes: 864, packets: 12, add_time: 1, use_time: 2 },
            replay_threshold: None,
            timer_threshold_ms: None,
            nlmsg_seq: 0,
            nlmsg_pid: 0,
        }
    }

    fn esn(words: usize) -> Replay {
        let mut bitmap = vec![0u32; words];
        bitmap[0] = 0xfff;
        Replay::Esn(EsnReplay::new(0, 12, 0, 1, (words * 32) as u32, &bitmap).unwrap())
    }

    #[test]
    fn a_4096_bit_bitmap_does_not_flood_the_line() {
        let ev = event(esn(128));
        let line = event_line(&ev, Some(true));
        assert!(line.len() < 250, "{} chars: {line}", line.len());
        assert!(line.contains("00000fff 00000000 00000000 00000000 ... (128 words, 12 bits set)"), "{line}");
        assert!(line.contains("seq 0x10000000c"), "64-bit with the flag: {line}");
        // JSON carries every word.
        let v: serde_json::Value = serde_json::from_str(&json(&ev, Some(true))).unwrap();
        assert_eq!(v["replay"]["bitmap"].as_array().unwrap().len(), 128);
        assert_eq!(v["replay_form"], "esn");
        assert_eq!(v["seq_bits"], 64);
    }

    #[test]
    fn a_wide_window_without_the_flag_is_named_so() {
        let ev = event(esn(4));
        let line = event_line(&ev, Some(false));
        assert!(
            line.contains(" wide-window oseq 0x0 seq 0xc window 128 bitmap 00000fff 00000000 00000000 00000000 bytes"),
            "{line}"
        );
        assert!(sa_block(&ev, Some(false)).contains("wrap at 2^32"));
        let v: serde_json::Value = serde_json::from_str(&json(&ev, Some(false))).unwrap();
        assert_eq!(
            (v["replay_form"].as_str(), v["seq_bits"].as_u64(), v["esn_flag"].as_bool()),
            (Some("wide-window"), Some(32), Some(false))
        );
        let v: serde_json::Value = serde_json::from_str(&json(&ev, None)).unwrap();
        assert!(v["esn_flag"].is_null() && v["seq_bits"].is_null());
    }

    #[test]
    fn legacy_lines() {
        let ev = event(Replay::Legacy(LegacyReplay { oseq: 0, seq: 12, bitmap: 0xfff }));
        assert_eq!(
            event_line(&ev, Some(false)),
            "timer esp dst 10.9.0.2 spi 0x00002001 src 10.9.0.1 reqid 2 legacy oseq 0x0 seq 0xc bitmap 0x00000fff bytes 864 packets 12"
        );
        let v: serde_json::Value = serde_json::from_str(&json(&ev, Some(false))).unwrap();
        assert_eq!(v["sa"], "esp dst 10.9.0.2 spi 0x00002001");
        assert_eq!(v["spi"], 0x2001);
    }
}
