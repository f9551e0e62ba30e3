//! `xfrmsync defaults`: the thresholds the kernel gives SAs as they are
//! installed, per namespace (`xfrmsync::defaults`: the sysctls).

use xfrmsync::defaults::{self, NamespaceDefaults};
use xfrmsync::NetnsRef;

use crate::{output, parse, Failure, Global, Outcome};

#[derive(clap::Args)]
#[command(after_help = "These are the sysctls net.core.xfrm_aevent_etime (kept in 100 ms steps; \
                        shown and set here in milliseconds) and net.core.xfrm_aevent_rseqth, of \
                        the namespace. The kernel gives them to SAs when they are installed: SAs \
                        that exist keep their thresholds (use `set` or `apply` for those). \
                        Without options, shows them.")]
pub struct Args {
    /// Set the default timer threshold, in milliseconds (a multiple of 100;
    /// 0: off)
    #[arg(long, value_name = "MS", value_parser = parse::u32_any)]
    timer_ms: Option<u32>,
    /// Set the default replay threshold, in packets
    #[arg(long, value_name = "PACKETS", value_parser = parse::u32_any)]
    replay_threshold: Option<u32>,
    /// Print the values as a JSON line
    #[arg(long)]
    json: bool,
}

pub fn run(global: &Global, args: &Args) -> Outcome {
    let path = global.netns_path();
    let netns = path.as_deref().map_or(NetnsRef::Current, NetnsRef::Path);
    let where_ = global.where_();
    let now = defaults::read(netns).map_err(|e| Failure::new(format!("{where_}: {e}")))?;
    let now = if args.timer_ms.is_some() || args.replay_threshold.is_some() {
        // The library writes both; the one not given is written back as it
        // was read. It checks both before writing either.
        let wanted = NamespaceDefaults {
            timer_ms: args.timer_ms.unwrap_or(now.timer_ms),
            replay_packets: args.replay_threshold.unwrap_or(now.replay_packets),
        };
        defaults::write(netns, &wanted).map_err(|e| {
            // Values are checked before anything is written.
            let changed = if matches!(e, xfrmsync::Error::InvalidArgument(_)) { "; nothing was changed" } else { "" };
            Failure::new(format!("{where_}: setting the defaults: {}{changed}", parse::reason(&e)))
        })?;
        defaults::read(netns).map_err(|e| Failure::new(format!("{where_}: set, but reading back: {e}")))?
    } else {
        now
    };
    if args.json {
        let value = serde_json::json!({
            "netns": global.netns,
            "timer_ms": now.timer_ms,
            "replay_threshold": now.replay_packets,
        });
        output::line(&value.to_string());
    } else {
        output::line(&format!(
            "{where_}: new SAs get timer {} ms (net.core.xfrm_aevent_etime = {}), replay-threshold {} packets \
             (net.core.xfrm_aevent_rseqth = {})",
            now.timer_ms,
            now.timer_ms / 100,
            now.replay_packets,
            now.replay_packets
        ));
    }
    Ok(())
}
