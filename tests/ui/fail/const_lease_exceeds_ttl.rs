use idem::idempotent;

const ORDER_TTL: u64 = 10;
const ORDER_LEASE: u64 = 30;
const WAIT: f64 = 10.5;

#[idempotent(ttl = ORDER_TTL, lease = ORDER_LEASE)]
async fn both_const() -> &'static str {
    "ok"
}

#[idempotent(ttl = 10, lease = ORDER_LEASE)]
async fn literal_ttl() -> &'static str {
    "ok"
}

#[idempotent(ttl = ORDER_TTL, wait_timeout = WAIT)]
async fn wait_exceeds_const_ttl() -> &'static str {
    "ok"
}

#[idempotent(lease = ORDER_LEASE * 3_000)]
async fn exceeds_default_ttl() -> &'static str {
    "ok"
}

fn main() {}
