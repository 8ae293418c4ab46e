//! The hash chain: canonical JSON, the exact bytes that are hashed, and a
//! verifier that walks a log in `seq` order.
//!
//! This module is pure (no I/O) so every store implementation, and `keel audit
//! verify`, compute the same hashes. It does not know how events are stored.
//!
//! # Byte layout
//!
//! Two layouts exist. Each stored event names its own (`layout` column), so
//! a log written before schema version 2 keeps verifying with layout 1 while
//! every event appended since uses layout 2.
//!
//! ## Layout 1 (`keel.event.v1`, events appended before schema version 2)
//!
//! `hash = lowercase_hex(sha256(bytes))` where `bytes` is, in order:
//!
//! | field       | encoding                                                        |
//! | ----------- | --------------------------------------------------------------- |
//! | domain      | the 14 ASCII bytes `keel.event.v1` followed by one `0x00`       |
//! | `prev_hash` | `str`                                                           |
//! | `seq`       | 8 bytes, unsigned big-endian                                    |
//! | `task_id`   | `0x00` when absent; `0x01` then `str` when present              |
//! | `at`        | `str` (RFC 3339, UTC, milliseconds: `2026-11-23T13:00:00.123Z`) |
//! | `at_ms`     | 8 bytes, signed big-endian (two's complement)                   |
//! | `kind`      | `str` (`llm_call`)                                              |
//! | `data`      | `str` holding the canonical JSON of `data`                      |
//!
//! where `str` is the UTF-8 length as 8 bytes unsigned big-endian followed by the
//! UTF-8 bytes. Every variable-length field is length-prefixed, so no field can
//! be shifted into its neighbour, and an absent `task_id` differs from `""`.
//! The first event's `prev_hash` is [`GENESIS_HASH`] (64 `'0'`s).
//!
//! ## Layout 2 (`keel.event.v2`, events appended since schema version 2)
//!
//! The same as layout 1 with the domain `keel.event.v2` (again followed by one
//! `0x00`) and, in place of `data`, `str` holding `data_hash`: the lowercase hex
//! SHA-256 of the canonical JSON text of `data` ([`data_hash`]).
//!
//! # How pruning keeps the chain verifiable
//!
//! Because a layout-2 hash covers `data_hash` and not `data`, retention can
//! blank the `data` of a finished task's events while the row keeps `seq`,
//! `kind`, `data_hash`, `prev_hash` and `hash`: every link still recomputes.
//! `verify` checks the chain over `data_hash`, and wherever `data` is still
//! present also checks that it hashes to `data_hash`. So data that is there is
//! proven authentic; data that was pruned is gone but cannot be forged back in.
//! Layout-1 events cover their `data` directly, so they are never blanked.
//!
//! # Canonical JSON
//!
//! [`canonical_json`] sorts the keys of every object (recursively, by their
//! UTF-8 bytes) and prints compactly, with serde_json's number and string
//! formatting. Parsing canonical JSON and printing it canonically again gives
//! the same text, so a stored row verifies the same way every time.

use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// `prev_hash` of the first event of a log: 64 ASCII `'0'`s.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separator hashed before every event, so the hash of an event can never
/// be confused with the hash of some other structure.
const DOMAIN: &[u8] = b"keel.event.v1\0";

/// Domain separator of layout 2.
const DOMAIN_V2: &[u8] = b"keel.event.v2\0";

/// Hash layout of events appended before schema version 2: the hash covers `data`.
pub const LAYOUT_V1: u32 = 1;

/// Hash layout of events appended since schema version 2: the hash covers `data_hash`.
pub const LAYOUT_V2: u32 = 2;

/// The fields of one event that its hash covers, borrowed.
///
/// `data` is what the layout covers last: for layout 1 ([`HashInput::hash`])
/// the canonical JSON text ([`canonical_json`]) exactly as stored, for layout 2
/// ([`HashInput::hash_v2`]) its [`data_hash`].
#[derive(Debug, Clone, Copy)]
pub struct HashInput<'a> {
    /// Hash of the previous event, or [`GENESIS_HASH`].
    pub prev_hash: &'a str,
    /// Position in the log, from 1.
    pub seq: u64,
    /// Task the event belongs to.
    pub task_id: Option<&'a str>,
    /// RFC 3339 time, as stored.
    pub at: &'a str,
    /// The same time in Unix milliseconds.
    pub at_ms: i64,
    /// Event kind name (`llm_call`).
    pub kind: &'a str,
    /// Canonical JSON of the event's data (layout 1), or its [`data_hash`] (layout 2).
    pub data: &'a str,
}

