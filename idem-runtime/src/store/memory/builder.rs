//! Configuring a [`MemoryStore`]: its bounds.

use crate::store::memory::MemoryStore;

/// Configures a [`MemoryStore`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    max_bytes: usize,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        Self { max_entries: 100_000, max_bytes: 256 << 20 }
    }
}

impl MemoryStoreBuilder {
    /// The most keys held at once, in flight or completed (default 100 000).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries.max(1);
        self
    }

    /// The most bytes of records held at once (default 256 MiB).
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore::bounded(self.max_entries, self.max_bytes)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with the default bounds (100 000 entries, 256 MiB).
    pub fn new() -> Self {
        MemoryStoreBuilder::default().build()
    }

    /// Configures bounds.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }
}
