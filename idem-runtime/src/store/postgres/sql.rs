//! The tables' schema and the store's statements, written once per store for its table.
//!
//! **Two tables.** A key's row (its claim, then its record) lives in the table; the lease of a claim whose owner
//! renewed it lives in `<table>_leases`, keyed by the same key and tagged with the owner, and counts only while the
//! claim's row has that owner. A renewal writes the lease and only locks the claim's row in share mode, so a
//! completion inside the handler's own transaction (at any isolation level: its snapshot may predate every renewal)
//! writes a row no renewal wrote. Whoever ends or takes a claim (a completion, a release, a takeover, the sweep)
//! locks the claim's row first, then reads or writes the lease; a renewal does the same in share mode. So a renewal
//! and a takeover never both succeed, and no two of them wait for each other in opposite orders.
//!
//! Parameters are always bound; only the table's name (checked by [`TableName::parse`], then quoted) is written
//! into the text. Every statement compares `expires_at` with `statement_timestamp()`, the database's clock when the
//! statement started, so a row past its time is absent to all of them whether or not the sweep has deleted it yet.
//! Not `now()`: that is when the transaction started, which inside an application's own long transaction (a
//! completion committed with the handler's writes) would be a stale clock.

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};
use std::sync::Arc;

/// The longest table name part accepted: the index names (`<table>_expires_at`, `<table>_leases_pkey`) must stay
/// within PostgreSQL's 63 bytes.
const MAX_PART: usize = 48;

/// A checked table name, optionally schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableName {
    schema: Option<String>,
    table: String,
    text: String,
}

impl Default for TableName {
    fn default() -> Self {
        Self::parse("idem_records").expect("the default table name is valid")
    }
}

impl TableName {
    /// `table` or `schema.table`, each part an unquoted identifier of at most [`MAX_PART`] bytes.
    pub(super) fn parse(name: &str) -> Result<Self, String> {
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, name),
        };
        for part in schema.iter().chain([&table]) {
            let mut chars = part.chars();
            let starts_well = chars.next().is_some_and(|first| first.is_ascii_alphabetic() || first == '_');
            if !starts_well || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "{part:?} is not a plain identifier (ASCII letters, digits, `_`; not starting with a digit)"
                ));
            }
            if part.len() > MAX_PART {
                return Err(format!("{part:?} is longer than {MAX_PART} bytes"));
            }
        }
        Ok(Self { schema: schema.map(str::to_owned), table: table.to_owned(), text: name.to_owned() })
    }

    pub(super) fn as_str(&self) -> &str {
        &self.text
    }

    /// The name quoted for SQL: `"schema"."table"`.
    fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.table),
            None => format!("\"{}\"", self.table),
        }
    }

    /// The leases' table, quoted: `"schema"."<table>_leases"`.
    fn leases(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}_leases\"", self.table),
            None => format!("\"{}_leases\"", self.table),
        }
    }

    /// The notification channel: `<schema>_<table>_done`, within PostgreSQL's 63-byte identifiers. Two tables whose
    /// channels coincide only wake each other's waiters for nothing (they re-read their rows).
    fn channel(&self) -> String {
        let mut channel = format!("{}_done", self.text.replace('.', "_"));
        channel.truncate(63);
        channel
    }
}

/// The SQL that creates the tables and the index.
pub(super) fn schema(table: &TableName) -> String {
    let name = table.quoted();
    let leases = table.leases();
    let index = format!("\"{}_expires_at\"", table.table);
    format!(
        "-- Claims and completed records of idem (axum-idem): one row per key.\n\
         CREATE TABLE IF NOT EXISTS {name} (\n    \
             -- SHA-256 (hex) of the request's scope and its Idempotency-Key: no client bytes.\n    \
             key         text        PRIMARY KEY,\n    \
             -- The claimant's owner token while the request runs; NULL once completed.\n    \
             owner       text,\n    \
             -- SHA-256 (hex) of the request (method, path, query, body, ...): a reused key is refused.\n    \
             fingerprint text        NOT NULL,\n    \
             -- The stored response (NULL while in flight). Not replayable: only the status is kept.\n    \
             status      smallint,\n    \
             replayable  boolean,\n    \
             headers     jsonb,      -- [{{\"name\": ..., \"value\" | \"value_base64\": ...}}, ...]\n    \
             body        bytea,\n    \
             -- The record's end once completed; in flight, the lease's end as claimed (a renewal's is in {leases}).\n    \
             -- Past it (and past the renewed lease) the row is absent.\n    \
             expires_at  timestamptz NOT NULL\n\
         );\n\
         CREATE INDEX IF NOT EXISTS {index} ON {name} (expires_at);\n\
         -- Renewed leases of in-flight claims, apart from their rows in {name}: a renewal never writes the row that\n\
         -- a completion inside the handler's own transaction writes.\n\
         CREATE TABLE IF NOT EXISTS {leases} (\n    \
             key         text        PRIMARY KEY,\n    \
             -- The claim's owner token: the lease counts only while the claim's row has this owner.\n    \
             owner       text        NOT NULL,\n    \
             -- The lease's end, replacing the claim's own expires_at.\n    \
             expires_at  timestamptz NOT NULL\n\
         );\n"
    )
}

