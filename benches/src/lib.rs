//! Shared helpers for Cairn's benchmarks. The deterministic data generator
//! (the mix of the performance issue) lives in `cairn_engine::sample`, shared
//! with the demo; it is re-exported here.

pub use cairn_engine::sample::{
    generate_image, generate_rewrite, mixed_data, rewrite_plan, BlockGen, BlockKind,
};
