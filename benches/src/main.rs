//! The xfrmsync bench (issue 9). Prints figures, asserts no timing.
//!
//!   bench [--quick] [decode] [dispatch] [memory] [fields] [standby]
//!   bench --only DECODER KIND ROUNDS    one decoder, for callgrind
//!
//! Events are the captured Linux 6.1 ones (tests/corpus/linux-6.1): legacy,
//! ESN, and legacy ones rewritten to IPv6; each re-addressed to 100,000
//! distinct SAs (SPI and destination), laid out one after another at 4-byte
//! alignment as datagrams lie in a socket buffer. Times are the minimum of
//! several rounds on one core (the machine is shared and noisy);
//! scripts/bench adds instruction counts from callgrind, which noise does
//! not move.

mod alloc;
mod corpus;
mod fake;
mod peers;
mod standby;

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corpus::{Kind, Stream};
use xfrmsync::view::AeventView;
use xfrmsync::wire::Messages;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

pub const SAS: usize = 100_000;

/// The decoders compared; each parses a message and reads what a sync
/// daemon reads of it (SPI, reqid, flags, 64-bit sequence numbers, byte and
/// packet counters), summed into a checksum so nothing is optimised away.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Decoder {
    View,
    Owned,
    Libnl,
    NetlinkPacketXfrm,
}

const DECODERS: [Decoder; 4] = [Decoder::View, Decoder::Owned, Decoder::Libnl, Decoder::NetlinkPacketXfrm];

impl Decoder {
    fn name(self) -> &'static str {
        match self {
            Decoder::View => "xfrmsync AeventView (in place)",
            Decoder::Owned => "xfrmsync decode_aevent (owned)",
            Decoder::Libnl => "libnl xfrmnl_ae_parse",
            Decoder::NetlinkPacketXfrm => "netlink-packet-xfrm 0.5",
        }
    }

    fn parse(name: &str) -> Option<Decoder> {
        DECODERS.into_iter().find(|d| format!("{d:?}").eq_ignore_ascii_case(name))
    }

    #[inline(never)]
    fn run(self, stream: &Stream) -> u64 {
        let mut sum = 0u64;
        match self {
            Decoder::View => {
                for msg in stream.messages() {
                    let Some(Ok(m)) = Messages::new(msg).next() else { continue };
                    let Ok(ev) = AeventView::parse(&m) else { continue };
                    let r = ev.replay();
                    let l = ev.lifetime();
                    sum = sum.wrapping_add(
                        u64::from(ev.spi())
                            + u64::from(ev.reqid())
                            + u64::from(ev.flags())
                            + r.seq64()
                            + r.oseq64()
                            + l.bytes
                            + l.packets,
                    );
                }
            }
            Decoder::Owned => {
                for msg in stream.messages() {
                    let Some(Ok(m)) = Messages::new(msg).next() else { continue };
                    let Ok(ev) = xfrmsync::wire::decode_aevent(&m) else { continue };
                    sum = sum.wrapping_add(
                        u64::from(ev.sa.spi)
                            + u64::from(ev.reqid)
                            + u64::from(ev.flags)
                            + ev.replay.seq64()
                            + ev.replay.oseq64()
                            + ev.lifetime.bytes
                            + ev.lifetime.packets,
                    );
                }
            }
            Decoder::Libnl => {
                for msg in stream.messages() {
                    sum = sum.wrapping_add(peers::libnl_parse_read(msg));
                }
            }
            Decoder::NetlinkPacketXfrm => {
                for msg in stream.messages() {
                    sum = sum.wrapping_add(peers::npx_parse_read(msg));
                }
            }
        }
        sum
    }
}

/// Minimum over `rounds` of the time `f` takes, and its last result.
fn min_time<T>(rounds: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..rounds {
        let start = Instant::now();
        let out = black_box(f());
        best = best.min(start.elapsed());
        last = Some(out);
    }
    (best, last.expect("at least one round"))
}

fn per_sec(events: usize, t: Duration) -> f64 {
    events as f64 / t.as_secs_f64()
}