/// Every statement of the store, for one table.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) table: TableName,
    pub(super) channel: String,
    /// `$1` key, `$2` owner, `$3` fingerprint, `$4` lease (ms): one row, `owned` plus the live row's columns.
    pub(super) claim: SqlStr,
    /// `$1` key, `$2` owner, `$3` fingerprint, `$4` status, `$5` replayable, `$6` headers, `$7` body, `$8` ttl
    /// (ms), `$9` channel: a row when applied.
    pub(super) complete: SqlStr,
    /// As `complete`, inside the handler's own transaction: reads and writes the claim's row only.
    pub(super) complete_in_transaction: SqlStr,
    /// `$1` key, `$2` owner, `$3` channel: a row when applied.
    pub(super) release: SqlStr,
    /// `$1` key, `$2` owner, `$3` lease (ms): a row when applied.
    pub(super) renew: SqlStr,
    /// `$1` key: `left_ms` of a live in-flight claim.
    pub(super) lease_left: SqlStr,
    /// `$1` key: the live row.
    pub(super) inspect: SqlStr,
    /// `$1` key, `$2` channel: `removed`, `in_flight`.
    pub(super) forget: SqlStr,
    /// `$1` batch size: deletes leases past their end.
    pub(super) sweep_leases: SqlStr,
    /// `$1` batch size: locks the keys of rows that look expired, skipping rows locked by others.
    pub(super) sweep_lock: SqlStr,
    /// `$1` the keys locked by `sweep_lock`: deletes those still expired, seen from a snapshot taken after the locks.
    pub(super) sweep_delete: SqlStr,
}

