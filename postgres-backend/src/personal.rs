//! Personal data that can be forgotten (crypto-shredding) on PostgreSQL: [`PgKeyStore`], the
//! store's encrypt/decrypt hooks and [`PostgresStore::forget_subject`].
//!
//! With the `personal` feature, a store given a [`Shredder`](factum::personal::Shredder)
//! ([`PostgresStore::with_shredder`]) encrypts personal fields in every append (also
//! [`append_in`](PostgresStore::append_in) and group commit) and decrypts them in every read
//! (stream reads, aggregate loads, the global log that subscriptions and projections read).
//! Without the feature the hooks do nothing, and appends of personal fields are refused.

use factum::{AppendRequest, Error, RecordedEvent};

use crate::store::PostgresStore;

#[cfg(feature = "personal")]
pub use enabled::PgKeyStore;

impl PostgresStore {
    /// Encrypts the request's personal fields, and records which subjects the stream holds
    /// (on `conn` when the append runs on the caller's connection).
    pub(crate) async fn seal(
        &self,
        conn: Option<&mut sqlx::PgConnection>,
        request: AppendRequest,
    ) -> Result<AppendRequest, Error> {
        #[cfg(feature = "personal")]
        if let Some(shredder) = self.shredder() {
            let mut request = request;
            let subjects = shredder.seal(&mut request.events).await?;
            if !subjects.is_empty() {
                self.record_subjects(conn, &request.stream, &subjects)
                    .await?;
            }
            return Ok(request);
        }
        let _ = conn;
        Ok(request)
    }

    /// Decrypts a stored event's personal fields (placeholders for forgotten subjects).
    pub(crate) async fn open(&self, event: RecordedEvent) -> Result<RecordedEvent, Error> {
        #[cfg(feature = "personal")]
        if let Some(shredder) = self.shredder() {
            let mut event = event;
            shredder.open(&mut event).await?;
            return Ok(event);
        }
        Ok(event)
    }

    /// Decrypts every event of a page.
    pub(crate) async fn open_all(
        &self,
        events: Vec<RecordedEvent>,
    ) -> Result<Vec<RecordedEvent>, Error> {
        #[cfg(feature = "personal")]
        if self.shredder().is_some() {
            let mut opened = Vec::with_capacity(events.len());
            for event in events {
                opened.push(self.open(event).await?);
            }
            return Ok(opened);
        }
        Ok(events)
    }

    /// Whether stream reads must go through [`open`](Self::open) (a payload-only read cannot:
    /// decryption needs the event id).
    pub(crate) fn decrypts(&self) -> bool {
        #[cfg(feature = "personal")]
        return self.shredder().is_some();
        #[cfg(not(feature = "personal"))]
        false
    }
}

#[cfg(feature = "personal")]
mod enabled {
    use factum::personal::{
        ForgetOutcome, KeyLookup, KeyStore, Shredder, SubjectForgotten, SubjectId, SubjectKey,
    };
    use factum::{AppendRequest, Error, EventMetadata, NewEvent, StreamId};

    use crate::error::to_error;
    use crate::schema::SchemaName;
    use crate::store::PostgresStore;

    /// Subjects' keys in the service's own schema (table `personal_keys`, migration 0008),
    /// beside its events: forgetting a subject sets its key to NULL for good and records when.
    ///
    /// The keys are as safe as the database: anyone who can read `personal_keys` and `events`
    /// can decrypt. Where that is too weak, implement [`KeyStore`] over a KMS. Backups of the
    /// schema hold the keys of their time: a subject forgotten since is readable in an old backup
    /// until it expires (see the book's "Personal data" chapter).
    ///
    /// ```no_run
    /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
    /// use factum::personal::Shredder;
    /// use factum_postgres::PgKeyStore;
    ///
    /// let keys = PgKeyStore::new(&store);
    /// let store = store.with_shredder(Shredder::new(keys));
    /// # Ok(()) }
    /// ```
    #[derive(Clone, Debug)]
    pub struct PgKeyStore {
        pool: sqlx::PgPool,
        schema: SchemaName,
    }

    impl PgKeyStore {
        /// The key store in `store`'s schema, on its pool.
        pub fn new(store: &PostgresStore) -> Self {
            Self {
                pool: store.pool().clone(),
                schema: store.schema().clone(),
            }
        }

