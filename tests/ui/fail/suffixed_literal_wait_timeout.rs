use idem::idempotent;

#[idempotent(wait_timeout = 2.5s)]
async fn seconds() -> &'static str {
    "ok"
}

#[idempotent(wait_timeout = 250ms)]
async fn millis() -> &'static str {
    "ok"
}

fn main() {}