impl Statements {
    pub(super) fn new(table: TableName) -> Self {
        let t = table.quoted();
        let l = table.leases();
        // The database's clock at the statement's start (see the module's doc).
        let now = "statement_timestamp()";
        let channel = table.channel();
        // A row's end: its renewed lease's, when its owner renewed it, else its own.
        let end = "coalesce(l.expires_at, r.expires_at)";
        let with_lease = format!("{t} r LEFT JOIN {l} l ON l.key = r.key AND l.owner = r.owner");
        // Another owner's in-flight claim whose lease ran out, as the snapshot shows it, locked: no renewal of it
        // (which holds the row in share mode while it writes the lease) is under way any more. Its lease is then
        // taken over through an upsert, which sees the lease row's latest version, so a renewal that committed
        // after this statement's snapshot still counts; only when the lease did run out (or belongs to an
        // earlier owner of the key) may the claim's row be taken over. `$2`: the caller; `{expiry}`: the lease the
        // caller takes.
        let takeover = |expiry: &str| {
            format!(
                "lapsed AS (\n\
                     SELECT r.owner FROM {t} r\n\
                     WHERE r.key = $1 AND r.owner <> $2 AND r.expires_at <= {now}\n\
                       AND NOT EXISTS (SELECT FROM {l} l WHERE l.key = r.key AND l.owner = r.owner AND l.expires_at > {now})\n\
                     FOR UPDATE\n\
                 ), taken AS (\n\
                     INSERT INTO {l} AS lease (key, owner, expires_at)\n\
                     SELECT $1, $2, {expiry} FROM lapsed\n\
                     ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at\n\
                     WHERE lease.expires_at <= {now} OR lease.owner IS DISTINCT FROM (SELECT owner FROM lapsed)\n\
                     RETURNING key\n\
                 )"
            )
        };
        // The caller's claim is upserted only when no live row of someone else is visible: a replay reads and
        // writes nothing. The upsert's own condition is checked again under the row's lock, so of two claimants
        // inserting a new key, taking over an expired record or a lapsed claim, exactly one wins; the other gets
        // no row (its snapshot predates the winner's commit) and sends the statement again.
        let claim = format!(
            "WITH found AS (\n\
                 SELECT r.owner, r.fingerprint, r.status, r.replayable, r.headers, r.body, {end} > {now} AS live\n\
                 FROM {with_lease} WHERE r.key = $1\n\
             ), live AS (\n\
                 SELECT owner, fingerprint, status, replayable, headers, body FROM found\n\
                 WHERE live AND owner IS DISTINCT FROM $2\n\
             ), {takeover}, claimed AS (\n\
                 INSERT INTO {t} AS held (key, owner, fingerprint, expires_at)\n\
                 SELECT $1, $2, $3, {now} + $4::bigint * interval '1 millisecond' WHERE NOT EXISTS (SELECT FROM live)\n\
                 ON CONFLICT (key) DO UPDATE SET\n\
                     owner = excluded.owner,\n\
                     fingerprint = CASE WHEN held.expires_at > {now} THEN held.fingerprint\n\
                                        ELSE excluded.fingerprint END,\n\
                     status = NULL, replayable = NULL, headers = NULL, body = NULL,\n\
                     expires_at = excluded.expires_at\n\
                 WHERE held.owner = excluded.owner OR (held.owner IS NULL AND held.expires_at <= {now})\n\
                    OR EXISTS (SELECT FROM taken)\n\
                 RETURNING key\n\
             )\n\
             SELECT true AS owned, NULL::text AS owner, NULL::text AS fingerprint, NULL::smallint AS status,\n\
                    NULL::boolean AS replayable, NULL::jsonb AS headers, NULL::bytea AS body FROM claimed\n\
             UNION ALL\n\
             SELECT false, owner, fingerprint, status, replayable, headers, body FROM live",
            takeover = takeover(&format!("{now} + $4::bigint * interval '1 millisecond'")),
        );
        let upsert_record = |condition: &str| {
            format!(
                "INSERT INTO {t} AS held (key, owner, fingerprint, status, replayable, headers, body, expires_at)\n\
                 VALUES ($1, NULL, $3, $4, $5, $6, $7, {now} + $8::bigint * interval '1 millisecond')\n\
                 ON CONFLICT (key) DO UPDATE SET\n\
                     owner = NULL, fingerprint = excluded.fingerprint, status = excluded.status,\n\
                     replayable = excluded.replayable, headers = excluded.headers, body = excluded.body,\n\
                     expires_at = excluded.expires_at\n\
                 WHERE held.owner = $2::text OR (held.owner IS NULL AND held.expires_at <= {now}){condition}\n\
                 RETURNING key"
            )
        };
        // Applied to the caller's claim, expired or not, and to a free key (absent, an expired record, or a lapsed
        // claim of another owner); never over a live claim of another owner or a live record. The caller's lease
        // goes with its claim; one taken over only to complete ends at once.
        let complete = format!(
            "WITH {takeover}, done AS (\n\
                 {upsert}\n\
             ), lease_ended AS (\n\
                 DELETE FROM {l} WHERE key = $1 AND owner = $2::text\n\
             )\n\
             SELECT done.key FROM done, LATERAL pg_notify($9, done.key)",
            takeover = takeover(now),
            upsert = upsert_record("\n    OR EXISTS (SELECT FROM taken)"),
        );
        // Inside the handler's transaction, which may run at REPEATABLE READ or SERIALIZABLE, the completion
        // touches nothing but the claim's row, which renewals only lock in share mode: a renewal made after the
        // transaction's snapshot neither conflicts with this write nor adds a read-write dependency to it (the
        // leases table, which renewals write, is never read here). A takeover writes the row, so a claim lost
        // meanwhile is fenced (or fails the transaction at the stricter levels). A lapsed claim of another owner
        // is not taken over here (telling whether its lease ran out means reading the leases table): fenced.
        let complete_in_transaction = format!(
            "WITH done AS (\n\
                 {upsert}\n\
             )\n\
             SELECT done.key FROM done, LATERAL pg_notify($9, done.key)",
            upsert = upsert_record(""),
        );
        // The caller's claim is deleted (with its lease), expired or not, so that nothing of its can come back;
        // applied when it was live.
        let release = format!(
            "WITH gone AS (\n\
                 DELETE FROM {t} r WHERE key = $1 AND owner = $2\n\
                 RETURNING key, coalesce((SELECT l.expires_at FROM {l} l WHERE l.key = $1 AND l.owner = $2),\n\
                                         r.expires_at) > {now} AS live\n\
             ), lease_ended AS (\n\
                 DELETE FROM {l} WHERE key = $1 AND owner = $2\n\
             )\n\
             SELECT gone.key FROM gone, LATERAL pg_notify($3, gone.key) WHERE gone.live"
        );
        // Only the caller's existing claim is renewed (lapsed or not): a released, completed, taken over or swept
        // key is left alone, so a renewal that lands late changes nothing. The claim's row is held in share mode
        // while its lease is written (see `lapsed`), never written itself.
        let renew = format!(
            "WITH mine AS (\n\
                 SELECT key FROM {t} WHERE key = $1 AND owner = $2 FOR SHARE\n\
             )\n\
             INSERT INTO {l} AS lease (key, owner, expires_at)\n\
             SELECT key, $2, {now} + $3::bigint * interval '1 millisecond' FROM mine\n\
             ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at\n\
             RETURNING key"
        );
        let lease_left = format!(
            "SELECT ceil(extract(epoch FROM {end} - {now}) * 1000)::bigint AS left_ms FROM {with_lease}\n\
             WHERE r.key = $1 AND r.owner IS NOT NULL AND {end} > {now}"
        );
        let inspect = format!(
            "SELECT r.owner, r.fingerprint, r.status, r.replayable, r.headers, r.body FROM {with_lease}\n\
             WHERE r.key = $1 AND {end} > {now}"
        );
        // A record, live or expired, or a row this build cannot read (a fingerprint that is not 64 hex digits) is
        // removed; an in-flight claim, live or lapsed, is left to its owner and the sweep.
        let forget = format!(
            "WITH gone AS (\n\
                 DELETE FROM {t}\n\
                 WHERE key = $1 AND (owner IS NULL OR fingerprint !~ '^[0-9a-f]{{64}}$')\n\
                 RETURNING key, expires_at > {now} AS live\n\
             )\n\
             SELECT EXISTS (SELECT FROM gone, LATERAL pg_notify($2, gone.key) WHERE gone.live) AS removed,\n\
                    EXISTS (SELECT FROM {with_lease} WHERE r.key = $1 AND r.owner IS NOT NULL AND {end} > {now}\n\
                            AND r.fingerprint ~ '^[0-9a-f]{{64}}$') AS in_flight"
        );
        // Rows locked by others (a claim taking one over, a renewal) are skipped, and each row is checked again as
        // it is deleted.
        let sweep_leases = format!(
            "DELETE FROM {l} WHERE key IN (\n\
                 SELECT key FROM {l} WHERE expires_at <= {now} LIMIT $1 FOR UPDATE SKIP LOCKED\n\
             ) AND expires_at <= {now}"
        );
        let sweep_lock = format!(
            "SELECT r.key FROM {t} r\n\
             WHERE r.expires_at <= {now}\n\
               AND NOT EXISTS (SELECT FROM {l} l WHERE l.key = r.key AND l.owner = r.owner AND l.expires_at > {now})\n\
             ORDER BY r.expires_at LIMIT $1 FOR UPDATE OF r SKIP LOCKED"
        );
        let sweep_delete = format!(
            "DELETE FROM {t} r WHERE r.key = ANY($1) AND r.expires_at <= {now}\n\
               AND NOT EXISTS (SELECT FROM {l} l WHERE l.key = r.key AND l.owner = r.owner AND l.expires_at > {now})"
        );
        Self {
            table,
            channel,
            claim: audited(claim),
            complete: audited(complete),
            complete_in_transaction: audited(complete_in_transaction),
            release: audited(release),
            renew: audited(renew),
            lease_left: audited(lease_left),
            inspect: audited(inspect),
            forget: audited(forget),
            sweep_leases: audited(sweep_leases),
            sweep_lock: audited(sweep_lock),
            sweep_delete: audited(sweep_delete),
        }
    }
}

/// A statement of this module as sqlx runs it. Its only text not written here is the table's name, checked by
/// [`TableName::parse`] and quoted. Shared: each call clones it without copying the text.
fn audited(statement: String) -> SqlStr {
    AssertSqlSafe(Arc::<str>::from(statement)).into_sql_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers_optionally_schema_qualified() {
        assert_eq!(TableName::parse("idem_records").unwrap().quoted(), "\"idem_records\"");
        assert_eq!(TableName::parse("billing.Idem_2").unwrap().quoted(), "\"billing\".\"Idem_2\"");
        for bad in ["", "2fast", "a-b", "a.b.c", "x\"; DROP TABLE y; --", "é", ".t", "s.", &"t".repeat(49)] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn channels_are_named_after_the_table_within_63_bytes() {
        assert_eq!(TableName::default().channel(), "idem_records_done");
        assert_eq!(TableName::parse("billing.idem").unwrap().channel(), "billing_idem_done");
        let long = TableName::parse(&format!("{}.{}", "s".repeat(48), "t".repeat(48))).unwrap();
        assert_eq!(long.channel().len(), 63);
    }
}
