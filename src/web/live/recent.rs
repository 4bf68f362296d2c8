//! The newest frames the hub sent, bounded in bytes: what a stream that fell behind its
//! ring catches up from, and what a reconnecting stream is replayed from when they reach
//! back to its id.
//!
//! Owns the ring of recent frames. Must not read Redis.

use std::collections::VecDeque;

use super::frame::{Frame, frame_size};
use crate::event::EventId;

/// The newest frames the hub sent, bounded in bytes (the frames are shared, not copied).
pub struct Recent {
    frames: VecDeque<Frame>,
    bytes: usize,
    cap: usize,
    /// The newest id dropped: memory covers everything after it.
    dropped: EventId,
}

impl Recent {
    /// Memory that covers everything after `at` (the hub's starting point): an id before
    /// it is not covered, whatever the frames held.
    pub fn starting_at(cap: usize, at: EventId) -> Self {
        let mut recent = Recent::new(cap);
        recent.dropped = at;
        recent
    }

    /// Forgets every frame: memory covers only what comes after `at` (the hub started
    /// again from a snapshot after losing events).
    pub fn restart(&mut self, at: EventId) {
        self.frames.clear();
        self.bytes = 0;
        self.dropped = at;
    }

    pub fn new(cap: usize) -> Self {
        Recent {
            frames: VecDeque::new(),
            bytes: 0,
            cap,
            dropped: EventId::ZERO,
        }
    }

    pub fn push(&mut self, frame: Frame) {
        self.bytes += frame_size(&frame);
        self.frames.push_back(frame);
        while self.bytes > self.cap {
            let Some(frame) = self.frames.pop_front() else {
                break;
            };
            self.bytes -= frame_size(&frame);
            if let Frame::Event(event) = frame {
                self.dropped = event.id;
            }
        }
    }

    /// Whether `id` is an event this replica passed on and still knows of: one it holds,
    /// or the newest it dropped.
    pub fn passed_on(&self, id: EventId) -> bool {
        (id == self.dropped && id != EventId::ZERO)
            || self
                .frames
                .binary_search_by(|f| match f {
                    Frame::Event(e) => e.id.cmp(&id),
                    _ => std::cmp::Ordering::Less,
                })
                .is_ok()
    }

    /// Every frame after `last`, when memory reaches back to it and they stay within
    /// `limit` bytes.
    pub fn after(&self, last: EventId, limit: usize) -> Option<VecDeque<Frame>> {
        if last < self.dropped {
            return None;
        }
        let start = self
            .frames
            .partition_point(|f| matches!(f, Frame::Event(e) if e.id <= last));
        let mut size = 0;
        let mut out = VecDeque::new();
        for frame in self.frames.range(start..) {
            size += frame_size(frame);
            if size > limit {
                return None;
            }
            out.push_back(frame.clone());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use axum::body::Bytes;

    use super::super::frame::EventFrame;
    use crate::event::Audience;

    fn frame(ms: u64, size: usize) -> Frame {
        Frame::Event(Arc::new(EventFrame {
            id: EventId { ms, seq: 0 },
            audience: Audience::Everyone,
            bytes: Bytes::from(vec![b'x'; size]),
            control: None,
            html: None,
            rendered: false,
            subject: None,
        }))
    }

    fn ids(frames: &VecDeque<Frame>) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Event(e) => Some(e.id.ms),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_replay_from_memory_starts_only_at_an_id_this_replica_passed_on() {
        let mut recent = Recent::new(300);
        for ms in [1, 3, 5, 7, 9] {
            recent.push(frame(ms, 100));
        }
        // Holds 5, 7 and 9; 3 is the newest dropped.
        let at = |ms| EventId { ms, seq: 0 };
        assert!(recent.passed_on(at(7)));
        assert!(recent.passed_on(at(9)));
        assert!(recent.passed_on(at(3)), "the newest dropped is known");
        assert!(!recent.passed_on(at(6)), "an id never given out");
        assert!(
            !recent.passed_on(at(10)),
            "an id from ahead (or another log)"
        );
        assert!(!recent.passed_on(at(1)), "forgotten");
        assert!(!Recent::new(300).passed_on(EventId::ZERO));
    }

    #[test]
    fn memory_covers_nothing_from_before_the_hub_started() {
        let at = |ms| EventId { ms, seq: 0 };
        let mut recent = Recent::starting_at(1000, at(5));
        recent.push(frame(7, 10));
        assert_eq!(recent.after(at(5), 1000).map(|f| ids(&f)), Some(vec![7]));
        assert!(
            recent.after(at(3), 1000).is_none(),
            "events between 3 and the start were never in memory"
        );
        recent.restart(at(9));
        assert!(
            recent.after(at(7), 1000).is_none(),
            "forgotten on a restart"
        );
        assert_eq!(recent.after(at(9), 1000).map(|f| ids(&f)), Some(vec![]));
    }

    #[test]
    fn recent_frames_serve_a_stream_behind_within_the_byte_bound_only() {
        let mut recent = Recent::new(300);
        for ms in 1..=5 {
            recent.push(frame(ms, 100));
        }
        // Holds 3 (300 bytes); 1 and 2 were dropped.
        let at = |ms| EventId { ms, seq: 0 };
        assert_eq!(recent.after(at(3), 1000).map(|f| ids(&f)), Some(vec![4, 5]));
        assert_eq!(
            recent.after(at(2), 1000).map(|f| ids(&f)),
            Some(vec![3, 4, 5])
        );
        assert!(
            recent.after(at(1), 1000).is_none(),
            "memory no longer reaches back"
        );
        assert!(
            recent.after(at(2), 250).is_none(),
            "past the byte bound: cut"
        );
        assert_eq!(recent.after(at(5), 0).map(|f| ids(&f)), Some(vec![]));
    }
}
