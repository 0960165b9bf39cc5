use idem::idempotent;

#[idempotent(lease = 3s)]
async fn seconds() -> &'static str {
    "ok"
}

#[idempotent(lease = 1min)]
async fn minutes() -> &'static str {
    "ok"
}

// Not a unit: the number without its suffix.
#[idempotent(lease = 30x)]
async fn unknown() -> &'static str {
    "ok"
}

fn main() {}
