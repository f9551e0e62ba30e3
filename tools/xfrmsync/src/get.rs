//! `xfrmsync get [DST SPI]`: counters and thresholds of one SA, or of all.

use std::net::IpAddr;

use xfrmsync::wire::SaInfo;
use xfrmsync::{Handle, SaId};

use crate::{output, parse, Failure, Global, Outcome, SaOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Destination address of the SA; without DST and SPI, every SA of the
    /// namespace
    #[arg(requires = "spi")]
    dst: Option<IpAddr>,
    /// SPI: 0x1001 (as `ip xfrm state` prints it) or decimal
    #[arg(value_parser = parse::u32_any)]
    spi: Option<u32>,
    #[command(flatten)]
    options: SaOptions,
    /// Print JSON lines: the SA's aevent values with "esn_flag", "replay_form"
    /// and "seq_bits", and every bitmap word
    #[arg(long)]
    json: bool,
}

/// Whether `sa` has the ESN flag, from a dump: a query does not say, and
/// its replay structure alone does not tell (see `output::Form`). Found by
/// what the kernel's lookup uses: destination, SPI and protocol.
pub fn esn_flag(handle: &Handle, sa: &SaId) -> Result<Option<bool>, xfrmsync::Error> {
    let mut esn = None;
    handle.dump_sas(|info: &SaInfo| {
        let s = &info.sa;
        if (s.daddr, s.spi, s.proto) == (sa.daddr, sa.spi, sa.proto) {
            esn = Some(info.esn());
        }
    })?;
    Ok(esn)
}

pub fn run(global: &Global, args: &Args) -> Outcome {
    if args.dst.is_none() && (args.options.proto.is_some() || args.options.mark.is_some()) {
        return Err(Failure::usage("--proto and --mark name one SA: give DST and SPI too"));
    }
    let handle = global.open(false)?;
    match (args.dst, args.spi) {
        (Some(dst), Some(spi)) => one(&handle, &args.options.sa(dst, spi), args.json),
        _ => all(global, &handle, args.json),
    }
}

fn print(event: &xfrmsync::Aevent, esn: Option<bool>, json: bool) {
    if json {
        output::line(&output::json(event, esn));
    } else {
        output::line(output::sa_block(event, esn).trim_end());
    }
}

fn one(handle: &Handle, sa: &SaId, json: bool) -> Outcome {
    let event = handle.query_with_thresholds(sa).map_err(|e| Failure::new(format!("{sa}: {e}")))?;
    // The flag is only for the label: a failed dump leaves it unknown
    // rather than failing a query that worked.
    let esn = esn_flag(handle, sa).ok().flatten();
    print(&event, esn, json);
    Ok(())
}

fn all(global: &Global, handle: &Handle, json: bool) -> Outcome {
    let mut sas = Vec::new();
    handle
        .dump_sas(|info: &SaInfo| {
            // A larval SA (no SPI yet, while IKE negotiates) has no counters
            // to query.
            if info.sa.spi != 0 {
                sas.push((info.sa, info.esn()));
            }
        })
        .map_err(|e| Failure::new(format!("{}: listing SAs: {e}", global.where_())))?;
    if sas.is_empty() && !json {
        output::line(&format!("{}: no SAs", global.where_()));
    }
    let mut failed = 0;
    for (i, (sa, esn)) in sas.iter().enumerate() {
        match handle.query_with_thresholds(sa) {
            Ok(event) => {
                if i > 0 && !json {
                    output::line("");
                }
                print(&event, Some(*esn), json);
            }
            // Deleted between the dump and the query: not an error of ours.
            Err(xfrmsync::Error::Kernel { errno: libc::ESRCH, .. }) => {
                eprintln!("xfrmsync: {sa}: gone since it was listed");
            }
            Err(e) => {
                eprintln!("xfrmsync: {sa}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(Failure::new(format!("{failed} of {} SAs could not be queried", sas.len())));
    }
    Ok(())
}
