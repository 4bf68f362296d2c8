//! Ids and stamps the simulator hands out: snowflakes (Discord's layout), the wall
//! clock they read, Discord's timestamp format, random session ids and stable avatar
//! hashes.
//!
//! Owns no guild state; must not know what the ids name.

use std::time::{SystemTime, UNIX_EPOCH};

const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;

/// Makes Discord-shaped ids: milliseconds since Discord's epoch above 22 counter bits.
#[derive(Debug)]
pub struct Snowflakes {
    last: u64,
}

impl Snowflakes {
    /// Starts at a fixed instant so a fresh simulator always seeds the same ids.
    pub fn seeded() -> Self {
        // 2024-01-01T00:00:00Z
        let ms = 1_704_067_200_000 - DISCORD_EPOCH_MS;
        Self { last: ms << 22 }
    }

    pub fn mint(&mut self) -> u64 {
        let now = (now_ms().saturating_sub(DISCORD_EPOCH_MS)) << 22;
        self.last = (self.last + 1).max(now);
        self.last
    }

    pub fn next_seeded(&mut self) -> u64 {
        self.last += 1;
        self.last
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

/// A stable 32-hex-digit avatar hash for a user, shaped like Discord's image hashes.
pub fn avatar_hash(id: u64) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.to_le_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