        async fn lookup(&self, subject: &SubjectId) -> Result<KeyLookup, Error> {
            let s = self.schema.quoted();
            let row: Option<(Option<Vec<u8>>, bool)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT key, forgotten_at IS NOT NULL FROM {s}.personal_keys WHERE subject = $1"
                )))
                .bind(subject.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| to_error(e, "read a subject key"))?;
            Ok(match row {
                None => KeyLookup::Missing,
                Some((_, true)) | Some((None, _)) => KeyLookup::Forgotten,
                Some((Some(key), false)) => KeyLookup::Key(SubjectKey::from_slice(&key)?),
            })
        }
    }

    impl KeyStore for PgKeyStore {
        async fn key(&self, subject: &SubjectId) -> Result<KeyLookup, Error> {
            self.lookup(subject).await
        }

        async fn create_key(
            &self,
            subject: &SubjectId,
            candidate: SubjectKey,
        ) -> Result<SubjectKey, Error> {
            let s = self.schema.quoted();
            // The primary key orders this with `forget`: once a subject's row says forgotten, no
            // key is inserted again.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {s}.personal_keys (subject, key) VALUES ($1, $2) ON CONFLICT (subject) DO NOTHING"
            )))
            .bind(subject.as_str())
            .bind(candidate.as_bytes().as_slice())
            .execute(&self.pool)
            .await
            .map_err(|e| to_error(e, "create a subject key"))?;
            match self.lookup(subject).await? {
                KeyLookup::Key(key) => Ok(key),
                _ => Err(Error::InvalidArgument(format!(
                    "data subject `{subject}` was forgotten: its personal data is not written again; give the person a new subject id"
                ))),
            }
        }

        async fn forget(&self, subject: &SubjectId) -> Result<bool, Error> {
            let s = self.schema.quoted();
            let had_key: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "WITH before AS (SELECT key IS NOT NULL AS had FROM {s}.personal_keys WHERE subject = $1 FOR UPDATE)
                 , done AS (
                    INSERT INTO {s}.personal_keys (subject, key, forgotten_at) VALUES ($1, NULL, now())
                    ON CONFLICT (subject) DO UPDATE SET key = NULL,
                        forgotten_at = coalesce({s}.personal_keys.forgotten_at, now())
                 )
                 SELECT had FROM before"
            )))
            .bind(subject.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| to_error(e, "forget a subject"))?;
            Ok(had_key.unwrap_or(false))
        }
    }

    impl PostgresStore {
        /// Stores personal fields encrypted with `shredder`'s keys and decrypts them on every
        /// read (see [`factum::personal`]); [`forget_subject`](Self::forget_subject) forgets.
        /// Usually over a [`PgKeyStore`] in the same schema.
        ///
        /// Each append holding personal fields costs one more statement before the append (it
        /// records which subjects the stream holds, for `forget_subject`), plus a key lookup per
        /// subject the shredder has not cached; stream reads with a shredder read whole rows
        /// (decryption needs the event id).
        #[must_use]
        pub fn with_shredder(mut self, shredder: Shredder) -> Self {
            self.set_shredder(shredder);
            self
        }

        pub(crate) async fn record_subjects(
            &self,
            conn: Option<&mut sqlx::PgConnection>,
            stream: &StreamId,
            subjects: &[SubjectId],
        ) -> Result<(), Error> {
            let s = self.schema().quoted();
            let subjects: Vec<&str> = subjects.iter().map(SubjectId::as_str).collect();
            let sql = format!(
                "INSERT INTO {s}.personal_streams (subject, stream_id) SELECT unnest($1::text[]), $2 ON CONFLICT DO NOTHING"
            );
            let query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(subjects)
                .bind(stream.as_str());
            match conn {
                Some(conn) => query.execute(conn).await,
                None => query.execute(self.pool()).await,
            }
            .map_err(|e| to_error(e, "record a stream's data subjects"))?;
            Ok(())
        }

        /// Forgets a data subject: deletes its key through the store's shredder (its personal
        /// fields read as placeholders from now on, everywhere), deletes the snapshots of every
        /// stream holding its personal fields (rebuilt from events on their next load), and
        /// appends a [`SubjectForgotten`] marker to
        /// [`SubjectId::forgotten_stream`] for read models to erase their copies. Safe to
        /// repeat (each call appends a marker).
        ///
        /// Fails with [`Error::InvalidArgument`] when the store has no shredder.
        ///
        /// ```no_run
        /// # async fn run(store: factum_postgres::PostgresStore) -> Result<(), factum::Error> {
        /// use factum::personal::SubjectId;
        ///
        /// let done = store.forget_subject(&SubjectId::new("c-7").expect("an id")).await?;
        /// println!("{} snapshots discarded", done.snapshots_deleted);
        /// # Ok(()) }
        /// ```
        pub async fn forget_subject(&self, subject: &SubjectId) -> Result<ForgetOutcome, Error> {
            let shredder = self.shredder().ok_or_else(|| {
                Error::InvalidArgument(
                    "this store has no shredder: give it one with `with_shredder`".into(),
                )
            })?;
            self.ensure_service().await?;
            let had_key = shredder.forget(subject).await?;
            let s = self.schema().quoted();
            let streams: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT stream_id FROM {s}.personal_streams WHERE subject = $1 ORDER BY stream_id"
            )))
            .bind(subject.as_str())
            .fetch_all(self.pool())
            .await
            .map_err(|e| to_error(e, "forget a subject"))?;
            let deleted = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {s}.snapshots WHERE stream_id = ANY($1)"
            )))
            .bind(&streams)
            .execute(self.pool())
            .await
            .map_err(|e| to_error(e, "forget a subject"))?
            .rows_affected();
            let marker = SubjectForgotten {
                subject: subject.clone(),
            };
            let event = NewEvent::encode(&marker, EventMetadata::default())
                .map_err(|e| Error::permanent("forget a subject", e))?;
            let appended = factum::EventStore::append(
                self,
                AppendRequest::new(subject.forgotten_stream(), vec![event]),
            )
            .await?;
            Ok(ForgetOutcome::new(
                subject.clone(),
                had_key,
                streams
                    .into_iter()
                    .filter_map(|s| StreamId::new(s).ok())
                    .collect(),
                deleted,
                appended.positions[0],
            ))
        }
    }
}
