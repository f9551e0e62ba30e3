//! `xfrmsync defaults`: the thresholds the kernel gives SAs as they are
//! installed, per namespace (sysctls; see `sysctl_defaults`).

use crate::sysctl_defaults::{self, Change};
use crate::{output, parse, Failure, Global, Outcome};

#[derive(clap::Args)]
#[command(after_help = "These are the sysctls net.core.xfrm_aevent_etime (kept in 100 ms units; \
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
    let netns = global.netns_path();
    let where_ = global.where_();
    if args.timer_ms.is_some() || args.replay_threshold.is_some() {
        let change = Change { timer_ms: args.timer_ms, replay_packets: args.replay_threshold };
        sysctl_defaults::write(netns.as_deref(), change)
            .map_err(|e| Failure::new(format!("{where_}: setting the defaults: {e}")))?;
    }
    let now = sysctl_defaults::read(netns.as_deref()).map_err(|e| Failure::new(format!("{where_}: {e}")))?;
    if args.json {
        let value = serde_json::json!({
            "netns": global.netns,
            "timer_ms": now.timer_ms,
            "replay_threshold": now.replay_packets,
        });
        output::line(&value.to_string());
    } else {
        output::line(&format!(
            "{where_}: new SAs get timer {} ms (net.core.xfrm_aevent_etime = {}), replay-threshold {} packets (net.core.xfrm_aevent_rseqth = {})",
            now.timer_ms,
            now.timer_ms / u64::from(sysctl_defaults::ETIME_UNIT_MS),
            now.replay_packets,
            now.replay_packets
        ));
    }
    Ok(())
}
