//! Personal data that can be forgotten: crypto-shredding of event fields.
//!
//! A field of an event marked `#[personal(subject = other_field)]` (see
//! [`derive(Event)`](macro@crate::Event)) belongs to a *data subject*, named by another field of
//! the same event (usually a customer or user id). With the `personal` feature, a `Shredder`
//! given to the store encrypts each such field on append with that subject's own key
//! (XChaCha20-Poly1305, a random nonce per field, the event id, field name and subject bound in
//! as associated data) and decrypts it on every read. `Shredder::forget` (or a store's
//! `forget_subject`) deletes the key: from then on the field reads as a placeholder
//! ([`Forgettable::forgotten`], `"[forgotten]"` for a `String`), never as an error, while the
//! rest of the event loads as before.
//!
//! The book chapter "Personal data" says what this protects and what it does not.
//!
//! # The stored form
//! A personal field is a JSON object with one key, in three forms:
//!
//! * `{"factum:personal": {"subject": S, "value": V}}`: the plaintext form, what an event's
//!   `encode` writes and what readers hand to `decode` after decryption. A store refuses to
//!   append it ([`validate_batch`](crate::validate_batch)): only a store with a `Shredder`
//!   accepts personal fields, and stores them encrypted.
//! * `{"factum:encrypted": {"subject": S, "data": B}}`: what is stored; `B` is the base64 of the
//!   24-byte nonce followed by the ciphertext and its tag.
//! * `{"factum:forgotten": {"subject": S}}`: what readers see once S's key is deleted.
//!
//! The subject id is stored in the clear (it is how the key is found): use an opaque id, never
//! personal data itself (an email address is a bad subject).

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

use crate::event::{DecodeError, EncodeError, Event, Stored};

#[cfg(feature = "personal")]
mod keys;
#[cfg(feature = "personal")]
mod shredder;

#[cfg(feature = "personal")]
pub use keys::{DynKeyStore, InMemoryKeyStore, KeyLookup, KeyStore, SubjectKey};
#[cfg(feature = "personal")]
pub use shredder::{Shredder, ShredderOptions};

/// What a store's `forget_subject` did.
#[cfg(feature = "personal")]
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ForgetOutcome {
    /// The subject forgotten.
    pub subject: SubjectId,
    /// Whether it had a key (false when it had no personal data or was forgotten before).
    pub had_key: bool,
    /// The streams that hold its (now unreadable) personal fields.
    pub streams: Vec<crate::StreamId>,
    /// How many snapshots of those streams were deleted (rebuilt from events on next load).
    pub snapshots_deleted: u64,
    /// Where the [`SubjectForgotten`] marker was appended.
    pub marker: crate::GlobalPosition,
}

#[cfg(feature = "personal")]
impl ForgetOutcome {
    /// What a backend's `forget_subject` reports.
    pub fn new(
        subject: SubjectId,
        had_key: bool,
        streams: Vec<crate::StreamId>,
        snapshots_deleted: u64,
        marker: crate::GlobalPosition,
    ) -> Self {
        Self {
            subject,
            had_key,
            streams,
            snapshots_deleted,
            marker,
        }
    }
}

/// The key of a personal field's plaintext form.
pub const PLAINTEXT_KEY: &str = "factum:personal";
/// The key of a personal field's stored (encrypted) form.
pub const ENCRYPTED_KEY: &str = "factum:encrypted";
/// The key of a personal field whose subject was forgotten.
pub const FORGOTTEN_KEY: &str = "factum:forgotten";
/// What a forgotten `String` field reads as.
pub const PLACEHOLDER: &str = "[forgotten]";
/// The wire name of [`SubjectForgotten`], the marker event a store appends when it forgets a
/// subject.
pub const SUBJECT_FORGOTTEN: &str = "factum.subject_forgotten";
/// The category of the streams [`SubjectForgotten`] markers are appended to:
/// `"factum_forgotten-{subject}"`.
pub const FORGOTTEN_CATEGORY: &str = "factum_forgotten";

/// The id of a data subject: whose key encrypts a personal field.
///
/// Any non-empty text of at most 256 bytes without control characters; stored in the clear.
///
/// ```
/// use factum::personal::SubjectId;
/// assert_eq!(SubjectId::new("customer-7").unwrap().as_str(), "customer-7");
/// assert!(SubjectId::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubjectId(String);

/// A subject id was empty, too long or held a control character.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid data subject id {0:?}: it must be 1 to 256 bytes without control characters (use the person's opaque id, e.g. a customer id)"
)]
pub struct InvalidSubjectId(String);

impl SubjectId {
    /// The longest subject id accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Checks and wraps `value`.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidSubjectId> {
        let value = value.into();
        if value.is_empty() || value.len() > Self::MAX_LEN || value.chars().any(char::is_control) {
            return Err(InvalidSubjectId(value));
        }
        Ok(Self(value))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stream the store appends this subject's [`SubjectForgotten`] marker to.
    pub fn forgotten_stream(&self) -> crate::StreamId {
        crate::StreamId::for_aggregate(FORGOTTEN_CATEGORY, &self.0)
            .expect("a subject id is a valid aggregate id")
    }
}

