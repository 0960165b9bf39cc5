//! Why a handler's transactional writes were not kept: the one answer the transaction gives its doors.

/// Why the handler's writes did not commit with its record, for the door to answer it its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) enum Unkept {
    /// The claim was lost while the handler ran (a retry took the key over): its writes were rolled back.
    ClaimLost,
    /// The transaction failed (the commit, or a `Tx` that outlived its handler): nothing was kept.
    Failed,
}
