use idem::idempotent;

#[idempotent(crate = "::idem"x)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
