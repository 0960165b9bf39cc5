//! The table's schema and the store's statements, written once per store for its table.
//!
//! Parameters are always bound; only the table's name (checked by [`TableName::parse`], then quoted) is written
//! into the text. Every statement compares `expires_at` with `statement_timestamp()`, the database's clock when the
//! statement started, so a row past its time is absent to all of them whether or not the sweep has deleted it yet.
//! Not `now()`: that is when the transaction started, which inside an application's own long transaction (a
//! completion committed with the handler's writes) would be a stale clock.

/// The longest table name part accepted: the index name (`<table>_expires_at`) must stay within PostgreSQL's 63.
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

    /// The notification channel: `<schema>_<table>_done`, within PostgreSQL's 63-byte identifiers. Two tables whose
    /// channels coincide only wake each other's waiters for nothing (they re-read their rows).
    fn channel(&self) -> String {
        let mut channel = format!("{}_done", self.text.replace('.', "_"));
        channel.truncate(63);
        channel
    }
}

/// The SQL that creates the table and its index.
pub(super) fn schema(table: &TableName) -> String {
    let name = table.quoted();
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
             -- The lease's end while in flight, the record's end once completed; past it the row is absent.\n    \
             expires_at  timestamptz NOT NULL\n\
         );\n\
         CREATE INDEX IF NOT EXISTS {index} ON {name} (expires_at);\n"
    )
}

/// Every statement of the store, for one table.
#[derive(Debug)]
pub(super) struct Statements {
    pub(super) table: TableName,
    pub(super) channel: String,
    /// `$1` key, `$2` owner, `$3` fingerprint, `$4` lease (ms): one row, `owned` plus the live row's columns.
    pub(super) claim: String,
    /// `$1` key, `$2` owner, `$3` fingerprint, `$4` status, `$5` replayable, `$6` headers, `$7` body, `$8` ttl
    /// (ms), `$9` channel: a row when applied.
    pub(super) complete: String,
    /// `$1` key, `$2` owner, `$3` channel: a row when applied.
    pub(super) release: String,
    /// `$1` key, `$2` owner, `$3` fingerprint, `$4` lease (ms): a row when applied.
    pub(super) renew: String,
    /// `$1` key: `left_ms` of a live in-flight claim.
    pub(super) lease_left: String,
    /// `$1` key: the live row.
    pub(super) inspect: String,
    /// `$1` key, `$2` channel: `removed`, `in_flight`.
    pub(super) forget: String,
    /// `$1` batch size.
    pub(super) sweep: String,
}

