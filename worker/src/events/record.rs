//! The on-disk encoding of one event and of one snapshot.
//!
//! An event value is a 9-byte header, then the event as JSON:
//! `[version: u8][at_ms: u64 little-endian][json]`. A snapshot value is
//! `[version: u8][json]`. The version comes first so a reader can refuse a
//! record it does not know before trying to parse it.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::EventLogError;

/// The schema version this build writes and reads.
pub const EVENT_VERSION: u8 = 1;
/// The snapshot format this build writes and reads.
pub(crate) const SNAPSHOT_VERSION: u8 = 1;

const EVENT_HEADER: usize = 1 + 8;

pub(crate) fn encode_event<E: Serialize>(at_ms: u64, event: &E) -> Result<Vec<u8>, EventLogError> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(EVENT_VERSION);
    bytes.extend_from_slice(&at_ms.to_le_bytes());
    serde_json::to_writer(&mut bytes, event).map_err(EventLogError::Encode)?;
    Ok(bytes)
}

/// Decodes an event stored at `seq`, returning its time and the event.
pub(crate) fn decode_event<E: DeserializeOwned>(seq: u64, bytes: &[u8]) -> Result<(u64, E), EventLogError> {
    let Some(&version) = bytes.first() else {
        return Err(EventLogError::Truncated { seq });
    };
    if version != EVENT_VERSION {
        return Err(EventLogError::UnknownVersion { seq, version });
    }
    let Some(at) = bytes.get(1..EVENT_HEADER) else {
        return Err(EventLogError::Truncated { seq });
    };
    let at_ms = u64::from_le_bytes(at.try_into().expect("the range is 8 bytes"));
    let event = serde_json::from_slice(&bytes[EVENT_HEADER..])
        .map_err(|source| EventLogError::Decode { seq, source })?;
    Ok((at_ms, event))
}

pub(crate) fn encode_snapshot<S: Serialize>(state: &S) -> Result<Vec<u8>, EventLogError> {
    let mut bytes = vec![SNAPSHOT_VERSION];
    serde_json::to_writer(&mut bytes, state).map_err(EventLogError::Encode)?;
    Ok(bytes)
}

pub(crate) fn decode_snapshot<S: DeserializeOwned>(up_to: u64, bytes: &[u8]) -> Result<S, EventLogError> {
    match bytes.first() {
        Some(&SNAPSHOT_VERSION) => serde_json::from_slice(&bytes[1..])
            .map_err(|source| EventLogError::SnapshotDecode { up_to, source }),
        Some(&version) => Err(EventLogError::UnknownSnapshotVersion { up_to, version }),
        None => Err(EventLogError::UnknownSnapshotVersion { up_to, version: 0 }),
    }
}
