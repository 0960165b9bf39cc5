use idem::idempotent;

#[idempotent(wait_timeout = -1)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
