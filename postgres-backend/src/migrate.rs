//! Applying the embedded migrations inside the store's schema.

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::{Connection, PgConnection, PgPool};

use crate::error::to_error;
use crate::schema::SchemaName;

/// The migrations of the repository's `migrations/` folder, embedded at compile time.
pub(crate) static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// The newest migration version this build knows.
pub(crate) fn latest_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// An applied migration no longer matches the one embedded in this build.
#[derive(Debug, thiserror::Error)]
#[error(
    "migration {version} applied to schema `{schema}` differs from the one in this build (checksum mismatch): an applied migration was edited; restore the original file and put the change in a new migration"
)]
struct EditedMigration {
    version: i64,
    schema: String,
    #[source]
    source: MigrateError,
}

/// The database has migrations this build does not know (it is older than the schema).
#[derive(Debug, thiserror::Error)]
#[error(
    "schema `{schema}` has migration {version} applied, which this build does not know: run a newer version of the application"
)]
struct UnknownMigration {
    version: i64,
    schema: String,
    #[source]
    source: MigrateError,
}

/// Creates `schema` if needed and applies every pending migration inside it.
///
/// Safe to run concurrently from several processes: sqlx takes an advisory lock per database,
/// and the schema is created under a lock of its own.
pub async fn migrate(pool: &PgPool, schema: &SchemaName) -> Result<(), factum::Error> {
    // The session's search_path is changed below: never hand this connection back to the pool.
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| to_error(e, "migrate"))?
        .detach();
    let result = migrate_on(&mut conn, schema).await;
    let _ = conn.close().await;
    result
}

async fn migrate_on(conn: &mut PgConnection, schema: &SchemaName) -> Result<(), factum::Error> {
    let quoted = schema.quoted();
    // CREATE SCHEMA IF NOT EXISTS races with itself (unique violation on pg_namespace), so
    // creators take turns. The lock key is derived from the schema name.
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('factum.schema:' || $1, 0))")
        .bind(schema.as_str())
        .execute(&mut *conn)
        .await
        .map_err(|e| to_error(e, "migrate"))?;
    // An existing schema is not created again: `CREATE SCHEMA IF NOT EXISTS` needs the CREATE
    // privilege on the database even then, which a service's role (owning only its schema, see
    // `ServiceRole`) does not have.
    let exists: Result<bool, _> =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema.as_str())
            .fetch_one(&mut *conn)
            .await;
    let statement = match exists {
        Ok(true) => format!("SET search_path TO {quoted}"),
        _ => format!("CREATE SCHEMA IF NOT EXISTS {quoted}; SET search_path TO {quoted}"),
    };
    let created = sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(&mut *conn)
        .await
        .map_err(|e| to_error(e, "migrate"));
    let _ = sqlx::query("SELECT pg_advisory_unlock(hashtextextended('factum.schema:' || $1, 0))")
        .bind(schema.as_str())
        .execute(&mut *conn)
        .await;
    created?;
    // With search_path set to the schema, the migrations' unqualified names and sqlx's
    // `_sqlx_migrations` table all land in it.
    MIGRATOR
        .run_direct(None, conn, false)
        .await
        .map_err(|e| migrate_error(e, schema))
}

fn migrate_error(error: MigrateError, schema: &SchemaName) -> factum::Error {
    let schema = schema.to_string();
    match error {
        MigrateError::VersionMismatch(version) => factum::Error::permanent(
            "migrate",
            EditedMigration {
                version,
                schema,
                source: error,
            },
        ),
        MigrateError::VersionMissing(version) => factum::Error::permanent(
            "migrate",
            UnknownMigration {
                version,
                schema,
                source: error,
            },
        ),
        MigrateError::Execute(e) => to_error(e, "migrate"),
        other => factum::Error::permanent("migrate", other),
    }
}
