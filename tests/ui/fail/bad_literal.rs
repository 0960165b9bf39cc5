use idem::idempotent;

#[idempotent(ttl = "60")]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
