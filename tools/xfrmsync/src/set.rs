//! `xfrmsync set DST SPI ...`: thresholds and values of one SA in one
//! `XFRM_MSG_NEWAE`, so the kernel applies all of it or none.

use xfrmsync::{AeUpdate, Aevent, Replay};

use crate::{output, parse, Failure, Global, Outcome, SaArgs};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
    .args(["replay_threshold", "timer_ms", "oseq", "seq", "bytes", "packets"])))]
#[command(after_help = "Everything given goes to the kernel in one XFRM_MSG_NEWAE: it is applied \
                        all together or not at all. The kernel takes replay state and lifetime \
                        counters as whole structures, so the fields of the replay state (oseq, \
                        seq, bitmap) or of the lifetime (bytes, packets, times) that are not \
                        given are copied from a query made just before; a packet arriving in \
                        between is not counted. An ESN SA takes 64-bit sequence numbers; any \
                        other SA refuses values above 2^32-1.")]
pub struct Args {
    #[command(flatten)]
    sa: SaArgs,
    /// Replay threshold: an event every N packets
    #[arg(long, value_name = "PACKETS", value_parser = parse::u32_any)]
    replay_threshold: Option<u32>,
    /// Timer threshold: an event at the latest every MS milliseconds while
    /// the SA changes (0: off). The kernel reads it back in 100 ms steps
    #[arg(long, value_name = "MS", value_parser = parse::u32_any)]
    timer_ms: Option<u32>,
    /// Outbound sequence number (the last one sent)
    #[arg(long, value_name = "N", value_parser = parse::u64_any)]
    oseq: Option<u64>,
    /// Highest inbound sequence number seen
    #[arg(long, value_name = "N", value_parser = parse::u64_any)]
    seq: Option<u64>,
    /// Lifetime byte counter
    #[arg(long, value_name = "N", value_parser = parse::u64_any)]
    bytes: Option<u64>,
    /// Lifetime packet counter
    #[arg(long, value_name = "N", value_parser = parse::u64_any)]
    packets: Option<u64>,
    /// Print the SA as it is afterwards, as a JSON line (`get --json`)
    #[arg(long)]
    json: bool,
}

pub fn run(global: &Global, args: &Args) -> Outcome {
    let sa = args.sa.sa();
    let fail = |why: String| Failure::new(format!("{sa}: {why}"));
    let handle = global.open(false)?;
    let mut update =
        AeUpdate { replay_threshold: args.replay_threshold, timer_threshold_ms: args.timer_ms, ..AeUpdate::default() };
    let values = args.oseq.is_some() || args.seq.is_some() || args.bytes.is_some() || args.packets.is_some();
    if values {
        let now = handle.query(&sa).map_err(|e| fail(e.to_string()))?;
        let wide = |v: &Option<u64>| v.is_some_and(|v| v > u64::from(u32::MAX));
        let esn = if now.replay.is_esn() && (wide(&args.oseq) || wide(&args.seq)) {
            crate::get::esn_flag(&handle, &sa)
                .map_err(|e| fail(format!("listing SAs for the ESN flag: {e}")))?
                .ok_or_else(|| fail("gone since it was queried; nothing was changed".into()))?
        } else {
            false
        };
        update.replay = replay(&now, esn, args.oseq, args.seq).map_err(fail)?;
        if args.bytes.is_some() || args.packets.is_some() {
            let mut lifetime = now.lifetime;
            lifetime.bytes = args.bytes.unwrap_or(lifetime.bytes);
            lifetime.packets = args.packets.unwrap_or(lifetime.packets);
            update.lifetime = Some(lifetime);
        }
    }
    handle.update(&sa, &update).map_err(|e| fail(set_error(&e)))?;
    let after = handle.query_with_thresholds(&sa).map_err(|e| fail(format!("set, but reading it back: {e}")))?;
    if args.json {
        output::line(&output::json(&after, None));
    } else {
        output::line(&format!("set {}", output::event_line(&after, None).trim_start_matches("query ")));
    }
    Ok(())
}

/// The replay state to send: the SA's own with the sequence numbers given.
/// `esn`: the SA has the ESN flag (only asked for when a value needs it).
fn replay(now: &Aevent, esn: bool, oseq: Option<u64>, seq: Option<u64>) -> Result<Option<Replay>, String> {
    if oseq.is_none() && seq.is_none() {
        return Ok(None);
    }
    let narrow = |what: &str, v: u64| {
        u32::try_from(v).map_err(|_| format!("{what} {v} does not fit the 32-bit sequence numbers of this SA"))
    };
    Ok(Some(match now.replay {
        Replay::Legacy(mut r) => {
            if let Some(v) = oseq {
                r.oseq = narrow("oseq", v)?;
            }
            if let Some(v) = seq {
                r.seq = narrow("seq", v)?;
            }
            Replay::Legacy(r)
        }
        Replay::Esn(mut r) => {
            // A wide window without the ESN flag has the ESN-format
            // structure but 32-bit numbers: the kernel would never use the
            // high halves.
            if !esn {
                oseq.map(|v| narrow("oseq", v)).transpose()?;
                seq.map(|v| narrow("seq", v)).transpose()?;
            }
            if let Some(v) = oseq {
                (r.oseq_hi, r.oseq) = ((v >> 32) as u32, v as u32);
            }
            if let Some(v) = seq {
                (r.seq_hi, r.seq) = ((v >> 32) as u32, v as u32);
            }
            Replay::Esn(r)
        }
    }))
}

/// The error, and what it means for the SA.
fn set_error(e: &xfrmsync::Error) -> String {
    use xfrmsync::Error;
    match e {
        // One request, refused whole: the kernel changed nothing.
        Error::Kernel { .. } => format!("{e}; nothing was changed"),
        // Refused before anything was sent (the HZ measurement may have
        // been the reason: it needs a timer it can restore).
        Error::InvalidArgument(_) if xfrmsync::timer::kernel_hz().is_none() && e.to_string().contains("HZ") => {
            format!("{}; nothing was changed (--kernel-hz HZ skips measuring HZ)", parse::reason(e))
        }
        Error::InvalidArgument(_) => format!("{}; nothing was changed", parse::reason(e)),
        Error::TimedOut(_) => format!("{e}: the update may or may not have been applied; check with `xfrmsync get`"),
        // RestoreFailed says itself what the SA is left with.
        other => other.to_string(),
    }
}