impl HashInput<'_> {
    /// The layout-1 hash: lowercase hex of SHA-256 over the layout in the module doc.
    pub fn hash(&self) -> String {
        self.hash_with(DOMAIN)
    }

    /// The layout-2 hash (module doc): `data` must be the [`data_hash`].
    pub fn hash_v2(&self) -> String {
        self.hash_with(DOMAIN_V2)
    }

    /// SHA-256 over `domain`, then every field in order, `data` last.
    fn hash_with(&self, domain: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(domain);
        put_str(&mut h, self.prev_hash);
        h.update(self.seq.to_be_bytes());
        match self.task_id {
            None => h.update([0u8]),
            Some(task_id) => {
                h.update([1u8]);
                put_str(&mut h, task_id);
            }
        }
        put_str(&mut h, self.at);
        h.update(self.at_ms.to_be_bytes());
        put_str(&mut h, self.kind);
        put_str(&mut h, self.data);
        hex_of(&h.finalize())
    }
}

/// Lowercase hex SHA-256 of the canonical JSON text of an event's data
/// ([`canonical_json`]); what a layout-2 hash covers in place of the data.
pub fn data_hash(canonical_data: &str) -> String {
    hex_of(&Sha256::digest(canonical_data.as_bytes()))
}

/// Lowercase hex SHA-256 of `bytes`: the key under which a blob is stored.
pub fn blob_hash(bytes: &[u8]) -> String {
    hex_of(&Sha256::digest(bytes))
}

