use idem::idempotent;

// Used to round to 0: an instant answer where a wait was asked for.
#[idempotent(wait_timeout = 0.0000000001)]
async fn wait() -> &'static str {
    "ok"
}

// Used to be reported as "must be greater than zero", though it is not zero.
#[idempotent(ttl = 0.0000000001)]
async fn ttl() -> &'static str {
    "ok"
}

#[idempotent(lease = 1.0000000005)]
async fn lease() -> &'static str {
    "ok"
}

fn main() {}