fn mev(rate: f64) -> String {
    format!("{:.2} M/s", rate / 1e6)
}

fn decode(rounds: usize) {
    println!("\n## 1. Decode: events/s on one core (min of {rounds} rounds of {SAS} events), allocations per event\n");
    println!("| stream | decoder | events/s | ns/event | allocations/event | vs libnl |");
    println!("|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for kind in Kind::ALL {
        let stream = Stream::build(kind, SAS);
        let mut libnl_rate = None;
        let mut results = Vec::new();
        for decoder in [Decoder::Libnl, Decoder::View, Decoder::Owned, Decoder::NetlinkPacketXfrm] {
            let before = alloc::count();
            let sum0 = decoder.run(&stream);
            let allocs = (alloc::count() - before) as f64 / stream.len() as f64;
            let (t, sum) = min_time(rounds, || decoder.run(&stream));
            assert_eq!(sum, sum0);
            let rate = per_sec(stream.len(), t);
            if decoder == Decoder::Libnl {
                libnl_rate = Some(rate);
            }
            results.push((decoder, rate, allocs));
        }
        let libnl = libnl_rate.unwrap();
        for (decoder, rate, allocs) in results {
            println!(
                "| {} | {} | {} | {:.1} | {} | {:.1}x |",
                kind.name(),
                decoder.name(),
                mev(rate),
                1e9 / rate,
                if decoder == Decoder::Libnl {
                    "3-4 (from its source: object, 2 nl_addr, ESN copy; not counted)".to_string()
                } else {
                    format!("{allocs:.2}")
                },
                rate / libnl
            );
            summary.push((kind, decoder, rate / libnl));
        }
    }
    println!();
    for kind in Kind::ALL {
        let ratio = |d| summary.iter().find(|(k, dd, _)| *k == kind && *dd == d).unwrap().2;
        println!(
            "RATIO decode {:<7} view/libnl {:>5.1}x  owned/libnl {:>5.1}x  netlink-packet-xfrm/libnl {:>4.2}x  (goal: view >= 10x)",
            kind.name(),
            ratio(Decoder::View),
            ratio(Decoder::Owned),
            ratio(Decoder::NetlinkPacketXfrm)
        );
    }
}

fn dispatch(rounds: usize) {
    println!("\n## 2. Decode plus dispatch to per-SA callbacks, {SAS} SAs registered\n");
    let stream = Stream::build(Kind::Mixed, SAS);
    let libnl = min_time(rounds, || Decoder::Libnl.run(&stream)).0;
    let libnl_rate = per_sec(stream.len(), libnl);
    println!("libnl bare parse on the same mixed stream: {} ({:.0} ns/event)\n", mev(libnl_rate), 1e9 / libnl_rate);
    println!("| path | events/s | ns/event | allocations/event | vs libnl bare parse |");
    println!("|---|---|---|---|---|");
    for (label, view) in [("view callbacks (on_sa_event_view)", true), ("owned callbacks (on_sa_event)", false)] {
        let (kernel, handle) = fake::handle();
        let hits = Arc::new(AtomicU64::new(0));
        for i in 0..SAS {
            let sa = stream.sa(i);
            let hits = hits.clone();
            if view {
                handle
                    .on_sa_event_view(
                        sa,
                        Some(Box::new(move |_, ev| {
                            hits.fetch_add(ev.replay().seq64() | 1, Ordering::Relaxed);
                        })),
                    )
                    .unwrap();
            } else {
                handle
                    .on_sa_event(
                        sa,
                        Some(Box::new(move |_, ev| {
                            hits.fetch_add(ev.replay.seq64() | 1, Ordering::Relaxed);
                        })),
                    )
                    .unwrap();
            }
        }
        // As Handle::dispatch takes them: up to its limit of datagrams (128
        // by default) a call, one event a datagram.
        let datagrams: Vec<&[u8]> = stream.messages().collect();
        let run = || {
            let mut n = 0;
            for call in datagrams.chunks(xfrmsync::handle::DEFAULT_DISPATCH_LIMIT) {
                n += handle.dispatch_datagrams(call.iter().copied()).unwrap();
            }
            n
        };
        let before = alloc::count();
        let n = run();
        let allocs = (alloc::count() - before) as f64 / n as f64;
        assert_eq!(n, stream.len());
        assert!(hits.load(Ordering::Relaxed) > 0);
        let (t, _) = min_time(rounds, run);
        let rate = per_sec(stream.len(), t);
        println!(
            "| decode + route + callback, {label}, in process, 128 datagrams a call | {} | {:.1} | {allocs:.2} | {:.1}x |",
            mev(rate),
            1e9 / rate,
            rate / libnl_rate
        );
        if view {
            println!("RATIO dispatch view/libnl-bare-parse {:.1}x (goal >= 4x)", rate / libnl_rate);
            // The same through a socket: every event its own datagram, as
            // the kernel sends them, read by Handle::dispatch.
            let (t, n, allocs) = fake::through_socket(&kernel, &handle, &stream);
            let rate = per_sec(n, t);
            println!(
                "| the same through Handle::dispatch from a socket pair: a backlog of 40,000 datagrams, one event each (CPU time of the reading thread) | {} | {:.1} | {allocs:.2} | {:.1}x |",
                mev(rate),
                1e9 / rate,
                rate / libnl_rate
            );
        }
    }
}

