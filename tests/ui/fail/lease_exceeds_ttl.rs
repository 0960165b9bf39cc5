use idem::idempotent;

#[idempotent(ttl = 10, lease = 30)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
