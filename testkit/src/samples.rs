//! The compatibility check: every stored event shape, replayed through the current code.
//!
//! An event store outlives every version of the code that writes it. Keep a folder of sample
//! payloads, one file per stored (wire name, schema version) and payload shape, exported from a
//! real database (`export`, feature `postgres`), and check in a test that the current code
//! still decodes and upcasts every one of them:
//!
//! ```
//! use factum_testkit::samples::Samples;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bank/samples");
//! Samples::load(dir)?
//!     .check()
//!     .decodes::<bank::AccountEvent>()
//!     .run()?; // Err lists every sample that fails and every version without a sample
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The check fails, naming each one:
//! * every sample no registered type decodes any more: its file, wire name, schema version and
//!   the decoding or upcasting error;
//! * every sample whose wire name no registered type lists (a removed or renamed event); the
//!   tombstone of a deleted stream ([`factum::STREAM_DELETED`]) is the store's and is skipped;
//! * every (wire name, version) a registered type decodes ([`Event::event_versions`]) or the
//!   store holds ([`CompatibilityCheck::expect_stored`]) that has no sample.
//!
//! # The sample files
//! One JSON object per file, as `export` (feature `postgres`) writes it:
//!
//! ```json
//! {
//!   "event_type": "customer.registered",
//!   "schema_version": 1,
//!   "recorded_at": "2026-03-01T09:30:00Z",
//!   "metadata": { "correlation_id": null, "causation_id": null },
//!   "payload": { "name": "Ada Lovelace" }
//! }
//! ```
//!
//! `metadata` may be left out (empty metadata). Files are named
//! `{wire name}.v{version}.{shape}.json`, where `shape` is a hash of the payload's structure
//! (its keys and the kinds of its values, not the values): two stored events with the same
//! structure need one sample. Samples hold real payloads: review them for personal data before
//! checking them in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use factum::{DecodeError, Event, EventMetadata, RawValue, Stored};
use serde::{Deserialize, Serialize};

/// One stored event kept as a sample: what a store recorded, read back from a file.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The file it was read from.
    pub file: PathBuf,
    /// The stored wire name.
    pub event_type: String,
    /// The stored schema version.
    pub schema_version: u32,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Its metadata.
    pub metadata: EventMetadata,
    /// The payload as stored.
    pub payload: Box<RawValue>,
}

impl Sample {
    /// The sample as decoding sees a stored event.
    pub fn stored(&self) -> Stored<'_> {
        Stored::new(&self.event_type, self.schema_version, &self.payload)
            .recorded_at(self.recorded_at)
            .with_metadata(&self.metadata)
    }
}

/// The on-disk form of a sample.
#[derive(Serialize, Deserialize)]
struct SampleFile {
    event_type: String,
    schema_version: u32,
    recorded_at: DateTime<Utc>,
    #[serde(default)]
    metadata: EventMetadata,
    payload: Box<RawValue>,
}

/// A folder of samples could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SampleError {
    /// Reading or writing a file or folder failed.
    #[error("sample file or folder {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file in the folder is not a sample.
    #[error(
        "{path} is not a sample (expected a JSON object with event_type, schema_version, recorded_at and payload): {source}"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// Reading events from the database failed.
    #[cfg(feature = "postgres")]
    #[error("reading the stored events failed: {0}")]
    Database(#[source] sqlx::Error),
}

/// The samples of a folder: every `*.json` file in it (not in subfolders), in file-name order.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    samples: Vec<Sample>,
}

impl Samples {
    /// Reads every `*.json` file of `dir`. A file that is not a sample is an error naming it.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, SampleError> {
        let dir = dir.as_ref();
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| SampleError::Io { path, source }
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            if path.extension().is_some_and(|e| e == "json") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let mut samples = Vec::with_capacity(files.len());
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            let file: SampleFile =
                serde_json::from_str(&text).map_err(|source| SampleError::Invalid {
                    path: path.clone(),
                    source,
                })?;
            samples.push(Sample {
                file: path,
                event_type: file.event_type,
                schema_version: file.schema_version,
                recorded_at: file.recorded_at,
                metadata: file.metadata,
                payload: file.payload,
            });
        }
        Ok(Self { samples })
    }

    /// The samples, in file-name order.
    pub fn iter(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    /// How many samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True for an empty folder.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Starts a compatibility check of these samples: register the event types with
    /// [`decodes`](CompatibilityCheck::decodes), then [`run`](CompatibilityCheck::run).
    pub fn check(&self) -> CompatibilityCheck<'_> {
        CompatibilityCheck {
            samples: self,
            decoders: Vec::new(),
            stored: BTreeSet::new(),
        }
    }
}

