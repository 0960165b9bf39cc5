use idem::idempotent;

#[idempotent]
fn handler() -> &'static str {
    "ok"
}

fn main() {}
