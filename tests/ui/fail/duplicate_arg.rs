use idem::idempotent;

#[idempotent(ttl = 60, wait_timeout = 1, ttl = 30)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