/// One registered event type, type-erased.
struct Decoder {
    type_name: &'static str,
    names: &'static [&'static str],
    versions: &'static [(&'static str, u32)],
    decode: fn(&Stored<'_>) -> Result<usize, DecodeError>,
}

fn decode_count<E: Event>(stored: &Stored<'_>) -> Result<usize, DecodeError> {
    E::decode_all(stored).map(|events| events.len())
}

/// A compatibility check being set up: the samples, the event types that must decode them, and
/// the (name, version) pairs that must have a sample.
#[must_use = "a check does nothing until `run` or `assert`"]
pub struct CompatibilityCheck<'a> {
    samples: &'a Samples,
    decoders: Vec<Decoder>,
    stored: BTreeSet<(String, u32)>,
}

impl fmt::Debug for CompatibilityCheck<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompatibilityCheck")
            .field("samples", &self.samples.len())
            .field(
                "types",
                &self
                    .decoders
                    .iter()
                    .map(|d| d.type_name)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl CompatibilityCheck<'_> {
    /// Every sample whose wire name `E` lists in [`Event::event_types`] must decode as `E`
    /// (through [`Event::decode_all`]: upcasts, renames and splits included), and every
    /// (name, version) in [`Event::event_versions`] must have a sample. Register every event type
    /// of the service, projections' event enums too: each decodes the samples it lists.
    pub fn decodes<E: Event>(mut self) -> Self {
        self.decoders.push(Decoder {
            type_name: std::any::type_name::<E>(),
            names: E::event_types(),
            versions: E::event_versions(),
            decode: decode_count::<E>,
        });
        self
    }

    /// These (name, version) pairs must have a sample too: e.g. what a production store holds
    /// (`samples::stored_event_versions`, feature `postgres`), so an event version written by an
    /// older release that the current code no longer declares is caught.
    pub fn expect_stored<N: Into<String>>(
        mut self,
        pairs: impl IntoIterator<Item = (N, u32)>,
    ) -> Self {
        self.stored
            .extend(pairs.into_iter().map(|(name, v)| (name.into(), v)));
        self
    }

    /// Runs the check: `Ok` with what was checked, or an [`Incompatible`] naming every problem.
    pub fn run(self) -> Result<Checked, Incompatible> {
        let mut failures = Vec::new();
        let mut unclaimed = Vec::new();
        let mut covered: BTreeSet<(String, u32)> = BTreeSet::new();
        let mut decoded = 0;
        for sample in self.samples.iter() {
            covered.insert((sample.event_type.clone(), sample.schema_version));
            // The store's own tombstone of a deleted stream is no event type's to decode.
            if sample.event_type == factum::STREAM_DELETED {
                continue;
            }
            let mut claimed = false;
            for decoder in &self.decoders {
                if !decoder.names.contains(&sample.event_type.as_str()) {
                    continue;
                }
                claimed = true;
                match (decoder.decode)(&sample.stored()) {
                    Ok(_) => decoded += 1,
                    Err(error) => failures.push(Failure {
                        file: sample.file.clone(),
                        event_type: sample.event_type.clone(),
                        schema_version: sample.schema_version,
                        decoder: decoder.type_name,
                        error: factum::error_chain(&error),
                    }),
                }
            }
            if !claimed {
                unclaimed.push(Failure {
                    file: sample.file.clone(),
                    event_type: sample.event_type.clone(),
                    schema_version: sample.schema_version,
                    decoder: "",
                    error: String::new(),
                });
            }
        }
        let mut expected: BTreeMap<(String, u32), &'static str> = BTreeMap::new();
        for decoder in &self.decoders {
            for (name, version) in decoder.versions {
                expected
                    .entry(((*name).to_owned(), *version))
                    .or_insert(decoder.type_name);
            }
        }
        for pair in self
            .stored
            .iter()
            .filter(|(name, _)| name != factum::STREAM_DELETED)
        {
            expected.entry(pair.clone()).or_insert("the store");
        }
        let missing: Vec<Missing> = expected
            .into_iter()
            .filter(|(pair, _)| !covered.contains(pair))
            .map(|((event_type, schema_version), by)| Missing {
                event_type,
                schema_version,
                expected_by: by,
            })
            .collect();
        if failures.is_empty() && unclaimed.is_empty() && missing.is_empty() {
            Ok(Checked {
                samples: self.samples.len(),
                decoded,
                pairs: covered.len(),
            })
        } else {
            Err(Incompatible {
                failures,
                unclaimed,
                missing,
            })
        }
    }

    /// Runs the check and panics with the full report unless it passes: for tests.
    #[track_caller]
    pub fn assert(self) -> Checked {
        match self.run() {
            Ok(checked) => checked,
            Err(incompatible) => panic!("{incompatible}"),
        }
    }
}

