//! `opamp-token`: issues a device's fleet token from the fleet key in
//! `OPAMP_FLEET_KEY` (the first key, when it lists several), to provision
//! the device with (`opamp-agent --token`, an OpenTelemetry Collector's
//! `Authorization: Bearer` header).
//!
//! ```sh
//! OPAMP_FLEET_KEY=… opamp-token --device sensor-17 --expires-in 2160h
//! ```

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Parser;
use opamp_core::{DeviceId, Error};
use opamp_examples::cli::{FLEET_KEY_ENV, exit_code, fleet_key_from_env, parse_duration};

/// Prints the fleet token of one device.
#[derive(Debug, Parser)]
#[command(name = "opamp-token", version)]
struct Args {
    /// The device the token proves.
    #[arg(long)]
    device: DeviceId,
    /// How long the token is good for (`2160h`, `30m`); without it, it never
    /// expires and only revoking the device or rotating the key withdraws it.
    #[arg(long, value_parser = parse_duration)]
    expires_in: Option<Duration>,
}

fn main() -> ExitCode {
    exit_code("opamp-token", run(Args::parse()))
}

fn run(args: Args) -> opamp_core::Result<()> {
    let key = fleet_key_from_env()?
        .ok_or_else(|| Error::invalid_input(format!("{FLEET_KEY_ENV} must hold the fleet key (base64, 16+ bytes)")))?;
    let token = match args.expires_in {
        Some(ttl) => key.token_expiring(&args.device, SystemTime::now() + ttl),
        None => key.token(&args.device),
    };
    println!("{}", token.as_str());
    Ok(())
}
