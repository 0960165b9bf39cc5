//! The deterministic simulator of idem's engine (see `tests/simulation.rs`).

pub mod app;
pub mod driver;
pub mod plan;
pub mod rng;
pub mod store;
pub mod world;

pub use driver::{Backend, Outcome, run_real, run_seed};