/// Lowercase hex of a SHA-256 digest, pushed into one allocation of its final size. Three
/// or more digests are printed per call through the gateway: `hex::encode` (a char
/// iterator) measured slower under callgrind, and `encode_to_slice` needed a UTF-8 pass after.
fn hex_of(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(digest.len() * 2);
    for byte in digest {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

fn put_str(h: &mut Sha256, s: &str) {
    // usize -> u64 is lossless on every platform Rust supports.
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// `value` with the keys of every object sorted, recursively.
///
/// The workspace builds serde_json without `preserve_order`, so its objects are
/// already sorted maps and this only walks the tree; it stays so that the canonical
/// form cannot change should a dependency ever turn that feature on (features are
/// unified across the build, and under it objects keep insertion order).
pub fn canonicalize(mut value: serde_json::Value) -> serde_json::Value {
    // In place: `sort_all_objects` reorders each map's entries without
    // re-hashing or re-allocating its keys.
    value.sort_all_objects();
    value
}

/// [`canonicalize`] of an event's data as the store keeps it: an object key serde_json
/// reserves for itself ([`keel_core::canonical::RESERVED_KEYS`]) is renamed
/// ([`keel_core::canonical::renamed_key`]) wherever it appears. serde_json reads an object
/// whose first key is one as the JSON inside its string, and canonical order puts it first, so
/// stored text holding one would not read back as the data that was hashed, or not at all.
/// (Identities hashed from a canonical form, such as a tool call's for its approval, keep
/// the key as given: [`canonicalize`].)
pub fn for_storage(mut value: serde_json::Value) -> serde_json::Value {
    rename_reserved(&mut value);
    canonicalize(value)
}

/// Whether canonical `text` may hold a key serde_json reserves (false: it certainly holds
/// none, and [`for_storage`] would change nothing).
pub(crate) fn may_hold_reserved_keys(text: &str) -> bool {
    // A byte search first (word at a time): most data has no `$` at all.
    text.as_bytes().contains(&b'$') && text.contains("\"$serde_json::private::")
}

fn rename_reserved(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(members) => {
            for reserved in keel_core::canonical::RESERVED_KEYS {
                if let Some(member) = members.remove(reserved) {
                    let name =
                        keel_core::canonical::renamed_key(reserved, |n| members.contains_key(n));
                    members.insert(name, member);
                }
            }
            members.values_mut().for_each(rename_reserved);
        }
        serde_json::Value::Array(elements) => elements.iter_mut().for_each(rename_reserved),
        serde_json::Value::Null
        | serde_json::Value::Bool(_)
        | serde_json::Value::Number(_)
        | serde_json::Value::String(_) => {}
    }
}

/// The canonical JSON text of `value`: sorted keys, compact.
pub fn canonical_json(value: &serde_json::Value) -> String {
    into_canonical_json(value.clone())
}

/// [`canonical_json`] of a value the caller gives up (sorted in place, not copied).
pub fn into_canonical_json(value: serde_json::Value) -> String {
    canonical_text(&canonicalize(value))
}

/// The compact JSON text of a value whose objects are already sorted.
pub(crate) fn canonical_text(sorted: &serde_json::Value) -> String {
    // `Value` serializes infallibly to text; `to_string` keeps that without
    // the `Display` detour through `fmt::Formatter`.
    serde_json::to_string(sorted).unwrap_or_default()
}

/// [`canonical_text`] of `sorted` (an object) with `member` printed in at its place in key
/// order: the canonical text of the data with that member, without building its tree (the
/// member's text is canonical, [`keel_core::CanonicalText`]). A member of `sorted` with the
/// same key is left out.
pub(crate) fn canonical_text_with(
    sorted: &serde_json::Value,
    member: &keel_core::TextMember,
) -> String {
    let serde_json::Value::Object(members) = sorted else {
        // `NewEvent::with_text` makes an object; only data changed after it is not one.
        debug_assert!(false, "a member given as text in data that is no object");
        return canonical_text(sorted);
    };
    let text = member.text.as_str();
    let mut out = Vec::with_capacity(text.len() + 64 * members.len());
    out.push(b'{');
    let mut pending = Some(text);
    let mut first = true;
    let mut put = |out: &mut Vec<u8>, key: &str, value: Result<&serde_json::Value, &str>| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        // Writing a string or a `Value` into a `Vec` cannot fail.
        let _ = serde_json::to_writer(&mut *out, key);
        out.push(b':');
        match value {
            Ok(value) => {
                let _ = serde_json::to_writer(&mut *out, value);
            }
            Err(text) => out.extend_from_slice(text.as_bytes()),
        }
    };
    for (key, value) in members {
        if key == member.key {
            continue;
        }
        if key.as_str() > member.key
            && let Some(text) = pending.take()
        {
            put(&mut out, member.key, Err(text));
        }
        put(&mut out, key, Ok(value));
    }
    if let Some(text) = pending {
        put(&mut out, member.key, Err(text));
    }
    out.push(b'}');
    // Every piece is UTF-8 text.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// The stored columns of one event row after `seq`, borrowed, as every store reads them back.
pub(crate) struct StoredRow<'r> {
    pub(crate) task_id: Option<&'r str>,
    pub(crate) at: &'r str,
    pub(crate) at_ms: i64,
    pub(crate) kind: &'r str,
    /// The canonical data text as hashed; empty when retention pruned it (layout 2).
    pub(crate) data: &'r str,
    pub(crate) prev_hash: &'r str,
    pub(crate) hash: &'r str,
    pub(crate) layout: u32,
    pub(crate) data_hash: Option<&'r str>,
}

impl StoredRow<'_> {
    /// Whether retention blanked the data.
    pub(crate) fn pruned(&self) -> bool {
        self.layout == LAYOUT_V2 && self.data.is_empty()
    }

    /// The stored event at `seq`; `Err` says why the row is not one.
    pub(crate) fn event(&self, seq: u64) -> Result<crate::Event, String> {
        let pruned = self.pruned();
        let data = if pruned {
            serde_json::Value::Null
        } else {
            serde_json::from_str(self.data).map_err(|e| format!("data is not JSON: {e}"))?
        };
        Ok(crate::Event {
            seq,
            task_id: self.task_id.map(str::to_owned),
            at: self.at.to_owned(),
            at_ms: self.at_ms,
            kind: self.kind.to_owned(),
            data,
            prev_hash: self.prev_hash.to_owned(),
            hash: self.hash.to_owned(),
            layout: self.layout,
            data_hash: self.data_hash.map(str::to_owned),
            pruned,
        })
    }

    /// Checks the row at `seq` against the chain: its link, and its data against
    /// `data_hash` unless pruned.
    pub(crate) fn check(&self, verifier: &mut ChainVerifier, seq: u64) -> Result<(), String> {
        let input = |data| HashInput {
            prev_hash: self.prev_hash,
            seq,
            task_id: self.task_id,
            at: self.at,
            at_ms: self.at_ms,
            kind: self.kind,
            data,
        };
        match self.layout {
            // The stored text is what was hashed; no re-serialisation.
            LAYOUT_V1 => verifier.check(&input(self.data), self.hash),
            LAYOUT_V2 => {
                let stored = self
                    .data_hash
                    .ok_or_else(|| "column data_hash is null".to_owned())?;
                verifier.check_v2(&input(stored), self.hash)?;
                // Empty data: pruned by retention; the chain still proves data_hash.
                if !self.data.is_empty() {
                    let computed = data_hash(self.data);
                    if computed != stored {
                        return Err(format!(
                            "stored data_hash {stored} does not match the content, whose data hashes to {computed}"
                        ));
                    }
                }
                Ok(())
            }
            other => Err(format!("unknown hash layout {other}")),
        }
    }
}

