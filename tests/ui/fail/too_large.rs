use idem::idempotent;

#[idempotent(ttl = 1e400)]
async fn infinite() -> &'static str {
    "ok"
}

#[idempotent(ttl = 99999999999999999999999)]
async fn beyond_u64() -> &'static str {
    "ok"
}

#[idempotent(ttl = 1000000000.000000001)]
async fn just_above() -> &'static str {
    "ok"
}

fn main() {}
