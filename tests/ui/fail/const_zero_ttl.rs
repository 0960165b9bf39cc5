use idem::idempotent;
use std::time::Duration;

const ORDER_TTL: u64 = 0;
const LEASE: Duration = Duration::ZERO;

#[idempotent(ttl = ORDER_TTL)]
async fn zero_ttl() -> &'static str {
    "ok"
}

#[idempotent(lease = LEASE)]
async fn zero_lease() -> &'static str {
    "ok"
}

fn main() {}
