//! Ids and stamps the simulator hands out: snowflakes (Discord's layout), the wall
//! clock they read, Discord's timestamp format, random session ids and stable avatar
//! hashes.
//!
//! Owns no guild state; must not know what the ids name.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// Makes Discord-shaped ids: milliseconds since Discord's epoch above 22 counter bits.
/// Clones share one counter, so every guild of the simulator mints from the same
/// sequence and no two of them hand out the same id.
#[derive(Debug, Clone)]
pub struct Snowflakes {
    last: Arc<AtomicU64>,
}

impl Snowflakes {
    /// Starts at a fixed instant so a fresh simulator always seeds the same ids.
    pub fn seeded() -> Self {
        // 2024-01-01T00:00:00Z
        let ms = 1_704_067_200_000 - DISCORD_EPOCH_MS;
        Self {
            last: Arc::new(AtomicU64::new(ms << 22)),
        }
    }

    pub fn mint(&mut self) -> u64 {
        let now = (now_ms().saturating_sub(DISCORD_EPOCH_MS)) << 22;
        let step = |last: u64| Some((last + 1).max(now));
        // The closure always answers `Some`, so both arms carry the previous value.
        let previous = match self
            .last
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, step)
        {
            Ok(v) | Err(v) => v,
        };
        (previous + 1).max(now)
    }

    pub fn next_seeded(&mut self) -> u64 {
        self.last.fetch_add(1, Ordering::SeqCst) + 1
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Now, in the ISO 8601 form Discord writes (`+00:00`, microseconds).
pub fn iso_now() -> String {
    let t = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    match t.strip_suffix('Z') {
        Some(base) => format!("{base}+00:00"),
        None => t,
    }
}

/// The first `bytes` bytes (at most 32) of `input`'s SHA-256, in hex: the simulator's
/// stable stand-in for Discord's hashes (images, buckets, keys) and its token digests.
pub fn digest_hex(input: &[u8], bytes: usize) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(input);
    digest[..bytes.min(32)]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A stable 32-hex-digit avatar hash for a user, shaped like Discord's image hashes.
pub fn avatar_hash(id: u64) -> String {
    digest_hex(&id.to_le_bytes(), 16)
}

pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
