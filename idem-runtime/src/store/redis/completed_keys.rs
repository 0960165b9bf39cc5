//! Keys this store recently saw holding a completed record, so a claim on one of them reads it with a plain `GET`.
//!
//! A claim is `SET key claim NX GET PX lease`: one round trip whatever the key holds. On a key that holds a
//! completed record (a replay) Redis does more for it than for a `GET` of the same record: a second lookup for `NX`,
//! the options to parse, the expiry to compute (Redis 7.0: 0.52 µs of server time against 0.30 µs for the `GET`).
//! A completed record never changes until it expires or is forgotten, so where this store completed the key itself,
//! or a claim found a completed record there, the next claim sends `GET` instead: still one round trip when the
//! record is there. When it is not (it expired, was forgotten, or a failover lost it), the claim goes on with
//! `SET … NX GET` as usual: a second round trip, on a path that is rare and that nothing else depends on.
//!
//! The table is small and fixed (a slot per key digest's hash, the newest key wins a slot), so it needs no
//! eviction and its memory is bounded whatever the traffic.

use crate::store::contract::StoreKey;
use std::sync::{Mutex, PoisonError};

/// How many keys are remembered at most (one per slot).
const SLOTS: usize = 4096;

/// See the module documentation.
pub(super) struct CompletedKeys {
    slots: Box<[Mutex<Option<StoreKey>>]>,
}

impl Default for CompletedKeys {
    fn default() -> Self {
        Self { slots: (0..SLOTS).map(|_| Mutex::new(None)).collect() }
    }
}

impl CompletedKeys {
    fn slot(&self, key: &StoreKey) -> std::sync::MutexGuard<'_, Option<StoreKey>> {
        // FNV-1a over the key's first bytes: keys are digests (hex), already uniform.
        let hash =
            key.as_str().bytes().take(16).fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        let slot = &self.slots[(hash % SLOTS as u64) as usize];
        slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers that `key` holds a completed record.
    pub(super) fn insert(&self, key: &StoreKey) {
        let mut slot = self.slot(key);
        if slot.as_ref() != Some(key) {
            *slot = Some(key.clone());
        }
    }

    /// Whether `key` was seen holding a completed record (and not forgotten since).
    pub(super) fn contains(&self, key: &StoreKey) -> bool {
        self.slot(key).as_ref() == Some(key)
    }

    /// Forgets `key`: it no longer holds a completed record.
    pub(super) fn remove(&self, key: &StoreKey) {
        let mut slot = self.slot(key);
        if slot.as_ref() == Some(key) {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_forgets_keys_and_a_slot_holds_the_newest() {
        let keys = CompletedKeys::default();
        let first = StoreKey::derive(&[b"first"]);
        assert!(!keys.contains(&first));
        keys.insert(&first);
        assert!(keys.contains(&first));
        keys.remove(&first);
        assert!(!keys.contains(&first));

        // More keys than slots: each is remembered until another takes its slot, and the table stays its size.
        let many: Vec<StoreKey> = (0..SLOTS * 2).map(|n| StoreKey::derive(&[&n.to_be_bytes()])).collect();
        for key in &many {
            keys.insert(key);
            assert!(keys.contains(key));
        }
        let remembered = many.iter().filter(|key| keys.contains(key)).count();
        assert!(remembered <= SLOTS && remembered > SLOTS / 2, "{remembered} remembered");
    }
}
