//! The Redis store's Lua scripts (the `.lua` files beside this one: the owner-checked writes, and the claim on a
//! server older than 7.0), and how they are sent: by hash, with the source as the fallback.

use crate::store::error::StoreError;
use crate::store::redis::connection::{Commands, Failure};
use crate::store::redis::replicas::ReplicaAcks;
use redis::{Pipeline, Value};
use std::sync::{Arc, LazyLock};

/// A Lua script with its SHA-1, so a call sends `EVALSHA` and falls back to `EVAL` once per node that lacks it.
pub(super) struct Script {
    source: &'static str,
    sha: String,
}

impl Script {
    fn new(source: &'static str) -> Self {
        Self { source, sha: redis::Script::new(source).get_hash().to_owned() }
    }

    /// Runs this script in one round trip on the shared connection, by hash (`EVALSHA`); sent again by source
    /// (`EVAL`) on a node that answers `NOSCRIPT` (restarted, flushed, or a Cluster node that never ran it).
    pub(super) async fn eval(
        &self,
        commands: &Arc<Commands>,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let pipeline = |by_hash: bool| {
            let mut pipe = Pipeline::with_capacity(1);
            self.call(&mut pipe, by_hash, keys, args);
            pipe
        };
        let result = match commands.query::<(Value,)>(&pipeline(true)).await {
            Err(Failure::NoScript) => commands.query::<(Value,)>(&pipeline(false)).await,
            result => result,
        };
        Ok(result?.0)
    }

    /// Runs this script followed by `WAIT` on an exclusive connection: the script's answer and how many replicas
    /// acknowledged. Sent as `EVAL` (the source, not the hash): after a `NOSCRIPT` the pipeline's `WAIT` would still
    /// run, and with no replica in reach a second attempt would wait the timeout twice.
    pub(super) async fn eval_replicated(
        &self,
        commands: &Arc<Commands>,
        acks: &ReplicaAcks,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<(Value, u32), StoreError> {
        let mut pipe = redis::pipe();
        self.call(&mut pipe, false, keys, args);
        acks.wait_command(&mut pipe);
        Ok(acks.query::<(Value, u32)>(commands, &pipe).await?)
    }

    /// This script with `keys` and `args`, by hash or by source.
    fn call(&self, pipe: &mut Pipeline, by_hash: bool, keys: &[&str], args: &[&[u8]]) {
        // Sized up front: a completed record (the response body) is copied in once, not again as the buffer grows.
        let size = keys.iter().map(|key| key.len()).sum::<usize>() + args.iter().map(|arg| arg.len()).sum::<usize>();
        let mut command = redis::Cmd::with_capacity(3 + keys.len() + args.len(), size + self.source.len() + 64);
        if by_hash {
            command.arg("EVALSHA").arg(&self.sha);
        } else {
            command.arg("EVAL").arg(self.source);
        }
        command.arg(keys.len()).arg(keys).arg(args);
        pipe.add_command(command);
    }
}

pub(super) static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("claim.lua")));
pub(super) static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("complete.lua")));
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("release.lua")));
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("renew.lua")));
pub(super) static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("forget.lua")));
