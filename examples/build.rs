//! Generates a stock tonic `ControlService` (tonic's default codec and
//! settings) for the load generator's baseline server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "../opamp-transport/proto/opamp/control/v1/control.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["../opamp-transport/proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
