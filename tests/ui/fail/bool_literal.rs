use idem::idempotent;

#[idempotent(validate_signature = 1)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
