use idem::idempotent;

#[idempotent(ttl = 60, tll = 30)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
