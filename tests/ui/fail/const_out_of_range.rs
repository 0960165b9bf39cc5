use idem::idempotent;

const NEGATIVE: f64 = -1.0;
const CENTURY: u64 = 100 * 365 * 86_400;

#[idempotent(wait_timeout = NEGATIVE)]
async fn negative() -> &'static str {
    "ok"
}

#[idempotent(ttl = CENTURY)]
async fn too_large() -> &'static str {
    "ok"
}

#[idempotent(wait_timeout = 1e-12 * 2.0)]
async fn below_nanosecond() -> &'static str {
    "ok"
}

#[idempotent(ttl = f64::NAN)]
async fn not_a_number() -> &'static str {
    "ok"
}

fn main() {}