/// What a passing check covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Checked {
    /// Sample files read.
    pub samples: usize,
    /// Successful decodes (a sample listed by two types counts twice).
    pub decoded: usize,
    /// Distinct (name, version) pairs the samples cover.
    pub pairs: usize,
}

/// A sample that no longer decodes (or that no registered type lists).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// The sample's file.
    pub file: PathBuf,
    /// Its wire name.
    pub event_type: String,
    /// Its schema version.
    pub schema_version: u32,
    /// The event type that failed to decode it (empty when none lists its name).
    pub decoder: &'static str,
    /// The decoding or upcasting error, with its sources (empty when none lists its name).
    pub error: String,
}

/// A (name, version) that must have a sample and has none.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Missing {
    /// The wire name.
    pub event_type: String,
    /// The schema version.
    pub schema_version: u32,
    /// The event type that decodes it, or `"the store"` for a pair from
    /// [`CompatibilityCheck::expect_stored`].
    pub expected_by: &'static str,
}

/// The compatibility check failed: every problem it found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub struct Incompatible {
    /// Samples a registered type lists but cannot decode.
    pub failures: Vec<Failure>,
    /// Samples whose wire name no registered type lists.
    pub unclaimed: Vec<Failure>,
    /// Pairs without a sample.
    pub missing: Vec<Missing>,
}

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "the current code is not compatible with the stored events: {} sample(s) fail to decode, {} have no event type, {} stored version(s) have no sample",
            self.failures.len(),
            self.unclaimed.len(),
            self.missing.len()
        )?;
        for failure in &self.failures {
            writeln!(
                f,
                "  {}: {:?} at schema version {} does not decode as {}: {}",
                failure.file.display(),
                failure.event_type,
                failure.schema_version,
                failure.decoder,
                failure.error
            )?;
        }
        for sample in &self.unclaimed {
            writeln!(
                f,
                "  {}: no registered type lists the wire name {:?} (version {}): register the type that decodes it with `decodes::<T>()`, or map the name with `renamed_from` or `split`",
                sample.file.display(),
                sample.event_type,
                sample.schema_version
            )?;
        }
        for missing in &self.missing {
            writeln!(
                f,
                "  no sample of {:?} at schema version {} (decoded by {}): export one from a database that stores it, or write one by hand",
                missing.event_type, missing.schema_version, missing.expected_by
            )?;
        }
        Ok(())
    }
}

/// A structural signature of a JSON value: keys and the kinds of values, not the values.
#[cfg(feature = "postgres")]
fn shape(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push('n'),
        Value::Bool(_) => out.push('b'),
        Value::Number(_) => out.push('#'),
        Value::String(_) => out.push('s'),
        Value::Array(items) => {
            let mut kinds: Vec<String> = items
                .iter()
                .map(|item| {
                    let mut s = String::new();
                    shape(item, &mut s);
                    s
                })
                .collect();
            kinds.sort();
            kinds.dedup();
            out.push('[');
            out.push_str(&kinds.join("|"));
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key).unwrap_or_default());
                out.push(':');
                shape(&map[key], out);
            }
            out.push('}');
        }
    }
}

/// The file name of a sample: `{name}.v{version}.{shape hash}.json` (FNV-1a, stable across
/// runs and platforms).
#[cfg(feature = "postgres")]
fn sample_file_name(event_type: &str, version: u32, payload: &serde_json::Value) -> String {
    let mut signature = String::new();
    shape(payload, &mut signature);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in signature.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let name: String = event_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}.v{version}.{:08x}.json", hash >> 32)
}

/// What an `export` (feature `postgres`) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Exported {
    /// Stored events read.
    pub events: u64,
    /// Sample files written (new shapes).
    pub written: Vec<PathBuf>,
    /// Sample files that were there already (shapes seen before).
    pub kept: usize,
    /// Every (name, version) the store holds.
    pub stored: BTreeSet<(String, u32)>,
}

