//! The Redis bus: `P:{G}:events` stream and Pub/Sub channel, `P:{G}:rooms` and
//! `P:{G}:voice` snapshot hashes, leases — changed together by one script.
