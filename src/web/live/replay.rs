//! How a JSON stream that names the id it was at is brought up to date before it goes
//! live: from the replica's recent frames, from the log, or by a resync.
//!
//! The contract (SPEC): a stream resumed from an id the log still holds gets every event
//! after it, in order, once; an id the log no longer holds, or never gave out, gets
//! `resync` with the snapshot's id. Memory may serve only the first case, and only when
//! it reaches back to the id: whether the log still holds the id is asked of Redis (one
//! small read, shared by the streams asking about the same id at once, never answered
//! from before the stream asked) before memory is trusted, since only the log knows what
//! it trimmed.
//!
//! Owns the replay decision and reading the log a page at a time. Must not go live (that
//! is [`super::feed`]).

use std::collections::VecDeque;

use axum::body::Bytes;

use super::frame::{Frame, frame_bytes, resync_bytes};
use super::hub::{Hub, REPLAY_PAGE};
use super::sight::Sight;
use crate::bus::{Backend, BusError, Since};
use crate::event::EventId;

/// How a stream resuming after an id starts.
#[derive(Debug)]
pub enum Start {
    /// The log holds the id and the replica's recent frames reach back to it: they go
    /// out first, then the ring (the feed drops the overlap by id).
    Memory(VecDeque<Frame>),
    /// The log holds the id (or the stream starts from the log's beginning): read it a
    /// page at a time from there.
    Log(EventId),
    /// An id this log never gave out (from before Redis lost its data, or from another
    /// deployment): nothing can be continued from it.
    Resync,
}

/// The decision, given whether the log holds `id`; `remembered` is asked only when memory
/// may serve (it copies references to the frames).
pub fn choose(
    id: EventId,
    held: bool,
    remembered: impl FnOnce() -> Option<VecDeque<Frame>>,
) -> Start {
    if held {
        return remembered().map_or(Start::Log(id), Start::Memory);
    }
    if id == EventId::ZERO {
        // "From the beginning": the log answers with its events, or a gap if it was
        // trimmed.
        Start::Log(id)
    } else {
        Start::Resync
    }
}

/// Asks the log whether it holds `after` (the one Redis read of a resume) and decides.
pub async fn start(bus: &dyn Backend, hub: &Hub, after: EventId) -> Result<Start, BusError> {
    let [replays, from_memory] = &hub.replays;
    replays.increment(1);
    let held = bus.holds(after).await?;
    let start = choose(after, held, || hub.replay_from(after));
    if matches!(start, Start::Memory(_)) {
        from_memory.increment(1);
    }
    Ok(start)
}

/// A replay from the log, a page at a time, as the SSE bytes the stream's sight shows.
pub struct LogReplay {
    /// The newest id sent or skipped.
    cursor: EventId,
    resync: bool,
    done: bool,
}

impl LogReplay {
    /// `None` for a start that does not read the log.
    pub fn of(start: &Start) -> Option<Self> {
        match start {
            Start::Memory(_) => None,
            Start::Log(from) => Some(LogReplay {
                cursor: *from,
                resync: false,
                done: false,
            }),
            Start::Resync => Some(LogReplay {
                cursor: EventId::ZERO,
                resync: true,
                done: false,
            }),
        }
    }

    /// Where the stream is once the replay is done: the last id sent, or the snapshot's
    /// id after a resync.
    pub fn cursor(&self) -> EventId {
        self.cursor
    }

    /// The next page's frames (those `sight` shows); `None` once the log is exhausted.
    pub async fn next_page(
        &mut self,
        bus: &dyn Backend,
        sight: &Sight,
    ) -> Option<Result<Vec<Bytes>, BusError>> {
        if self.done {
            return None;
        }
        let page = if self.resync {
            Ok(Since::Gap)
        } else {
            bus.since(self.cursor, REPLAY_PAGE).await
        };
        Some(match page {
            Ok(Since::Events(events)) => {
                self.done = events.len() < REPLAY_PAGE;
                let mut out = Vec::new();
                for event in events {
                    self.cursor = event.id;
                    if sight.shows(event.data.audience()) {
                        out.push(frame_bytes(&event));
                    }
                }
                Ok(out)
            }
            Ok(Since::Gap) => {
                self.done = true;
                metrics::counter!("coven_web_resyncs_total").increment(1);
                bus.snapshot().await.map(|snapshot| {
                    self.cursor = snapshot.at;
                    vec![resync_bytes(snapshot.at)]
                })
            }
            Err(e) => {
                self.done = true;
                Err(e)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> EventId {
        EventId { ms, seq: 0 }
    }

    #[test]
    fn memory_serves_only_an_id_the_log_still_holds() {
        let frames = || Some(VecDeque::from([Frame::KeepAlive]));
        assert!(matches!(choose(at(5), true, frames), Start::Memory(f) if f.len() == 1));
        // Held, but memory does not reach back: the log.
        assert!(matches!(choose(at(5), true, || None), Start::Log(id) if id == at(5)));
        // Not held: whatever memory has, the contract says resync.
        let mut asked = false;
        let start = choose(at(5), false, || {
            asked = true;
            frames()
        });
        assert!(matches!(start, Start::Resync));
        assert!(
            !asked,
            "memory is not even looked at for an id the log lacks"
        );
    }

    #[test]
    fn from_the_beginning_reads_the_log() {
        assert!(matches!(
            choose(EventId::ZERO, false, || None),
            Start::Log(id) if id == EventId::ZERO
        ));
    }

    #[test]
    fn only_log_and_resync_starts_read_the_log() {
        assert!(LogReplay::of(&Start::Memory(VecDeque::new())).is_none());
        let log = LogReplay::of(&Start::Log(at(7))).map(|r| (r.cursor(), r.resync));
        assert_eq!(log, Some((at(7), false)));
        let resync = LogReplay::of(&Start::Resync).map(|r| r.resync);
        assert_eq!(resync, Some(true));
    }
}
