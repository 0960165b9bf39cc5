use idem::idempotent;

// A sign written on a literal is refused, even on zero.
#[idempotent(wait_timeout = -0.0)]
async fn wait() -> &'static str {
    "ok"
}

#[idempotent(lease = -(0))]
async fn lease() -> &'static str {
    "ok"
}

fn main() {}
