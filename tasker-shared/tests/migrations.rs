//! Services migrate at start-up, many at once: that must be safe and
//! idempotent, including when the database role is named like the schema
//! (`search_path` starts with `"$user"`, so an unqualified history table would
//! resolve differently once the `tasker` schema exists).

#![allow(clippy::unwrap_used)]

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};

#[tokio::test]
async fn concurrent_and_repeated_migrations_apply_the_schema_once() {
    let url = std::env::var("DATABASE_URL").expect("DATABASE_URL is set by scripts/test");
    let name = format!("tasker_migrate_{}", uuid::Uuid::now_v7().simple());
    let mut admin = PgConnection::connect(&url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    let options: PgConnectOptions = url.parse::<PgConnectOptions>().unwrap().database(&name);

    let mut runs = Vec::new();
    for _ in 0..4 {
        let options = options.clone();
        runs.push(tokio::spawn(async move {
            let pool = PgPoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
            tasker_shared::db::migrate(&pool).await
        }));
    }
    for run in runs {
        run.await.unwrap().expect("every concurrent migration succeeds");
    }
    let pool = PgPoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
    tasker_shared::db::migrate(&pool).await.expect("migrating again is a no-op");

    let (applied,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM tasker._sqlx_migrations WHERE success").fetch_one(&pool).await.unwrap();
    assert_eq!(applied as usize, tasker_shared::db::MIGRATOR.iter().count());
    let (stray,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_tables WHERE tablename = '_sqlx_migrations' AND schemaname <> 'tasker'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stray, 0, "the history table lives only in the tasker schema");

    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut admin).await.unwrap();
}
