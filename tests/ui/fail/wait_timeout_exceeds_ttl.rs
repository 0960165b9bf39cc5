use idem::idempotent;

#[idempotent(wait_timeout = 12.5, ttl = 10)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
