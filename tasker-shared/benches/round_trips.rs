//! What a hop's round trips cost through sqlx: a transaction of two
//! statements (`BEGIN`, two `SELECT`s, `COMMIT`: four round trips, the shape
//! of the worker's completing transaction before 0031) against one statement
//! sent alone (one round trip, the shape after). The statements do no work,
//! so the difference is the round trips themselves.
//!
//! `DATABASE_URL=... cargo bench -p tasker-shared --bench round_trips`

use std::time::Instant;

use anyhow::Context;

const HOPS: u32 = 4_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    // As the services' pools: no ping before each use.
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(2).test_before_acquire(false).connect(&url).await?;
    println!("{HOPS} hops a round; microseconds a hop");
    println!("round  transaction (4 round trips)  one statement (1)  ratio");
    for round in 1..=5 {
        let started = Instant::now();
        for _ in 0..HOPS {
            let mut tx = pool.begin().await?;
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&mut *tx).await?;
            sqlx::query_scalar::<_, i32>("SELECT 2").fetch_one(&mut *tx).await?;
            tx.commit().await?;
        }
        let transaction = started.elapsed().as_secs_f64() * 1e6 / f64::from(HOPS);
        let started = Instant::now();
        for _ in 0..HOPS {
            sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&pool).await?;
        }
        let statement = started.elapsed().as_secs_f64() * 1e6 / f64::from(HOPS);
        println!("{round:>5}  {transaction:>28.1}  {statement:>17.1}  {:>5.2}", transaction / statement);
    }
    Ok(())
}