/// Checks a log event by event, in `seq` order, and names the first broken link.
///
/// Feed it every event from `seq` 1 upwards with [`ChainVerifier::check`]; the
/// first error it returns is the answer of `verify`.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    prev_hash: String,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainVerifier {
    /// A verifier expecting `seq` 1 with `prev_hash` [`GENESIS_HASH`].
    pub fn new() -> Self {
        Self {
            next_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
        }
    }

    /// Number of events checked and found intact so far.
    pub fn checked(&self) -> u64 {
        self.next_seq - 1
    }

    /// Checks the next event, given the hash it claims for itself.
    ///
    /// Errors with a lowercase reason when the `seq` is not the next one, the
    /// `prev_hash` is not the previous event's hash, or `hash` does not match
    /// the content.
    pub fn check(&mut self, input: &HashInput<'_>, hash: &str) -> Result<(), String> {
        self.link(input.seq, input.prev_hash, hash, || input.hash())
    }

    /// [`ChainVerifier::check`] for a layout-2 event.
    pub fn check_v2(&mut self, input: &HashInput<'_>, hash: &str) -> Result<(), String> {
        self.link(input.seq, input.prev_hash, hash, || input.hash_v2())
    }

    fn link(
        &mut self,
        seq: u64,
        prev_hash: &str,
        hash: &str,
        compute: impl FnOnce() -> String,
    ) -> Result<(), String> {
        if seq != self.next_seq {
            return Err(format!(
                "expected seq {} but found seq {seq}",
                self.next_seq
            ));
        }
        if prev_hash != self.prev_hash {
            return Err(format!(
                "prev_hash {prev_hash} does not match the hash {} of the previous event",
                self.prev_hash
            ));
        }
        let computed = compute();
        if computed != hash {
            return Err(format!(
                "stored hash {hash} does not match the content, which hashes to {computed}"
            ));
        }
        self.next_seq += 1;
        self.prev_hash = computed;
        Ok(())
    }
}

