use idem::idempotent;

const ORDER_TTL: i32 = 60;

#[idempotent(ttl = ORDER_TTL)]
async fn handler() -> &'static str {
    "ok"
}

fn main() {}
