//! The identify queue every gateway process shares, through Redis: a shard that must
//! IDENTIFY (it has no session to RESUME) waits here for its bucket's turn.
//!
//! Discord allows `max_concurrency` IDENTIFYs per 5 s, one per bucket (`shard_id %
//! max_concurrency`), and answers a too-early one with op 9; it allows 1,000 session
//! starts a day and resets the bot's token when they run out. So a turn is a Redis key
//! per bucket (`P:identify:{bucket}`, set if absent for 5 s and a margin), whoever asks
//! for it, on any machine; and before each IDENTIFY, `GET /gateway/bot` tells how many
//! starts are left: at the reserve, the process stops with one line instead.
//!
//! Owns the `P:identify:*` keys. Must not touch a shard's session or lease; RESUMEs never
//! come here (twilight asks the queue only on a HELLO without a session).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use twilight_gateway::queue::Queue;

use crate::bus::{Deployment, identify_key};
use crate::discord::{BotGateway, bot_gateway};

/// Discord's window per bucket.
const WINDOW: Duration = Duration::from_secs(5);
/// Added to the window: the key's clock is Redis's, the window Discord's, and an
/// IDENTIFY takes a moment to travel; half a second covers both with room to spare.
const MARGIN: Duration = Duration::from_millis(500);
/// An answer of `GET /gateway/bot` is used for at most this long (Discord asks that it
/// not be cached; within a second, two shards asking at once need not both ask).
const FRESH_FOR: Duration = Duration::from_secs(1);

/// Why the process stopped instead of identifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// A [`Queue`] shared by every gateway process through Redis. Cheap to clone.
#[derive(Clone)]
pub struct IdentifyQueue(Arc<Inner>);

struct Inner {
    deployment: Arc<dyn Deployment>,
    discord: twilight_http::Client,
    /// Session starts kept back: at this many left, nothing identifies.
    reserve: u32,
    /// Cancelled when the reserve is reached; the process stops.
    refused: CancellationToken,
    refusal: Mutex<Option<Refusal>>,
    last: Mutex<Option<(std::time::Instant, BotGateway)>>,
    /// Turns waiting for a shard that never got them (the process stops): kept so the
    /// shard does not ask again in a loop (a dropped sender asks again).
    held: Mutex<Vec<oneshot::Sender<()>>>,
}

impl IdentifyQueue {
    pub fn new(
        deployment: Arc<dyn Deployment>,
        discord: twilight_http::Client,
        reserve: u32,
    ) -> Self {
        Self(Arc::new(Inner {
            deployment,
            discord,
            reserve,
            refused: CancellationToken::new(),
            refusal: Mutex::new(None),
            last: Mutex::new(None),
            held: Mutex::new(Vec::new()),
        }))
    }

    /// Cancelled once a shard would have identified below the reserve.
    pub fn refused(&self) -> CancellationToken {
        self.0.refused.clone()
    }

    pub fn refusal(&self) -> Option<Refusal> {
        self.0
            .refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops every identify of this process with `line` (the process is stopping).
    pub fn refuse(&self, line: String) {
        self.0.refuse(line);
    }

    /// What `GET /gateway/bot` says, asked at most once per [`FRESH_FOR`].
    pub async fn limits(&self) -> Result<BotGateway, crate::discord::DiscordError> {
        self.0.limits().await
    }
}

/// Discord refused the bot's token itself: no wait makes it good again.
pub fn token_refused(e: &crate::discord::DiscordError) -> Option<String> {
    use crate::discord::DiscordError;
    match e {
        DiscordError::Unauthorized | DiscordError::Refused { status: 401, .. } => Some(
            "Discord refused DISCORD_BOT_TOKEN (GET /gateway/bot answered 401): check the token in \
             the Developer Portal (Discord resets it when it leaks or the bot runs out of session \
             starts)"
                .to_owned(),
        ),
        _ => None,
    }
}

impl Inner {
    fn refuse(&self, line: String) {
        let mut refusal = self.refusal.lock().unwrap_or_else(|e| e.into_inner());
        if refusal.is_none() {
            tracing::error!("{line}");
            *refusal = Some(Refusal(line));
        }
        drop(refusal);
        self.refused.cancel();
    }
    async fn limits(&self) -> Result<BotGateway, crate::discord::DiscordError> {
        if let Some((at, info)) = *self.last.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < FRESH_FOR
        {
            return Ok(info);
        }
        let info = bot_gateway(&self.discord).await?;
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), info));
        Ok(info)
    }

    /// Waits for `shard`'s bucket, then lets it identify; or refuses at the reserve.
    async fn turn(self: Arc<Self>, shard: u32, tx: oneshot::Sender<()>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            if tx.is_closed() || self.refused.is_cancelled() {
                return; // the shard went away (handed over, stopped) or nothing may start
            }
            let info = match self.limits().await {
                Ok(info) => info,
                Err(e) if token_refused(&e).is_some() => {
                    self.held.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
                    self.refuse(token_refused(&e).unwrap_or_default());
                    return;
                }
                Err(e) => {
                    // Not knowing how many starts are left, nothing starts: a token reset
                    // costs more than a wait.
                    tracing::warn!(shard, error = %e, "cannot ask Discord how many session starts are left; waiting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if info.remaining <= self.reserve {
                let line = format!(
                    "refusing to IDENTIFY shard {shard}: Discord allows {} more session starts \
                     (for {} s), and IDENTIFY_RESERVE keeps {} back (Discord resets the bot's \
                     token when they run out)",
                    info.remaining,
                    info.reset_after.as_secs(),
                    self.reserve
                );
                self.held.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
                self.refuse(line);
                return;
            }
            let bucket = shard % info.max_concurrency.max(1);
            let key = identify_key(bucket);
            match self.deployment.claim(&key, WINDOW + MARGIN).await {
                Ok(true) => {
                    tracing::info!(shard, bucket, "identify turn taken");
                    metrics::counter!("coven_gateway_identifies_total", "shard" => shard.to_string())
                        .increment(1);
                    let _ = tx.send(());
                    return;
                }
                Ok(false) => {
                    // Someone's turn: wait until it ends (what is left of its key).
                    let left = self
                        .deployment
                        .lease_left(&key)
                        .await
                        .ok()
                        .flatten()
                        .unwrap_or(Duration::from_millis(100));
                    tracing::debug!(
                        shard,
                        bucket,
                        wait_ms = left.as_millis() as u64,
                        "waiting for the identify bucket"
                    );
                    tokio::time::sleep(left + Duration::from_millis(10)).await;
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "cannot reach Redis for an identify turn; waiting");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl Queue for IdentifyQueue {
    fn enqueue(&self, shard: u32) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        tokio::spawn(self.0.clone().turn(shard, tx));
        rx
    }
}
