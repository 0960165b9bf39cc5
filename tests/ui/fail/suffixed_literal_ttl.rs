use idem::idempotent;

// Each suffix used to be dropped: `500ms` was 500 seconds, `5h` 5 seconds.
#[idempotent(ttl = 500ms)]
async fn millis() -> &'static str {
    "ok"
}

#[idempotent(ttl = 5h)]
async fn hours() -> &'static str {
    "ok"
}

#[idempotent(ttl = 60u64)]
async fn typed_int() -> &'static str {
    "ok"
}

#[idempotent(ttl = 1.0f64)]
async fn typed_float() -> &'static str {
    "ok"
}

fn main() {}
