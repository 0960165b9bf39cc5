use idem::idempotent;

#[idempotent(ttl = 0)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
