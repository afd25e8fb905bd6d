//! Test support shared with the fuzz targets (feature `testkit`).

pub mod fuzz;
