use idem::idempotent;

#[idempotent(crate = 5)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