impl Statements {
    pub(super) fn new(table: TableName) -> Self {
        let t = table.quoted();
        // The database's clock at the statement's start (see the module's doc).
        let now = "statement_timestamp()";
        let channel = table.channel();
        // The caller's claim is upserted only when no live row of someone else is visible: a replay reads and
        // writes nothing. The upsert's own condition is checked again under the row's lock, so of two claimants
        // taking over an expired claim, or inserting a new key, exactly one wins; the other gets no row (its
        // snapshot predates the winner's commit) and sends the statement again.
        let claim = format!(
            "WITH live AS (\n\
                 SELECT owner, fingerprint, status, replayable, headers, body FROM {t}\n\
                 WHERE key = $1 AND expires_at > {now} AND owner IS DISTINCT FROM $2\n\
             ), claimed AS (\n\
                 INSERT INTO {t} AS held (key, owner, fingerprint, expires_at)\n\
                 SELECT $1, $2, $3, {now} + $4::bigint * interval '1 millisecond' WHERE NOT EXISTS (SELECT FROM live)\n\
                 ON CONFLICT (key) DO UPDATE SET\n\
                     owner = excluded.owner,\n\
                     fingerprint = CASE WHEN held.expires_at > {now} THEN held.fingerprint\n\
                                        ELSE excluded.fingerprint END,\n\
                     status = NULL, replayable = NULL, headers = NULL, body = NULL,\n\
                     expires_at = excluded.expires_at\n\
                 WHERE held.expires_at <= {now} OR held.owner = excluded.owner\n\
                 RETURNING key\n\
             )\n\
             SELECT true AS owned, NULL::text AS owner, NULL::text AS fingerprint, NULL::smallint AS status,\n\
                    NULL::boolean AS replayable, NULL::jsonb AS headers, NULL::bytea AS body FROM claimed\n\
             UNION ALL\n\
             SELECT false, owner, fingerprint, status, replayable, headers, body FROM live"
        );
        // Applied to the caller's claim, expired or not, and to a free key (absent, or its row expired: nobody
        // else ran the request since); never over a live claim of another owner or a live record.
        let complete = format!(
            "WITH done AS (\n\
                 INSERT INTO {t} AS held (key, owner, fingerprint, status, replayable, headers, body, expires_at)\n\
                 VALUES ($1, NULL, $3, $4, $5, $6, $7, {now} + $8::bigint * interval '1 millisecond')\n\
                 ON CONFLICT (key) DO UPDATE SET\n\
                     owner = NULL, fingerprint = excluded.fingerprint, status = excluded.status,\n\
                     replayable = excluded.replayable, headers = excluded.headers, body = excluded.body,\n\
                     expires_at = excluded.expires_at\n\
                 WHERE held.owner = $2::text OR held.expires_at <= {now}\n\
                 RETURNING key\n\
             )\n\
             SELECT done.key FROM done, LATERAL pg_notify($9, done.key)"
        );
        let release = format!(
            "WITH gone AS (\n\
                 DELETE FROM {t} WHERE key = $1 AND owner = $2 AND expires_at > {now} RETURNING key\n\
             )\n\
             SELECT gone.key FROM gone, LATERAL pg_notify($3, gone.key)"
        );
        // The caller's live claim is extended; a free key is claimed again for it.
        let renew = format!(
            "INSERT INTO {t} AS held (key, owner, fingerprint, expires_at)\n\
             VALUES ($1, $2, $3, {now} + $4::bigint * interval '1 millisecond')\n\
             ON CONFLICT (key) DO UPDATE SET\n\
                 owner = excluded.owner,\n\
                 fingerprint = CASE WHEN held.expires_at > {now} THEN held.fingerprint ELSE excluded.fingerprint END,\n\
                 status = NULL, replayable = NULL, headers = NULL, body = NULL,\n\
                 expires_at = excluded.expires_at\n\
             WHERE held.owner = excluded.owner OR held.expires_at <= {now}\n\
             RETURNING key"
        );
        let lease_left = format!(
            "SELECT ceil(extract(epoch FROM expires_at - {now}) * 1000)::bigint AS left_ms FROM {t}\n\
             WHERE key = $1 AND owner IS NOT NULL AND expires_at > {now}"
        );
        let inspect = format!(
            "SELECT owner, fingerprint, status, replayable, headers, body FROM {t}\n\
             WHERE key = $1 AND expires_at > {now}"
        );
        // A live record, an expired row, or a row this build cannot read (a fingerprint that is not 64 hex digits)
        // is removed; a live in-flight claim never is.
        let forget = format!(
            "WITH gone AS (\n\
                 DELETE FROM {t}\n\
                 WHERE key = $1 AND (owner IS NULL OR expires_at <= {now} OR fingerprint !~ '^[0-9a-f]{{64}}$')\n\
                 RETURNING key, expires_at > {now} AS live\n\
             )\n\
             SELECT EXISTS (SELECT FROM gone, LATERAL pg_notify($2, gone.key) WHERE gone.live) AS removed,\n\
                    EXISTS (SELECT FROM {t} WHERE key = $1 AND owner IS NOT NULL AND expires_at > {now}\n\
                            AND fingerprint ~ '^[0-9a-f]{{64}}$') AS in_flight"
        );
        // Rows locked by a claim taking one over are skipped, and each row is checked again as it is deleted.
        let sweep = format!(
            "DELETE FROM {t} WHERE key IN (\n\
                 SELECT key FROM {t} WHERE expires_at <= {now} ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED\n\
             ) AND expires_at <= {now}"
        );
        Self { table, channel, claim, complete, release, renew, lease_left, inspect, forget, sweep }
    }
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
