//! Service identity and isolation: which service a schema belongs to, and a role per service.

use factum::Error;
use factum::bus::ServiceName;
use sqlx::PgPool;

use crate::error::to_error;
use crate::schema::SchemaName;
use crate::store::PostgresStore;

impl PostgresStore {
    /// The service this store was opened for ([`StoreOptions::for_service`]), if any.
    ///
    /// [`StoreOptions::for_service`]: crate::StoreOptions::for_service
    pub fn service(&self) -> Option<&ServiceName> {
        self.options().service()
    }

    /// The service the schema belongs to, as recorded by the first migration of a store opened
    /// for a service; `None` when no service claimed it (or it is not migrated).
    pub async fn service_owner(&self) -> Result<Option<String>, Error> {
        let migrated: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!("{}.service", self.schema().quoted()))
            .fetch_one(self.pool())
            .await
            .map_err(|e| to_error(e, "service check"))?;
        if !migrated {
            return Ok(None);
        }
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT name FROM {}.service",
            self.schema().quoted()
        )))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| to_error(e, "service check"))
    }

    /// Records this store's service as the schema's owner if it has none, then checks the owner
    /// is this store's service. Nothing to do for a store opened for no service.
    pub(crate) async fn claim_service(&self, operation: &'static str) -> Result<(), Error> {
        let Some(service) = self.service() else {
            return Ok(());
        };
        let owner: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "WITH claimed AS (INSERT INTO {schema}.service (name) VALUES ($1) \
                 ON CONFLICT (singleton) DO NOTHING RETURNING name) \
             SELECT name FROM claimed UNION ALL SELECT name FROM {schema}.service LIMIT 1",
            schema = self.schema().quoted()
        )))
        .bind(service.as_str())
        .fetch_one(self.pool())
        .await
        .map_err(|e| to_error(e, operation))?;
        self.owner_verdict(service, Some(owner))
    }

    /// Checks the schema's recorded owner against this store's service (a schema no service
    /// claimed yet passes; the first migration or append claims it).
    pub(crate) async fn check_service(&self, _operation: &'static str) -> Result<(), Error> {
        let Some(service) = self.service() else {
            return Ok(());
        };
        let owner = self.service_owner().await?;
        self.owner_verdict(service, owner)
    }

    /// The first append of a store opened for a service claims or checks the owner once.
    pub(crate) async fn ensure_service(&self) -> Result<(), Error> {
        if self.service().is_none() {
            return Ok(());
        }
        self.service_checked()
            .get_or_try_init(|| self.claim_service("append"))
            .await
            .map(|_| ())
    }

    fn owner_verdict(&self, service: &ServiceName, owner: Option<String>) -> Result<(), Error> {
        match owner {
            Some(owner) if owner != service.as_str() => Err(Error::WrongService {
                expected: service.to_string(),
                owner,
                location: format!("schema `{}`", self.schema()),
            }),
            _ => Ok(()),
        }
    }
}

/// A PostgreSQL role for one service with access to its own store only: it owns its schema
/// (so it can migrate it and use every table in it), may connect to its own database, and
/// nothing else.
///
/// ```
/// use factum_postgres::{SchemaName, ServiceRole};
/// let role = ServiceRole::new("orders", "orders_db", SchemaName::new("factum")?);
/// let sql = role.statements().join(";\n");
/// assert!(sql.contains(r#"CREATE SCHEMA IF NOT EXISTS "factum" AUTHORIZATION "orders""#));
/// assert!(sql.contains(r#"REVOKE ALL ON DATABASE "orders_db" FROM PUBLIC"#));
/// # Ok::<(), factum::Error>(())
/// ```
///
/// Run [`statements`](Self::statements) as an administrator (or [`apply`](Self::apply) on an
/// administrator's pool connected to the service's database); give the role a password or
/// certificate with your usual tooling. For two services in one database, give each a schema of
/// its own: a role has no rights on another role's schema.
#[derive(Clone, Debug)]
pub struct ServiceRole {
    role: String,
    database: String,
    schema: SchemaName,
    password: Option<String>,
}

impl ServiceRole {
    /// Role `role` for the store in `schema` of `database`.
    pub fn new(role: impl Into<String>, database: impl Into<String>, schema: SchemaName) -> Self {
        Self {
            role: role.into(),
            database: database.into(),
            schema,
            password: None,
        }
    }

    /// Lets the role log in with `password` (otherwise it is created `LOGIN` with no password:
    /// set one, or use another authentication method).
    #[must_use]
    pub fn with_password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// The SQL statements that create the role and its grants, in order. Idempotent except for
    /// `CREATE ROLE`, which fails when the role exists.
    pub fn statements(&self) -> Vec<String> {
        let role = quote_ident(&self.role);
        let database = quote_ident(&self.database);
        let schema = self.schema.quoted();
        let login = match &self.password {
            Some(password) => format!("LOGIN PASSWORD {}", quote_literal(password)),
            None => "LOGIN".to_owned(),
        };
        vec![
            format!("CREATE ROLE {role} {login} NOSUPERUSER NOCREATEDB NOCREATEROLE"),
            // Only roles granted CONNECT reach the service's database.
            format!("REVOKE ALL ON DATABASE {database} FROM PUBLIC"),
            format!("GRANT CONNECT, TEMPORARY ON DATABASE {database} TO {role}"),
            // Nobody but the owner creates objects in `public`.
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC".to_owned(),
            format!("CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {role}"),
            format!("ALTER SCHEMA {schema} OWNER TO {role}"),
        ]
    }

    /// Runs [`statements`](Self::statements) on `admin`, a pool connected to the service's
    /// database as a role allowed to create roles.
    pub async fn apply(&self, admin: &PgPool) -> Result<(), Error> {
        for statement in self.statements() {
            sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
                .execute(admin)
                .await
                .map_err(|e| to_error(e, "create service role"))?;
        }
        Ok(())
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}