impl TryFrom<String> for SubjectId {
    type Error = InvalidSubjectId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<SubjectId> for String {
    fn from(id: SubjectId) -> Self {
        id.0
    }
}

impl fmt::Display for SubjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a personal field reads as once its subject was forgotten.
///
/// Implemented for `String` ([`PLACEHOLDER`]), `Option<T>` (`None`), `Vec<T>` (empty) and
/// `serde_json::Value` (`null`). Implement it for your own field types:
///
/// ```
/// use factum::personal::Forgettable;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Address { street: String, city: String }
///
/// impl Forgettable for Address {
///     fn forgotten() -> Self {
///         Address { street: "[forgotten]".into(), city: "[forgotten]".into() }
///     }
/// }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a personal field: it has no placeholder for when its subject is forgotten",
    label = "a `#[personal]` field's type implements `factum::personal::Forgettable`",
    note = "use `String`, `Option<T>` or `Vec<T>`, or implement `factum::personal::Forgettable` for `{Self}`"
)]
pub trait Forgettable {
    /// The placeholder value.
    fn forgotten() -> Self;
}

impl Forgettable for String {
    fn forgotten() -> Self {
        PLACEHOLDER.to_owned()
    }
}

impl<T> Forgettable for Option<T> {
    fn forgotten() -> Self {
        None
    }
}

impl<T> Forgettable for Vec<T> {
    fn forgotten() -> Self {
        Vec::new()
    }
}

impl Forgettable for Value {
    fn forgotten() -> Self {
        Value::Null
    }
}

/// The marker event a store appends, to the stream [`SubjectId::forgotten_stream`], when it
/// forgets a subject: what read models that copied personal fields handle to erase their copies
/// (subscribe to [`SUBJECT_FORGOTTEN`]). Schema version 1, payload `{"subject": S}`.
///
/// ```
/// use factum::Event;
/// use factum::personal::{SubjectForgotten, SubjectId};
///
/// let marker = SubjectForgotten { subject: SubjectId::new("customer-7").unwrap() };
/// assert_eq!(marker.event_type(), "factum.subject_forgotten");
/// assert_eq!(marker.encode().unwrap().get(), r#"{"subject":"customer-7"}"#);
/// ```
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SubjectForgotten {
    /// The subject whose key was deleted.
    pub subject: SubjectId,
}

impl Event for SubjectForgotten {
    fn event_type(&self) -> &'static str {
        SUBJECT_FORGOTTEN
    }
    fn schema_version(&self) -> u32 {
        1
    }
    fn event_types() -> &'static [&'static str] {
        &[SUBJECT_FORGOTTEN]
    }
    fn event_versions() -> &'static [(&'static str, u32)] {
        &[(SUBJECT_FORGOTTEN, 1)]
    }
    fn encode(&self) -> Result<Box<RawValue>, EncodeError> {
        crate::encode_json(self)
    }
    fn decode(stored: &Stored<'_>) -> Result<Self, DecodeError> {
        match (stored.event_type, stored.schema_version) {
            (SUBJECT_FORGOTTEN, 1) => crate::decode_json(stored.payload),
            _ => Err(DecodeError::unknown(
                stored.event_type,
                stored.schema_version,
            )),
        }
    }
}

/// Whether a payload may hold a personal field in `form` (one of the `*_KEY` constants): a
/// substring test, so payloads without personal data cost one scan.
pub(crate) fn mentions(payload: &RawValue, form: &str) -> bool {
    let text = payload.get();
    let bytes = text.as_bytes();
    // With its quotes: a key, not a value that happens to contain the word.
    text.match_indices(form)
        .any(|(i, _)| i > 0 && bytes[i - 1] == b'"' && bytes.get(i + form.len()) == Some(&b'"'))
}

/// The subjects whose personal fields `payload` holds in plaintext form (what a reader with a
/// `Shredder` decrypted), in field order, without repeats.
///
/// ```
/// use factum::RawValue;
/// use factum::personal::subjects_in;
///
/// let payload = RawValue::from_string(
///     r#"{"id":"c-7","email":{"factum:personal":{"subject":"c-7","value":"ada@example.com"}}}"#.into(),
/// ).unwrap();
/// let subjects = subjects_in(&payload);
/// assert_eq!(subjects.len(), 1);
/// assert_eq!(subjects[0].as_str(), "c-7");
/// ```
pub fn subjects_in(payload: &RawValue) -> Vec<SubjectId> {
    let mut subjects = Vec::new();
    if !mentions(payload, PLAINTEXT_KEY) {
        return subjects;
    }
    if let Ok(fields) = serde_json::from_str::<serde_json::Map<String, Value>>(payload.get()) {
        for value in fields.values() {
            if let Some(subject) = marker(value, PLAINTEXT_KEY)
                .and_then(|m| m.get("subject"))
                .and_then(Value::as_str)
                .and_then(|s| SubjectId::new(s).ok())
                && !subjects.contains(&subject)
            {
                subjects.push(subject);
            }
        }
    }
    subjects
}

