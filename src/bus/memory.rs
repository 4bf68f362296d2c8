//! The in-process bus: the demo's and the unit tests' stand-in for Redis, with the same
//! semantics (atomic append, capped log with gap detection, snapshot valid at an id,
//! leases with fencing). Everything of a guild sits behind one lock, so an append is
//! atomic. [`MemoryDeployment`] is the deployment-wide counterpart (registry, shard
//! leases and values) that hands out one [`MemoryBus`] per guild.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use twilight_model::id::Id;
use twilight_model::id::marker::{ChannelMarker, GuildMarker, UserMarker};

use crate::access::MemberRecord;

use super::{
    Backend, Bus, BusError, BusResult, Deployment, Fence, GuildEntry, LIVE_BUFFER, Since, Snapshot,
    Store,
};
use crate::event::{Event, EventData, EventId, Viewer};

pub struct MemoryBus {
    guild_id: Id<GuildMarker>,
    max_len: usize,
    state: Mutex<State>,
    live: broadcast::Sender<Arc<Event>>,
}

/// Leases with fencing, as the Redis scripts keep them: a holder's token until a time,
/// and per lease an epoch that only grows.
#[derive(Default)]
struct Leases {
    held: HashMap<String, (String, Instant)>,
    epochs: HashMap<String, u64>,
}

impl Leases {
    fn acquire(
        &mut self,
        name: &str,
        holder: &str,
        ttl: Duration,
        by_epoch: bool,
    ) -> Option<Fence> {
        let now = Instant::now();
        if self.held.get(name).is_some_and(|(_, until)| *until > now) {
            return None;
        }
        let epoch = self.epochs.entry(name.to_owned()).or_default();
        *epoch += 1;
        let fence = Fence {
            lease: name.to_owned(),
            token: format!("{epoch}:{holder}"),
            epoch: *epoch,
            by_epoch,
        };
        self.held
            .insert(name.to_owned(), (fence.token.clone(), now + ttl));
        Some(fence)
    }

    fn left(&self, name: &str) -> Option<Duration> {
        let now = Instant::now();
        self.held
            .get(name)
            .and_then(|(_, until)| until.checked_duration_since(now))
    }

    fn holds(&self, fence: &Fence) -> bool {
        self.held
            .get(&fence.lease)
            .is_some_and(|(token, until)| *token == fence.token && *until > Instant::now())
    }

    fn renew(&mut self, fence: &Fence, ttl: Duration) -> bool {
        if !self.holds(fence) {
            return false;
        }
        self.held.insert(
            fence.lease.clone(),
            (fence.token.clone(), Instant::now() + ttl),
        );
        true
    }

    fn release(&mut self, fence: &Fence) {
        if self.holds(fence) {
            self.held.remove(&fence.lease);
        }
    }
}

/// What a deployment keeps outside every guild.
#[derive(Default)]
struct Shared {
    values: HashMap<String, (String, Option<Instant>)>,
    leases: Leases,
    registry: BTreeMap<Id<GuildMarker>, GuildEntry>,
    /// Live gateway processes and when their last beat runs out.
    gateways: BTreeMap<String, Instant>,
}

