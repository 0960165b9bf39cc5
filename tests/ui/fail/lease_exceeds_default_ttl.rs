use idem::idempotent;

#[idempotent(lease = 90000)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