/// The current wall-clock time in Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-11-23T13:00:00.123Z`).
pub fn format_rfc3339_ms(at_ms: i64) -> String {
    let millis = at_ms.rem_euclid(1000);
    let secs = at_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

/// Gregorian (year, month, day) of a count of days since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn input<'a>(task_id: Option<&'a str>, kind: &'a str, data: &'a str) -> HashInput<'a> {
        HashInput {
            prev_hash: GENESIS_HASH,
            seq: 1,
            task_id,
            at: "2026-11-23T13:00:00.123Z",
            at_ms: 1_795_438_800_123,
            kind,
            data,
        }
    }

    #[test]
    fn formats_rfc3339_with_millis() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_795_438_800_123),
            "2026-11-23T13:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_782_400_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(format_rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn canonical_json_sorts_keys_recursively() {
        let value = json!({"b": 1, "a": {"z": [{"y": 1, "x": 2}], "c": null}});
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"c":null,"z":[{"x":2,"y":1}]},"b":1}"#
        );
    }

    #[test]
    fn a_member_given_as_text_is_printed_in_its_place() {
        let answer = br#"{"z":[1,{"b":2,"a":"\u00e9"}],"a":null}"#;
        let text = keel_core::Document::parse(answer).unwrap().canonical_text();
        let tree: serde_json::Value = serde_json::from_slice(answer).unwrap();
        for (data, key) in [
            (json!({}), "only"),
            (json!({"m": 1, "x": 2}), "a"),
            (json!({"m": 1, "x": 2}), "n"),
            (json!({"m": 1, "x": 2}), "z"),
            (json!({"m": 1, "x": 2}), "m"),
            (json!({"é": 1, "e": {"q": [true]}}), "f"),
        ] {
            let member = keel_core::TextMember {
                key,
                text: text.clone(),
            };
            let printed = canonical_text_with(&canonicalize(data.clone()), &member);
            // A member of the data under the same key gives way to the text.
            let mut whole = data;
            whole[key] = tree.clone();
            assert_eq!(printed, canonical_json(&whole), "{key}");
        }
    }

    #[test]
    fn serde_jsons_reserved_keys_are_renamed_for_storage_so_the_text_reads_back() {
        let value = json!({"z": 1, "$serde_json::private::RawValue": "{", "a": [{"$serde_json::private::Number": "x", "(renamed by keel) $serde_json::private::Number": 2}]});
        // A canonical form for identities keeps the key as given.
        assert!(canonical_json(&value).starts_with(r#"{"$serde_json::private::RawValue""#));
        let text = canonical_text(&for_storage(value));
        let read: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(canonical_json(&read), text);
        assert_eq!(
            read["(renamed by keel) $serde_json::private::RawValue"],
            "{"
        );
        assert_eq!(
            read["a"][0]["_(renamed by keel) $serde_json::private::Number"],
            "x"
        );
        assert_eq!(
            read["a"][0]["(renamed by keel) $serde_json::private::Number"],
            2
        );
        assert_eq!(read["z"], 1);
    }

    #[test]
    fn canonical_json_is_stable_through_a_parse() {
        let value = json!({"n": 1.5e300, "f": 0.1, "s": "é\u{1}\"", "i": -7, "u": 18_446_744_073_709_551_615u64});
        let text = canonical_json(&value);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(canonical_json(&parsed), text);
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        let hash = input(None, "llm_call", "{}").hash();
        assert_eq!(hash.len(), 64);
        assert!(hash.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
    }

    #[test]
    fn absent_task_differs_from_empty_task() {
        assert_ne!(
            input(None, "llm_call", "{}").hash(),
            input(Some(""), "llm_call", "{}").hash()
        );
    }

    #[test]
    fn fields_cannot_be_shifted_into_neighbours() {
        assert_ne!(
            input(Some("ab"), "c", "{}").hash(),
            input(Some("a"), "bc", "{}").hash()
        );
    }

    #[test]
    fn verifier_names_first_broken_link() {
        let mut verifier = ChainVerifier::new();
        let first = input(None, "llm_call", "{}");
        let hash = first.hash();
        assert_eq!(verifier.check(&first, &hash), Ok(()));
        let second = HashInput {
            prev_hash: &hash,
            seq: 2,
            ..first
        };
        assert!(verifier.check(&second, "bad").is_err());
        assert_eq!(verifier.checked(), 1);
    }

    #[test]
    fn layouts_differ_for_the_same_event() {
        let data = "{}";
        let v1 = input(None, "llm_call", data);
        let digest = data_hash(data);
        let v2 = HashInput {
            data: &digest,
            ..v1
        };
        assert_ne!(v1.hash(), v2.hash_v2());
        let mut verifier = ChainVerifier::new();
        assert_eq!(verifier.check_v2(&v2, &v2.hash_v2()), Ok(()));
    }

    #[test]
    fn blob_hash_is_sha256_hex() {
        assert_eq!(
            blob_hash(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn verifier_rejects_gap_in_seq() {
        let mut verifier = ChainVerifier::new();
        let first = HashInput {
            seq: 2,
            ..input(None, "llm_call", "{}")
        };
        let err = verifier.check(&first, &first.hash()).unwrap_err();
        assert!(err.contains("expected seq 1"), "{err}");
    }
}