/// The inner object of `value` when it is `{form: {...}}` and nothing else.
pub(crate) fn marker<'v>(
    value: &'v Value,
    form: &str,
) -> Option<&'v serde_json::Map<String, Value>> {
    let object = value.as_object()?;
    if object.len() != 1 {
        return None;
    }
    object.get(form)?.as_object()
}

/// Not public API: what `#[derive(Event)]` generates for personal fields.
#[doc(hidden)]
pub mod field {
    use super::*;

    /// A personal field on its way out: serialises to the plaintext form.
    pub struct Sealed<'a, T: ?Sized> {
        subject: String,
        value: &'a T,
    }

    /// The plaintext form of `value` for `subject`.
    #[inline]
    pub fn seal<'a, S: fmt::Display + ?Sized, T: ?Sized>(
        subject: &S,
        value: &'a T,
    ) -> Sealed<'a, T> {
        Sealed {
            subject: subject.to_string(),
            value,
        }
    }

    impl<T: Serialize + ?Sized> Serialize for Sealed<'_, T> {
        fn serialize<Ser: serde::Serializer>(
            &self,
            serializer: Ser,
        ) -> Result<Ser::Ok, Ser::Error> {
            #[derive(Serialize)]
            struct Inner<'b, T: ?Sized> {
                subject: &'b str,
                value: &'b T,
            }
            #[derive(Serialize)]
            struct Outer<'b, T: ?Sized> {
                #[serde(rename = "factum:personal")]
                personal: Inner<'b, T>,
            }
            Outer {
                personal: Inner {
                    subject: &self.subject,
                    value: self.value,
                },
            }
            .serialize(serializer)
        }
    }

    /// A personal field on its way in: the plaintext form's value, the placeholder for the
    /// forgotten form, or the bare value (events stored before the field was marked personal).
    /// The encrypted form is an error: the reader has no `Shredder`.
    #[derive(Debug)]
    pub struct Opened<T>(pub T);

    impl<T> Opened<T> {
        /// The value.
        #[inline]
        pub fn into_inner(self) -> T {
            self.0
        }
    }

    impl<T: Default> Default for Opened<T> {
        fn default() -> Self {
            Self(T::default())
        }
    }

    impl<'de, T: DeserializeOwned + Forgettable> Deserialize<'de> for Opened<T> {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            use serde::de::Error as _;
            let value = Value::deserialize(deserializer)?;
            if let Some(inner) = marker(&value, PLAINTEXT_KEY) {
                let value = inner.get("value").cloned().unwrap_or(Value::Null);
                return T::deserialize(value).map(Opened).map_err(D::Error::custom);
            }
            if marker(&value, FORGOTTEN_KEY).is_some() {
                return Ok(Opened(T::forgotten()));
            }
            if marker(&value, ENCRYPTED_KEY).is_some() {
                return Err(D::Error::custom(
                    "a personal field is still encrypted: read events through a store that has a `factum::personal::Shredder` (`with_shredder`)",
                ));
            }
            T::deserialize(value).map(Opened).map_err(D::Error::custom)
        }
    }

    /// Checks a personal field's type where the user wrote it.
    #[inline]
    pub fn check_field<T: Serialize + DeserializeOwned + Forgettable>() {}

    /// Checks a subject field's type where the user wrote it.
    #[inline]
    pub fn check_subject<T: fmt::Display + ?Sized>(_: &T) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_decode() {
        let raw = |s: &str| serde_json::from_str::<field::Opened<String>>(s);
        let plain = raw(r#"{"factum:personal":{"subject":"c","value":"ada"}}"#).unwrap();
        assert_eq!(plain.0, "ada");
        let gone = raw(r#"{"factum:forgotten":{"subject":"c"}}"#).unwrap();
        assert_eq!(gone.0, PLACEHOLDER);
        let bare = raw(r#""old""#).unwrap();
        assert_eq!(bare.0, "old");
        let sealed = raw(r#"{"factum:encrypted":{"subject":"c","data":"AAAA"}}"#);
        assert!(sealed.unwrap_err().to_string().contains("still encrypted"));
    }

    #[test]
    fn sealing_writes_the_plaintext_form() {
        let json = serde_json::to_string(&field::seal(&7, "ada")).unwrap();
        assert_eq!(json, r#"{"factum:personal":{"subject":"7","value":"ada"}}"#);
        let payload = RawValue::from_string(format!(r#"{{"email":{json},"n":1}}"#)).unwrap();
        assert!(mentions(&payload, PLAINTEXT_KEY));
        assert!(!mentions(&payload, ENCRYPTED_KEY));
        assert_eq!(subjects_in(&payload), [SubjectId::new("7").unwrap()]);
    }
}