/// Writes one sample per stored (name, version, payload shape) into `dir`, creating it. A sample
/// file that exists is kept as it is, so samples of events no longer in the store (archived,
/// deleted) stay. A second export of the same store writes nothing.
///
/// Every event of the store is read once, in log order (the first event of each shape is the
/// sample). Run it against a copy of production, or a replica; see the book's "Evolving events"
/// chapter.
#[cfg(feature = "postgres")]
pub async fn export(
    store: &factum_postgres::PostgresStore,
    dir: impl AsRef<Path>,
) -> Result<Exported, SampleError> {
    use futures_util::TryStreamExt;
    use sqlx::Row;

    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| SampleError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let sql = format!(
        "SELECT event_type, schema_version, payload::text, metadata::text, correlation_id, \
         causation_id, recorded_at FROM \"{}\".events ORDER BY global_position",
        store.schema().as_str()
    );
    let mut rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch(store.pool());
    let mut out = Exported::default();
    let mut seen = BTreeSet::new();
    while let Some(row) = rows.try_next().await.map_err(SampleError::Database)? {
        out.events += 1;
        let event_type: String = row.try_get(0).map_err(SampleError::Database)?;
        let version =
            u32::try_from(row.try_get::<i32, _>(1).map_err(SampleError::Database)?).unwrap_or(0);
        let payload: String = row.try_get(2).map_err(SampleError::Database)?;
        out.stored.insert((event_type.clone(), version));
        let value: serde_json::Value =
            serde_json::from_str(&payload).map_err(|source| SampleError::Invalid {
                path: dir.to_owned(),
                source,
            })?;
        let name = sample_file_name(&event_type, version, &value);
        if !seen.insert(name.clone()) {
            continue;
        }
        let path = dir.join(&name);
        if path.exists() {
            out.kept += 1;
            continue;
        }
        let metadata: String = row.try_get(3).map_err(SampleError::Database)?;
        let user: factum::Metadata =
            serde_json::from_str(&metadata).map_err(|source| SampleError::Invalid {
                path: path.clone(),
                source,
            })?;
        let correlation: Option<sqlx::types::Uuid> =
            row.try_get(4).map_err(SampleError::Database)?;
        let causation: Option<sqlx::types::Uuid> = row.try_get(5).map_err(SampleError::Database)?;
        let file = SampleFile {
            event_type,
            schema_version: version,
            recorded_at: row.try_get(6).map_err(SampleError::Database)?,
            metadata: EventMetadata {
                correlation_id: correlation.map(factum::CorrelationId::from_uuid),
                causation_id: causation.map(factum::CausationId::from_uuid),
                user,
            },
            payload: RawValue::from_string(payload).map_err(|source| SampleError::Invalid {
                path: path.clone(),
                source,
            })?,
        };
        let mut text =
            serde_json::to_string_pretty(&file).map_err(|source| SampleError::Invalid {
                path: path.clone(),
                source,
            })?;
        text.push('\n');
        std::fs::write(&path, text).map_err(|source| SampleError::Io {
            path: path.clone(),
            source,
        })?;
        out.written.push(path);
    }
    Ok(out)
}

/// Every (name, version) the store holds: pass it to [`CompatibilityCheck::expect_stored`].
#[cfg(feature = "postgres")]
pub async fn stored_event_versions(
    store: &factum_postgres::PostgresStore,
) -> Result<Vec<(String, u32)>, SampleError> {
    let sql = format!(
        "SELECT DISTINCT event_type, schema_version FROM \"{}\".events ORDER BY 1, 2",
        store.schema().as_str()
    );
    let rows: Vec<(String, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(store.pool())
        .await
        .map_err(SampleError::Database)?;
    Ok(rows
        .into_iter()
        .map(|(name, v)| (name, u32::try_from(v).unwrap_or(0)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_ignore_values_and_key_order() {
        let a = serde_json::json!({"b": 1, "a": ["x", "y"], "c": null});
        let b = serde_json::json!({"a": ["z"], "c": null, "b": 2.5});
        let c = serde_json::json!({"a": ["z"], "c": "now a string", "b": 2});
        let name = |v| sample_file_name("account.opened", 1, v);
        assert_eq!(name(&a), name(&b));
        assert_ne!(name(&a), name(&c));
        assert!(name(&a).starts_with("account.opened.v1."), "{}", name(&a));
        assert_ne!(name(&a), sample_file_name("account.opened", 2, &a));
    }
}
