use idem::idempotent;

#[idempotent(ttl = 60, policy = "payments")]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
