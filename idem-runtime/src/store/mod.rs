//! The one small trait every backend implements, and the backends.

mod contract;
mod error;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod health;
mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod timed;
#[cfg(any(feature = "redis", feature = "postgres"))]
mod wakeup;

pub use contract::{Claimed, Forgotten, Store, StoreKey, Write};
pub use error::{Cause, StoreError};
pub use memory::MemoryStore;
pub use memory::builder::MemoryStoreBuilder;
#[cfg(feature = "postgres")]
pub use postgres::PostgresStore;
#[cfg(feature = "postgres")]
pub use postgres::builder::PostgresStoreBuilder;
#[cfg(feature = "redis")]
pub use redis::RedisStore;
#[cfg(feature = "redis")]
pub use redis::builder::{InvalidPrefix, RedisStoreBuilder};
