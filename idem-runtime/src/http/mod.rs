//! The HTTP vocabulary every door speaks, and no pipeline: the key header and its rules, the request fingerprint,
//! the problems idem answers with, the headers it adds, the replay of a stored response, the extractors a handler
//! takes.

pub(crate) mod execution;
pub(crate) mod extract;
pub(crate) mod fingerprint;
pub(crate) mod headers;
pub(crate) mod key;
pub(crate) mod problem;
pub(crate) mod replay;
pub(crate) mod target;
