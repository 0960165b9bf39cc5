use axum::extract::State;
use idem::idempotent;

#[derive(Clone)]
struct Db;

#[derive(Clone)]
struct Mailer;

#[idempotent]
async fn handler(State(_db): State<Db>, State(_mailer): State<Mailer>, body: String) -> String {
    body
}

fn main() {}