fn memory(sizes: &[usize]) {
    println!("\n## 4. Memory per tracked SA in the registry (allocator totals; RSS for comparison)\n");
    println!("| SAs | live heap after resync | bytes per SA | peak during resync, per SA | RSS growth per SA |");
    println!("|---|---|---|---|---|");
    for &n in sizes {
        let m = fake::registry_memory(n);
        println!(
            "| {n} | {:.1} MB | {:.1} | {:.1} | {:.1} |",
            m.live as f64 / 1e6,
            m.live as f64 / n as f64,
            m.peak as f64 / n as f64,
            m.rss as f64 / n as f64
        );
        println!("RATIO memory {n} SAs: {:.1} bytes/SA (goal <= 64)", m.live as f64 / n as f64);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--only-dispatch") {
        // For callgrind: register the callbacks, then dispatch ROUNDS times
        // (0: the baseline to subtract).
        let rounds: usize = args[1].parse().expect("rounds");
        let stream = Stream::build(Kind::Mixed, SAS);
        let (_kernel, handle) = fake::handle();
        for i in 0..SAS {
            handle
                .on_sa_event_view(
                    stream.sa(i),
                    Some(Box::new(|_, ev| {
                        black_box(ev.replay().seq64());
                    })),
                )
                .unwrap();
        }
        let datagrams: Vec<&[u8]> = stream.messages().collect();
        for _ in 0..rounds {
            for call in datagrams.chunks(xfrmsync::handle::DEFAULT_DISPATCH_LIMIT) {
                black_box(handle.dispatch_datagrams(call.iter().copied()).unwrap());
            }
        }
        println!("events {}", stream.len() * rounds);
        return;
    }
    if args.first().map(String::as_str) == Some("--only") {
        // For callgrind: build the stream, then run one decoder ROUNDS times
        // ("none" runs none: the baseline to subtract).
        let kind = Kind::parse(&args[2]).expect("kind: legacy, esn, ipv6, mixed");
        let rounds: usize = args[3].parse().expect("rounds");
        let stream = Stream::build(kind, SAS);
        if let Some(decoder) = Decoder::parse(&args[1]) {
            for _ in 0..rounds {
                black_box(decoder.run(&stream));
            }
        }
        println!("events {}", stream.len() * rounds);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let wanted = |what: &str| args.iter().all(|a| a.starts_with("--")) || args.iter().any(|a| a == what);
    let rounds = if quick { 3 } else { 9 };
    println!("# xfrmsync bench");
    if wanted("fields") {
        peers::compare_fields();
    }
    if wanted("decode") {
        decode(rounds);
    }
    if wanted("dispatch") {
        dispatch(rounds);
    }
    if wanted("memory") {
        memory(if quick { &[100_000] } else { &[100_000, 1_000_000] });
    }
    if wanted("standby") {
        standby::memory(&[SAS]);
    }
}
