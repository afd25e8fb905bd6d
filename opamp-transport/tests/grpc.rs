//! gRPC transport tests (filled below).