fn lock_shared(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

fn live_value(values: &HashMap<String, (String, Option<Instant>)>, key: &str) -> Option<String> {
    values
        .get(key)
        .filter(|(_, exp)| exp.is_none_or(|e| e > Instant::now()))
        .map(|(v, _)| v.clone())
}

#[derive(Default)]
struct State {
    log: VecDeque<Arc<Event>>,
    /// The newest id trimmed from the log: a reader behind it has a gap.
    trimmed: EventId,
    last: EventId,
    snapshot: Snapshot,
    leases: Leases,
    values: HashMap<String, (String, Option<Instant>)>,
    /// Per room: viewer JSON (as Redis keeps it) → when it expires.
    viewers: HashMap<Id<ChannelMarker>, BTreeMap<String, Instant>>,
    members: HashMap<Id<UserMarker>, MemberRecord>,
    /// The highest epoch of a deployment-wide lease that wrote here (`P:{G}:epoch`).
    guild_epoch: u64,
}

impl MemoryBus {
    pub fn new(guild_id: Id<GuildMarker>, max_len: usize) -> Self {
        Self {
            guild_id,
            max_len: max_len.max(1),
            state: Mutex::new(State::default()),
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }

    /// The guild's epoch, as [`Deployment::raise_epochs`] and epoch-fenced appends left it.
    pub fn guild_epoch(&self) -> u64 {
        self.lock().guild_epoch
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing holding this lock can panic half-way through an append (apply is
        // infallible), so a poisoned lock still holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append_locked(&self, state: &mut State, data: EventData) -> BusResult<Arc<Event>> {
        let id = EventId::next_after(state.last, crate::event::now_ms());
        let event = Arc::new(
            Event::new(id, self.guild_id, id.ms, data)?
                .traced(crate::telemetry::traceparent().as_deref()),
        );
        state.last = id;
        state.snapshot.apply(&event);
        match &event.data {
            EventData::MemberUpdated { user_id, roles } => {
                state.members.insert(
                    *user_id,
                    MemberRecord {
                        user_id: *user_id,
                        roles: roles.clone(),
                    },
                );
            }
            EventData::MemberRemoved { user_id } => {
                state.members.remove(user_id);
            }
            _ => {}
        }
        state.log.push_back(event.clone());
        while state.log.len() > self.max_len {
            if let Some(old) = state.log.pop_front() {
                state.trimmed = old.id;
            }
        }
        // Sent under the lock so receivers see ids in order.
        let _ = self.live.send(event.clone());
        Ok(event)
    }
}

fn holds(state: &State, fence: &Fence) -> bool {
    state.leases.holds(fence)
}

#[async_trait::async_trait]
impl Bus for MemoryBus {
    fn guild_id(&self) -> Id<GuildMarker> {
        self.guild_id
    }

    async fn append(&self, data: EventData, fence: Option<&Fence>) -> BusResult<Arc<Event>> {
        let mut state = self.lock();
        match fence {
            Some(fence) if fence.by_epoch => {
                if fence.epoch < state.guild_epoch {
                    return Err(BusError::Fenced(fence.lease.clone()));
                }
                state.guild_epoch = fence.epoch;
            }
            Some(fence) if !holds(&state, fence) => {
                return Err(BusError::Fenced(fence.lease.clone()));
            }
            _ => {}
        }
        self.append_locked(&mut state, data)
    }

    async fn viewers(
        &self,
        channel: Id<ChannelMarker>,
        present: &[Viewer],
        gone: &[Viewer],
        ttl: Duration,
    ) -> BusResult<Option<Arc<Event>>> {
        let encode = |v: &Viewer| serde_json::to_string(v);
        let present = present.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let gone = gone.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let now = Instant::now();
        let mut state = self.lock();
        let set = state.viewers.entry(channel).or_default();
        // Everyone listed so far, expired or not: an expiry is a change to announce.
        let before: Vec<String> = set.keys().cloned().collect();
        set.retain(|_, until| *until > now);
        for v in present {
            set.insert(v, now + ttl);
        }
        for v in &gone {
            set.remove(v);
        }
        let after: Vec<String> = set.keys().cloned().collect();
        if set.is_empty() {
            state.viewers.remove(&channel);
        }
        if before == after {
            return Ok(None);
        }
        let viewers = after
            .iter()
            .map(|v| serde_json::from_str(v))
            .collect::<Result<Vec<Viewer>, _>>()?;
        let data = EventData::RoomViewers {
            channel_id: channel,
            viewers,
        };
        self.append_locked(&mut state, data).map(Some)
    }

    async fn has_room(&self, room: Id<ChannelMarker>) -> BusResult<bool> {
        Ok(self.lock().snapshot.rooms.contains_key(&room))
    }

    async fn snapshot(&self) -> BusResult<Snapshot> {
        let mut snapshot = self.lock().snapshot.clone();
        snapshot.guild = Some(self.guild_id);
        Ok(snapshot)
    }

    async fn since(&self, after: EventId, limit: usize) -> BusResult<Since> {
        let state = self.lock();
        // Trimmed past it, or past the newest id this log gave out (another history).
        if after < state.trimmed || after > state.last {
            return Ok(Since::Gap);
        }
        let start = state.log.partition_point(|e| e.id <= after);
        Ok(Since::Events(
            state.log.iter().skip(start).take(limit).cloned().collect(),
        ))
    }
    async fn holds(&self, id: EventId) -> BusResult<bool> {
        let state = self.lock();
        Ok(state.log.binary_search_by(|e| e.id.cmp(&id)).is_ok())
    }

    async fn trim_before(&self, before_ms: u64) -> BusResult<u64> {
        let mut state = self.lock();
        let mut dropped = 0;
        while state.log.front().is_some_and(|e| e.id.ms < before_ms) {
            if let Some(old) = state.log.pop_front() {
                state.trimmed = old.id;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    async fn subscribe(&self) -> BusResult<broadcast::Receiver<Arc<Event>>> {
        Ok(self.live.subscribe())
    }

    async fn member(&self, user: Id<UserMarker>) -> BusResult<Option<MemberRecord>> {
        Ok(self.lock().members.get(&user).cloned())
    }

    async fn claim(&self, key: &str, ttl: Duration) -> BusResult<bool> {
        let mut state = self.lock();
        let now = Instant::now();
        if state
            .values
            .get(key)
            .is_some_and(|(_, exp)| exp.is_none_or(|e| e > now))
        {
            return Ok(false);
        }
        state
            .values
            .insert(key.to_owned(), ("1".to_owned(), Some(now + ttl)));
        Ok(true)
    }

    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>> {
        Ok(self.lock().leases.acquire(name, holder, ttl, false))
    }

    async fn lease_left(&self, name: &str) -> BusResult<Option<Duration>> {
        Ok(self.lock().leases.left(name))
    }

    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        Ok(self.lock().leases.renew(fence, ttl))
    }

    async fn release(&self, fence: &Fence) -> BusResult<()> {
        self.lock().leases.release(fence);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Store for MemoryBus {
    async fn put(
        &self,
        fence: Option<&Fence>,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> BusResult<()> {
        let mut state = self.lock();
        if let Some(fence) = fence
            && !holds(&state, fence)
        {
            return Err(BusError::Fenced(fence.lease.clone()));
        }
        let expires = ttl.map(|t| Instant::now() + t);
        state
            .values
            .insert(key.to_owned(), (value.to_owned(), expires));
        Ok(())
    }

    async fn get(&self, key: &str) -> BusResult<Option<String>> {
        Ok(live_value(&self.lock().values, key))
    }

    /// Nothing in a process outlives it by a day: a removed guild's data stays until the
    /// demo stops.
    async fn expire(&self, _after: Option<Duration>) -> BusResult<()> {
        Ok(())
    }
}

/// The in-process deployment: one [`MemoryBus`] per guild, made on first use, and the
/// deployment-wide state beside them.
pub struct MemoryDeployment {
    max_len: usize,
    buses: Mutex<HashMap<Id<GuildMarker>, Arc<MemoryBus>>>,
    shared: Arc<Mutex<Shared>>,
    control: broadcast::Sender<Arc<EventData>>,
}

impl MemoryDeployment {
    pub fn new(max_len: usize) -> Self {
        Self {
            max_len,
            buses: Mutex::default(),
            shared: Arc::default(),
            control: broadcast::channel(1024).0,
        }
    }

    /// Guild `guild`'s bus, the same one every time.
    pub fn bus(&self, guild: Id<GuildMarker>) -> Arc<MemoryBus> {
        self.buses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(guild)
            .or_insert_with(|| Arc::new(MemoryBus::new(guild, self.max_len)))
            .clone()
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        lock_shared(&self.shared)
    }
}

fn holds_shared(shared: &Shared, fence: &Fence) -> bool {
    shared.leases.holds(fence)
}

#[async_trait::async_trait]
impl Deployment for MemoryDeployment {
    fn guild(&self, guild: Id<GuildMarker>) -> Arc<dyn Backend> {
        self.bus(guild)
    }

    async fn acquire(&self, name: &str, holder: &str, ttl: Duration) -> BusResult<Option<Fence>> {
        Ok(self.shared().leases.acquire(name, holder, ttl, true))
    }

    async fn lease_left(&self, name: &str) -> BusResult<Option<Duration>> {
        Ok(self.shared().leases.left(name))
    }

    async fn renew(&self, fence: &Fence, ttl: Duration) -> BusResult<bool> {
        Ok(self.shared().leases.renew(fence, ttl))
    }

    async fn release(&self, fence: &Fence) -> BusResult<()> {
        self.shared().leases.release(fence);
        Ok(())
    }

    async fn put(
        &self,
        fence: Option<&Fence>,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> BusResult<()> {
        let mut shared = self.shared();
        if let Some(fence) = fence
            && !holds_shared(&shared, fence)
        {
            return Err(BusError::Fenced(fence.lease.clone()));
        }
        let expires = ttl.map(|t| Instant::now() + t);
        shared
            .values
            .insert(key.to_owned(), (value.to_owned(), expires));
        Ok(())
    }

    async fn get(&self, key: &str) -> BusResult<Option<String>> {
        Ok(live_value(&self.shared().values, key))
    }

    async fn put_first(&self, key: &str, value: &str) -> BusResult<String> {
        let mut shared = self.shared();
        if let Some(v) = live_value(&shared.values, key) {
            return Ok(v);
        }
        shared
            .values
            .insert(key.to_owned(), (value.to_owned(), None));
        Ok(value.to_owned())
    }

    async fn register(&self, guild: Id<GuildMarker>, entry: &GuildEntry) -> BusResult<bool> {
        let mut shared = self.shared();
        if shared
            .registry
            .get(&guild)
            .is_some_and(|e| e.epoch > entry.epoch)
        {
            return Ok(false);
        }
        shared.registry.insert(guild, entry.clone());
        Ok(true)
    }

    async fn unregister(&self, guild: Id<GuildMarker>, epoch: u64) -> BusResult<bool> {
        let mut shared = self.shared();
        if shared.registry.get(&guild).is_some_and(|e| e.epoch > epoch) {
            return Ok(false);
        }
        shared.registry.remove(&guild);
        Ok(true)
    }

    async fn registry(&self) -> BusResult<BTreeMap<Id<GuildMarker>, GuildEntry>> {
        Ok(self.shared().registry.clone())
    }

    async fn entries(&self, guilds: &[Id<GuildMarker>]) -> BusResult<Vec<Option<GuildEntry>>> {
        let shared = self.shared();
        Ok(guilds
            .iter()
            .map(|g| shared.registry.get(g).cloned())
            .collect())
    }

    async fn registry_len(&self) -> BusResult<usize> {
        Ok(self.shared().registry.len())
    }

    async fn announce(&self, data: &EventData) -> BusResult<()> {
        let _ = self.control.send(Arc::new(data.clone()));
        Ok(())
    }

    async fn control(&self) -> BusResult<broadcast::Receiver<Arc<EventData>>> {
        Ok(self.control.subscribe())
    }

    async fn raise_epochs(&self, guilds: &[Id<GuildMarker>], epoch: u64) -> BusResult<()> {
        for guild in guilds {
            let bus = self.bus(*guild);
            let mut state = bus.lock();
            state.guild_epoch = state.guild_epoch.max(epoch);
        }
        Ok(())
    }

    async fn claim(&self, key: &str, ttl: Duration) -> BusResult<bool> {
        let mut shared = self.shared();
        if live_value(&shared.values, key).is_some() {
            return Ok(false);
        }
        shared
            .values
            .insert(key.to_owned(), (String::new(), Some(Instant::now() + ttl)));
        Ok(true)
    }

    async fn beat(&self, process: &str, ttl: Duration) -> BusResult<Vec<String>> {
        let mut shared = self.shared();
        let now = Instant::now();
        shared.gateways.retain(|_, until| *until > now);
        shared.gateways.insert(process.to_owned(), now + ttl);
        Ok(shared.gateways.keys().cloned().collect())
    }

    async fn leave(&self, process: &str) -> BusResult<()> {
        self.shared().gateways.remove(process);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(id: u64) -> EventData {
        EventData::RoomCreated {
            channel_id: Id::new(id),
            name: format!("room {id}"),
            user_limit: 4,
            created_by: None,
            role_id: None,
        }
    }

    #[tokio::test]
    async fn the_log_is_capped_by_age() {
        let bus = MemoryBus::new(Id::new(1), 100);
        let first = bus.append(room(1), None).await.unwrap();
        // Wait for the clock to pass `first`'s millisecond before appending: appending in
        // the loop instead overflowed the 100-event cap within one millisecond on a fast
        // machine, and the count trim (not the age trim under test) made the gap.
        while crate::event::now_ms() <= first.id.ms {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let later = bus.append(room(2), None).await.unwrap();
        assert!(later.id.ms > first.id.ms);
        // Every event appended before `later`'s millisecond goes.
        let Since::Events(all) = bus.since(EventId::ZERO, 1000).await.unwrap() else {
            panic!("nothing trimmed yet")
        };
        let older = all.iter().filter(|e| e.id.ms < later.id.ms).count() as u64;
        assert!(older >= 1);
        assert_eq!(bus.trim_before(later.id.ms).await.unwrap(), older);
        assert!(!bus.holds(first.id).await.unwrap());
        assert!(bus.holds(later.id).await.unwrap());
        // A reader from before the trimmed events finds the gap. (One resuming after the
        // last trimmed event misses nothing: everything after it is still there.)
        assert_eq!(bus.since(EventId::ZERO, 10).await.unwrap(), Since::Gap);
    }

    #[tokio::test]
    async fn appends_are_ordered_replayable_and_live() {
        let bus = MemoryBus::new(Id::new(1), 100);
        let mut live = bus.subscribe().await.unwrap();
        let a = bus.append(room(1), None).await.unwrap();
        let b = bus.append(room(2), None).await.unwrap();
        assert!(a.id < b.id);
        assert_eq!(live.recv().await.unwrap().id, a.id);
        assert_eq!(live.recv().await.unwrap().id, b.id);
        let Since::Events(after_a) = bus.since(a.id, 10).await.unwrap() else {
            panic!("gap")
        };
        assert_eq!(after_a.iter().map(|e| e.id).collect::<Vec<_>>(), [b.id]);
        let snapshot = bus.snapshot().await.unwrap();
        assert_eq!((snapshot.at, snapshot.rooms.len()), (b.id, 2));
    }

    #[tokio::test]
    async fn a_reader_behind_the_trimmed_log_gets_a_gap() {
        let bus = MemoryBus::new(Id::new(1), 2);
        let first = bus.append(room(1), None).await.unwrap();
        let second = bus.append(room(2), None).await.unwrap();
        bus.append(room(3), None).await.unwrap();
        assert_eq!(bus.since(EventId::ZERO, 10).await.unwrap(), Since::Gap);
        assert!(matches!(bus.since(first.id, 10).await.unwrap(), Since::Events(e) if e.len() == 2));
        assert!(
            matches!(bus.since(second.id, 10).await.unwrap(), Since::Events(e) if e.len() == 1)
        );
    }

    #[tokio::test]
    async fn a_lost_lease_fences_its_old_holder_out() {
        let bus = MemoryBus::new(Id::new(1), 10);
        let ttl = Duration::from_millis(30);
        let old = bus.acquire("gateway", "a", ttl).await.unwrap().unwrap();
        assert!(bus.acquire("gateway", "b", ttl).await.unwrap().is_none());
        bus.append(room(1), Some(&old)).await.unwrap();
        tokio::time::sleep(ttl * 2).await; // the old holder is paused past its lease
        let new = bus.acquire("gateway", "b", ttl).await.unwrap().unwrap();
        assert!(new.epoch > old.epoch);
        assert!(matches!(
            bus.append(room(2), Some(&old)).await,
            Err(BusError::Fenced(_))
        ));
        assert!(!bus.renew(&old, ttl).await.unwrap());
        bus.append(room(2), Some(&new)).await.unwrap();
        bus.release(&old).await.unwrap(); // releasing a lost lease changes nothing
        assert!(bus.renew(&new, ttl).await.unwrap());
        bus.release(&new).await.unwrap();
        assert!(bus.acquire("gateway", "c", ttl).await.unwrap().is_some());
    }
}
