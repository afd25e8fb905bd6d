//! Compiles the protocols of the enabled transports with the pure-Rust
//! `protox` parser: no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    #[cfg(feature = "grpc")]
    {
        const PROTO: &str = "proto/opamp/control/v1/control.proto";
        println!("cargo:rerun-if-changed={PROTO}");
        let descriptors = protox::compile([PROTO], ["proto"])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            // Small starting buffers: see src/grpc/codec.rs.
            .codec_path("crate::grpc::codec::LeanCodec")
            .compile_fds(descriptors)?;
    }
    #[cfg(feature = "websocket")]
    {
        const PROTOS: [&str; 2] = ["proto/opamp/v1/opamp.proto", "proto/opamp/v1/anyvalue.proto"];
        for proto in PROTOS {
            println!("cargo:rerun-if-changed={proto}");
        }
        let descriptors = protox::compile(PROTOS, ["proto"])?;
        prost_build::Config::new().compile_fds(descriptors)?;
    }
    Ok(())
}
