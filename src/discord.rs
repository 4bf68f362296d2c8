//! Discord's REST API and OAuth2 as the web replicas use them: the bot's client
//! (twilight-http, with its rate limiter) for guild operations, and the OAuth2 client
//! (authorization code + PKCE, refresh) plus `users/@me` for people logging in.
//!
//! Owns turning Discord's answers into [`DiscordError`] in plain words. Must not know
//! about sessions, pages or the bus.

use std::future::IntoFuture;
use std::time::Duration;

use oauth2::basic::BasicClient;
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet, EndpointSet,
    PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RefreshToken, Scope, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use twilight_http::api_error::ApiError;
use twilight_http::error::ErrorType;
use twilight_model::channel::ChannelType;
use twilight_model::channel::permission_overwrite::PermissionOverwrite;
use twilight_model::guild::Permissions;
use twilight_model::id::Id;
use twilight_model::id::marker::{
    ApplicationMarker, ChannelMarker, GuildMarker, RoleMarker, UserMarker,
};
use url::Url;

use crate::access::{COVEN_PERMISSIONS, room_overwrites};
use crate::config;
use crate::event::{Person, now_ms};

/// Discord's REST API base.
pub const DEFAULT_API_URL: &str = "https://discord.com/api";
/// Discord's site (the OAuth2 authorize page is under it).
pub const DEFAULT_OAUTH_URL: &str = "https://discord.com";
/// Discord's web app (a voice channel's page is `/channels/{guild}/{channel}` under it).
pub const DEFAULT_APP_URL: &str = "https://discord.com";

/// Where Discord is and who we are to it.
#[derive(Debug, Clone, clap::Args)]
pub struct DiscordSettings {
    /// Bot token (secret)
    #[arg(long = "discord-bot-token", env = "DISCORD_BOT_TOKEN", hide_env_values = true, value_parser = config::parse_secret(1))]
    pub bot_token: SecretString,
    /// OAuth2 application (client) id
    #[arg(long = "discord-client-id", env = "DISCORD_CLIENT_ID", value_parser = config::parse_application_id)]
    pub client_id: Id<ApplicationMarker>,
    /// OAuth2 client secret (secret)
    #[arg(long = "discord-client-secret", env = "DISCORD_CLIENT_SECRET", hide_env_values = true, value_parser = config::parse_secret(1))]
    pub client_secret: SecretString,
    /// Discord REST base URL
    #[arg(long = "discord-api-url", env = "DISCORD_API_URL", default_value = DEFAULT_API_URL, value_parser = parse_api_url)]
    pub api_url: Url,
    /// Discord OAuth2 base URL (the authorize page is under it)
    #[arg(long = "discord-oauth-url", env = "DISCORD_OAUTH_URL", default_value = DEFAULT_OAUTH_URL, value_parser = config::parse_http_url)]
    pub oauth_url: Url,
    /// Discord's web app, where "Open in Discord" links go (its
    /// /channels/{guild}/{channel} pages)
    #[arg(long = "discord-app-url", env = "DISCORD_APP_URL", default_value = DEFAULT_APP_URL, value_parser = config::parse_http_url)]
    pub app_url: Url,
}

/// twilight-http can only be pointed at `{scheme}://{host:port}/api/v10`, so the API URL
/// must end in `/api`.
pub fn parse_api_url(raw: &str) -> Result<Url, String> {
    let url = config::parse_http_url(raw)?;
    if url.path().trim_end_matches('/') != "/api" {
        return Err(format!(
            "expected Discord's API base ending in /api, such as https://discord.com/api, got {raw:?}"
        ));
    }
    Ok(url)
}

/// What went wrong talking to Discord, in terms a page can explain.
#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    /// Discord answered 5xx, timed out or could not be reached.
    #[error("Discord is not answering right now ({0})")]
    Unavailable(String),
    /// Discord refused (4xx) with its JSON error code, or 0.
    #[error("Discord refused: {message} (code {code}, HTTP {status})")]
    Refused {
        status: u16,
        code: u64,
        message: String,
    },
    /// The user's token is no longer good (expired, revoked).
    #[error("the Discord login is no longer valid")]
    Unauthorized,
    /// Discord answered something we cannot read.
    #[error("Discord sent an answer Coven cannot read: {0}")]
    Malformed(String),
}

impl DiscordError {
    pub fn code(&self) -> Option<u64> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_twilight(e: twilight_http::Error) -> Self {
        // The span of the REST call (see `discord.rest`) gets the status it ended with.
        if let ErrorType::Response { status, .. } = e.kind() {
            tracing::Span::current().record("status", status.get());
        }
        match e.kind() {
            ErrorType::Response {
                status,
                error,
                body,
            } => {
                let status = status.get();
                if status >= 500 {
                    return Self::Unavailable(format!("HTTP {status}"));
                }
                let (code, message) = match error {
                    ApiError::General(g) => (g.code, g.message.clone()),
                    _ => (0, String::from_utf8_lossy(body).into_owned()),
                };
                Self::Refused {
                    status,
                    code,
                    message,
                }
            }
            ErrorType::RequestTimedOut | ErrorType::RequestError | ErrorType::RequestCanceled => {
                Self::Unavailable(e.to_string())
            }
            ErrorType::Unauthorized => Self::Unauthorized,
            _ => Self::Malformed(e.to_string()),
        }
    }
}

type OAuthClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// A started login: where to send the browser, and what to keep to check its return.
pub struct Authorization {
    pub url: Url,
    pub state: String,
    pub verifier: String,
}

/// Tokens of a logged-in person.
#[derive(Debug, Clone)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: Option<String>,
    /// Unix ms after which the access token must be refreshed.
    pub expires_at: u64,
}

/// A guild as a person's own token lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersonGuild {
    pub id: Id<GuildMarker>,
    pub name: String,
    pub icon: Option<String>,
    /// Owner, Manage Server or Administrator: may add a bot to it.
    pub manages: bool,
}

/// Guilds asked for per page (Discord's largest).
const GUILDS_PAGE: u16 = 200;
/// A user is in at most 200 guilds (Nitro: 500); more than this is not a person.
const MAX_PERSON_GUILDS: usize = 1000;
/// How long a call with a person's token may take, its 429s waited out included.
const PERSON_WAIT: Duration = Duration::from_secs(5);

/// Runs a call made with a person's own token. Discord counts every 401, 403 and 429
/// toward banning the IP (10,000 in 10 minutes), so nothing is retried early:
/// twilight-http waits a 429 out as long as Discord says before it asks again, and here
/// the whole call gets [`PERSON_WAIT`] (a page does not hang on a long rate limit: the
/// person is told Discord is busy, and nothing more is sent). A 401 is `Unauthorized` at
/// once: the person logs in again.
async fn as_person<T, Fut>(call: Fut) -> Result<T, DiscordError>
where
    Fut: std::future::Future<Output = Result<T, twilight_http::Error>>,
{
    match tokio::time::timeout(PERSON_WAIT, call).await {
        Ok(answer) => answer.map_err(|e| match DiscordError::from_twilight(e) {
            // The person's token, not the bot's: their login is what ended.
            DiscordError::Refused { status: 401, .. } => DiscordError::Unauthorized,
            e => e,
        }),
        Err(_) => {
            tracing::Span::current().record("rate_limit_wait_ms", PERSON_WAIT.as_millis() as u64);
            metrics::counter!("coven_discord_person_waits_cut_total").increment(1);
            Err(DiscordError::Unavailable(
                "Discord asks this login to slow down".to_owned(),
            ))
        }
    }
}

/// A twilight-http client for `token` (`Bot …` or `Bearer …`), pointed at `proxy` when
/// set.
fn rest_client(token: &str, proxy: Option<&(String, bool)>) -> twilight_http::Client {
    let mut builder = twilight_http::Client::builder()
        .token(token.to_owned())
        .timeout(Duration::from_secs(10));
    if let Some((authority, plain)) = proxy {
        builder = builder.proxy(authority.clone(), *plain);
    }
    builder.build()
}

/// `DISCORD_API_URL`'s authority and whether it is plain http, when it is not Discord's
/// (the simulator): twilight-http takes nothing else.
fn proxy_of(api_url: &Url) -> anyhow::Result<Option<(String, bool)>> {
    if api_url.as_str().trim_end_matches('/') == DEFAULT_API_URL {
        return Ok(None);
    }
    let host = api_url
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("DISCORD_API_URL has no host"))?;
    let authority = match api_url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    Ok(Some((authority, api_url.scheme() == "http")))
}

/// The bot's REST client alone, for a command that needs no OAuth2 (the gateway).
pub fn bot_client(token: &str, api_url: &Url) -> anyhow::Result<twilight_http::Client> {
    Ok(rest_client(token, proxy_of(api_url)?.as_ref()))
}

/// What `GET /gateway/bot` says now: Discord's recommended shard count and how many
/// sessions the bot may still start. Discord asks that it not be cached long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BotGateway {
    pub shards: u32,
    /// Identifies allowed per 5 s, one per bucket (`shard_id % max_concurrency`).
    pub max_concurrency: u32,
    /// Session starts (identifies) left until `reset_after`.
    pub remaining: u32,
    pub reset_after: Duration,
}

#[tracing::instrument(name = "discord.rest", skip_all, fields(route = "GET /gateway/bot", status = tracing::field::Empty))]
pub async fn bot_gateway(bot: &twilight_http::Client) -> Result<BotGateway, DiscordError> {
    let info = bot
        .gateway()
        .authed()
        .await
        .map_err(DiscordError::from_twilight)?
        .model()
        .await
        .map_err(|e| DiscordError::Unavailable(format!("GET /gateway/bot: {e}")))?;
    let limit = info.session_start_limit;
    Ok(BotGateway {
        shards: info.shards.max(1),
        max_concurrency: u32::from(limit.max_concurrency).max(1),
        remaining: limit.remaining,
        reset_after: Duration::from_millis(limit.reset_after),
    })
}

/// The bot's REST client and the OAuth2 client, one per replica.
pub struct Discord {
    pub bot: twilight_http::Client,
    /// `DISCORD_API_URL`'s authority when it is not Discord's (the simulator), and
    /// whether it is plain http.
    proxy: Option<(String, bool)>,
    oauth: OAuthClient,
    http: PatientHttp,
    /// Where people come back to after Discord's pages (the bot authorization's
    /// redirect is under it).
    public_url: Url,
    bot_id: tokio::sync::OnceCell<Id<UserMarker>>,
}

/// What a room is in Discord: its voice channel and the role that opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeRoom {
    pub channel: Id<ChannelMarker>,
    pub role: Id<RoleMarker>,
    /// The channel's overwrites as made: who may see and join it.
    pub overwrites: Vec<PermissionOverwrite>,
}

impl Discord {
    pub fn new(settings: &DiscordSettings, public_url: &Url) -> anyhow::Result<Self> {
        let proxy = proxy_of(&settings.api_url)?;
        let bot = rest_client(settings.bot_token.expose_secret(), proxy.as_ref());
        let oauth = BasicClient::new(ClientId::new(settings.client_id.to_string()))
            .set_client_secret(ClientSecret::new(
                settings.client_secret.expose_secret().to_owned(),
            ))
            .set_auth_uri(AuthUrl::new(config::join_url(
                &settings.oauth_url,
                "oauth2/authorize",
            ))?)
            .set_token_uri(TokenUrl::new(config::join_url(
                &settings.api_url,
                "oauth2/token",
            ))?)
            .set_redirect_uri(RedirectUrl::new(config::join_url(
                public_url,
                "auth/callback",
            ))?);
        let http = reqwest::Client::builder()
            // The token endpoint must not redirect us elsewhere with the code in hand.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            bot,
            proxy,
            oauth,
            http: PatientHttp {
                http,
                budget: RATE_LIMIT_BUDGET,
            },
            public_url: public_url.clone(),
            bot_id: tokio::sync::OnceCell::new(),
        })
    }

    /// The Discord authorize URL for a new login, with PKCE and an unguessable state.
    pub fn authorize(&self) -> Authorization {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state) = self
            .oauth
            .authorize_url(CsrfToken::new_random)
            .add_scope(Scope::new("identify".to_owned()))
            // The picker lists a person's servers (`guilds`), their roles come from their
            // own token (`guilds.members.read`), and an invite adds them (`guilds.join`).
            .add_scope(Scope::new("guilds".to_owned()))
            .add_scope(Scope::new("guilds.join".to_owned()))
            .add_scope(Scope::new("guilds.members.read".to_owned()))
            .set_pkce_challenge(challenge)
            .url();
        Authorization {
            url,
            state: state.secret().clone(),
            verifier: verifier.secret().clone(),
        }
    }

    /// Discord's advanced bot authorization for `guild` (a code grant: `bot identify`,
    /// the guild fixed, exactly the permissions Coven uses, back to `/auth/added`), with
    /// PKCE and an unguessable state as a login has. Approving adds the bot; Coven learns
    /// of it from the gateway's GUILD_CREATE, never from the redirect.
    pub fn add_bot(&self, guild: Id<GuildMarker>) -> Result<Authorization, DiscordError> {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state) = self
            .oauth
            .authorize_url(CsrfToken::new_random)
            .add_scope(Scope::new("bot".to_owned()))
            .add_scope(Scope::new("identify".to_owned()))
            .add_extra_param("permissions", COVEN_PERMISSIONS.bits().to_string())
            .add_extra_param("guild_id", guild.to_string())
            .add_extra_param("disable_guild_select", "true")
            .set_redirect_uri(std::borrow::Cow::Owned(self.added_url()?))
            .set_pkce_challenge(challenge)
            .url();
        Ok(Authorization {
            url,
            state: state.secret().clone(),
            verifier: verifier.secret().clone(),
        })
    }

    fn added_url(&self) -> Result<RedirectUrl, DiscordError> {
        RedirectUrl::new(config::join_url(&self.public_url, "auth/added"))
            .map_err(|e| DiscordError::Malformed(e.to_string()))
    }

    /// Trades the code of a bot authorization for tokens: proof that Discord completed
    /// it (a forged redirect has no code Discord will take).
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "POST /oauth2/token (bot authorization)", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn exchange_added(
        &self,
        code: String,
        verifier: String,
    ) -> Result<Tokens, DiscordError> {
        let answer = self
            .oauth
            .exchange_code(AuthorizationCode::new(code))
            .set_redirect_uri(std::borrow::Cow::Owned(self.added_url()?))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier))
            .request_async(&self.http)
            .await;
        tokens(answer)
    }

    /// Trades the code from the callback for tokens.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "POST /oauth2/token", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn exchange(&self, code: String, verifier: String) -> Result<Tokens, DiscordError> {
        let answer = self
            .oauth
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(PkceCodeVerifier::new(verifier))
            .request_async(&self.http)
            .await;
        tokens(answer)
    }

    /// A new access token from a refresh token.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "POST /oauth2/token (refresh)", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn refresh(&self, refresh_token: String) -> Result<Tokens, DiscordError> {
        let answer = self
            .oauth
            .exchange_refresh_token(&RefreshToken::new(refresh_token))
            .request_async(&self.http)
            .await;
        tokens(answer)
    }

    /// Who the token belongs to (`GET /users/@me`).
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "GET /users/@me", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn me(&self, access_token: &str) -> Result<Person, DiscordError> {
        // The person's own token, through the same REST client (and its handling of
        // Discord's rate limits) as the bot's calls.
        let user = rest_client(&format!("Bearer {access_token}"), self.proxy.as_ref());
        let me = user
            .current_user()
            .await
            .map_err(DiscordError::from_twilight)?
            .model()
            .await
            .map_err(|e| DiscordError::Malformed(e.to_string()))?;
        let avatar_url = me.avatar.map(|hash| {
            crate::event::avatar_url(crate::event::DEFAULT_CDN, me.id, &hash.to_string())
        });
        Ok(Person {
            id: me.id,
            username: me.name,
            global_name: me.global_name,
            avatar_url,
        })
    }

    /// The guilds a person is in, as their own token lists them (`GET /users/@me/guilds`,
    /// scope `guilds`), every page of them: what the communities picker shows, at no cost
    /// to the bot's request budget.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "GET /users/@me/guilds", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn guilds_of(&self, access_token: &str) -> Result<Vec<PersonGuild>, DiscordError> {
        let user = rest_client(&format!("Bearer {access_token}"), self.proxy.as_ref());
        let mut out: Vec<PersonGuild> = Vec::new();
        loop {
            let after = out.last().map(|g| g.id);
            let mut request = user.current_user_guilds().limit(GUILDS_PAGE);
            if let Some(after) = after {
                request = request.after(after);
            }
            let page = as_person(request.into_future())
                .await?
                .models()
                .await
                .map_err(|e| DiscordError::Malformed(e.to_string()))?;
            let full = page.len() == usize::from(GUILDS_PAGE);
            out.extend(page.into_iter().map(|g| PersonGuild {
                id: g.id,
                name: g.name,
                icon: g.icon.map(|h| h.to_string()),
                // Discord's own rule for who may add a bot to a server.
                manages: g.owner
                    || g.permissions.contains(Permissions::MANAGE_GUILD)
                    || g.permissions.contains(Permissions::ADMINISTRATOR),
            }));
            if !full || out.len() >= MAX_PERSON_GUILDS {
                return Ok(out);
            }
        }
    }

    /// A person's roles in `guild`, asked with their own token (`GET
    /// /users/@me/guilds/{guild}/member`, scope `guilds.members.read`), or `None` when
    /// they are not in it: page views spend the person's budget, never the bot's.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "GET /users/@me/guilds/{guild}/member", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn roles_in(
        &self,
        access_token: &str,
        guild: Id<GuildMarker>,
    ) -> Result<Option<Vec<Id<RoleMarker>>>, DiscordError> {
        let user = rest_client(&format!("Bearer {access_token}"), self.proxy.as_ref());
        match as_person(user.current_user_guild_member(guild).into_future()).await {
            Ok(response) => {
                let member = response
                    .model()
                    .await
                    .map_err(|e| DiscordError::Malformed(e.to_string()))?;
                Ok(Some(member.roles))
            }
            // Unknown Guild: Discord answers so for a guild the person is not in.
            Err(DiscordError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bot's own user id, asked once.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "GET /users/@me (bot)", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    async fn bot_id(&self) -> Result<Id<UserMarker>, DiscordError> {
        self.bot_id
            .get_or_try_init(|| async {
                let me = self
                    .bot
                    .current_user()
                    .await
                    .map_err(DiscordError::from_twilight)?
                    .model()
                    .await
                    .map_err(|e| DiscordError::Malformed(e.to_string()))?;
                Ok(me.id)
            })
            .await
            .copied()
    }

    /// Makes a room: a role with no permissions of its own, a private voice channel that
    /// only the role, the creator and the bot can see and join, and the role for its
    /// creator. The creator's and the bot's own overwrites are also the room's ownership
    /// as Discord keeps it ([`room_overwrites`]), which the gateway reads back when Redis
    /// lost the room's record. If a step fails, what the earlier steps made is removed
    /// again, so a failure leaves nothing behind in the guild.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "POST /guilds/{guild}/roles, POST /guilds/{guild}/channels, PUT /guilds/{guild}/members/{user}/roles/{role}", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn create_room(
        &self,
        guild: Id<GuildMarker>,
        name: &str,
        creator: Id<UserMarker>,
        user_limit: u16,
        category: Option<Id<ChannelMarker>>,
    ) -> Result<MadeRoom, DiscordError> {
        let bot = self.bot_id().await?;
        let role = self
            .bot
            .create_role(guild)
            .name(&role_name(name))
            .permissions(Permissions::empty())
            .await
            .map_err(DiscordError::from_twilight)?
            .model()
            .await
            .map_err(|e| DiscordError::Malformed(e.to_string()))?
            .id;
        let overwrites = room_overwrites(guild, role, creator, bot);
        let mut request = self
            .bot
            .create_guild_channel(guild, name)
            .kind(ChannelType::GuildVoice)
            .user_limit(user_limit)
            .permission_overwrites(&overwrites);
        if let Some(category) = category {
            request = request.parent_id(category);
        }
        let made = async {
            let channel = request
                .await
                .map_err(DiscordError::from_twilight)?
                .model()
                .await
                .map_err(|e| DiscordError::Malformed(e.to_string()))?
                .id;
            Ok::<_, DiscordError>(channel)
        }
        .await;
        let channel = match made {
            Ok(channel) => channel,
            Err(e) => {
                self.undo(guild, None, Some(role)).await;
                return Err(e);
            }
        };
        if let Err(e) = self.grant(guild, creator, role).await {
            self.undo(guild, Some(channel), Some(role)).await;
            return Err(e);
        }
        Ok(MadeRoom {
            channel,
            role,
            overwrites,
        })
    }

    /// Best-effort removal after a failed creation; what cannot be removed is logged
    /// with its id so an operator can remove it by hand.
    async fn undo(
        &self,
        guild: Id<GuildMarker>,
        channel: Option<Id<ChannelMarker>>,
        role: Option<Id<RoleMarker>>,
    ) {
        if let Err(e) = self.delete_room(guild, channel, role).await {
            tracing::error!(
                error = %e,
                channel = ?channel,
                role = ?role,
                "could not remove a half-made room; remove it in Discord"
            );
        }
    }

    /// Deletes a room's channel, then its role. Something already gone counts as
    /// deleted, so closing twice (or racing another replica) is fine.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "DELETE /channels/{channel}, DELETE /guilds/{guild}/roles/{role}", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn delete_room(
        &self,
        guild: Id<GuildMarker>,
        channel: Option<Id<ChannelMarker>>,
        role: Option<Id<RoleMarker>>,
    ) -> Result<(), DiscordError> {
        if let Some(channel) = channel {
            found(self.bot.delete_channel(channel).await)?;
        }
        if let Some(role) = role {
            found(self.bot.delete_role(guild, role).await)?;
        }
        Ok(())
    }

    /// The guild a channel is in (`GET /channels/{id}`), `None` when Discord has no such
    /// channel for the bot: how a configured room category names its guild.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "GET /channels/{channel}", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn channel_guild(
        &self,
        channel: Id<ChannelMarker>,
    ) -> Result<Option<Id<GuildMarker>>, DiscordError> {
        match self.bot.channel(channel).await {
            Ok(response) => Ok(response
                .model()
                .await
                .map_err(|e| DiscordError::Malformed(e.to_string()))?
                .guild_id),
            Err(e) => match DiscordError::from_twilight(e) {
                DiscordError::Refused {
                    status: 404 | 403, ..
                } => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Gives a member a role (idempotent in Discord).
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "PUT /guilds/{guild}/members/{user}/roles/{role}", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn grant(
        &self,
        guild: Id<GuildMarker>,
        user: Id<UserMarker>,
        role: Id<RoleMarker>,
    ) -> Result<(), DiscordError> {
        sent(self.bot.add_guild_member_role(guild, user, role).await)
    }

    /// Adds someone to the guild with their own `guilds.join` token (a no-op when they
    /// are already in).
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "PUT /guilds/{guild}/members/{user}", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn add_to_guild(
        &self,
        guild: Id<GuildMarker>,
        user: Id<UserMarker>,
        access_token: &str,
    ) -> Result<(), DiscordError> {
        sent(self.bot.add_guild_member(guild, user, access_token).await)
    }

    /// Moves a member who is in a voice channel of the guild into another.
    #[tracing::instrument(name = "discord.rest", skip_all, fields(route = "PATCH /guilds/{guild}/members/{user}", status = tracing::field::Empty, rate_limit_wait_ms = tracing::field::Empty))]
    pub async fn move_member(
        &self,
        guild: Id<GuildMarker>,
        user: Id<UserMarker>,
        channel: Id<ChannelMarker>,
    ) -> Result<(), DiscordError> {
        sent(
            self.bot
                .update_guild_member(guild, user)
                .channel_id(Some(channel))
                .await,
        )
    }
}

/// How long one OAuth2 request (token exchange, refresh, `users/@me`) may spend waiting
/// out Discord's rate limit before the user is told Discord is not answering.
const RATE_LIMIT_BUDGET: Duration = Duration::from_secs(10);

/// Shortest wait after a 429, so a `retry_after` of 0 cannot turn into a busy loop.
const MIN_RATE_LIMIT_WAIT: Duration = Duration::from_millis(50);

/// The HTTP client of the OAuth2 calls: reqwest (redirects off) as oauth2 drives it, plus
/// what twilight-http does for the bot's calls and oauth2 does not: a 429 is waited out
/// (`Retry-After`, else the body's `retry_after`) and retried, within a budget. A 5xx or
/// a wait past the budget is an error, so oauth2 never mistakes it for a token answer.
struct PatientHttp {
    http: reqwest::Client,
    budget: Duration,
}

/// Why a request through [`PatientHttp`] got no answer worth reading.
#[derive(Debug, thiserror::Error)]
enum PatientError {
    #[error("Discord could not be reached: {0}")]
    Unreachable(String),
    #[error("Discord is rate limiting us for another {0:?}, past the deadline")]
    RateLimited(Duration),
    #[error("Discord answered HTTP {0}")]
    Server(u16),
}

impl<'c> oauth2::AsyncHttpClient<'c> for PatientHttp {
    type Error = PatientError;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<oauth2::HttpResponse, PatientError>>
                + Send
                + 'c,
        >,
    >;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + self.budget;
            let mut waited = Duration::ZERO;
            loop {
                let response = oauth2::AsyncHttpClient::call(&self.http, copy(&request))
                    .await
                    .map_err(|e| PatientError::Unreachable(unreachable_reason(&e)))?;
                let status = response.status();
                tracing::Span::current().record("status", status.as_u16());
                if status.is_server_error() {
                    return Err(PatientError::Server(status.as_u16()));
                }
                if status != oauth2::http::StatusCode::TOO_MANY_REQUESTS {
                    return Ok(response);
                }
                let wait = retry_after(response.headers(), response.body())
                    .unwrap_or(Duration::from_secs(1))
                    .max(MIN_RATE_LIMIT_WAIT);
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(PatientError::RateLimited(wait));
                }
                tracing::debug!(
                    path = request.uri().path(),
                    wait_ms = wait.as_millis(),
                    "Discord rate-limited an OAuth2 request; waiting"
                );
                metrics::counter!("coven_web_discord_rate_limit_waits_total").increment(1);
                waited += wait;
                tracing::Span::current().record("rate_limit_wait_ms", waited.as_millis() as u64);
                tokio::time::sleep(wait).await;
            }
        })
    }
}

/// A request again, for a retry (oauth2's requests are plain data).
fn copy(request: &oauth2::HttpRequest) -> oauth2::HttpRequest {
    let mut again = oauth2::http::Request::new(request.body().clone());
    *again.method_mut() = request.method().clone();
    *again.uri_mut() = request.uri().clone();
    *again.version_mut() = request.version();
    *again.headers_mut() = request.headers().clone();
    again
}

/// reqwest's own words, not oauth2's "client error".
fn unreachable_reason(e: &oauth2::HttpClientError<reqwest::Error>) -> String {
    match e {
        oauth2::HttpClientError::Reqwest(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// How long Discord asks us to wait after a 429: the `Retry-After` header (seconds), or
/// the JSON body's `retry_after` when the header is missing or unreadable.
fn retry_after(headers: &oauth2::http::HeaderMap, body: &[u8]) -> Option<Duration> {
    let seconds = |s: f64| (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s));
    let header = headers
        .get(oauth2::http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(seconds);
    header.or_else(|| {
        serde_json::from_slice::<serde_json::Value>(body)
            .ok()?
            .get("retry_after")?
            .as_f64()
            .and_then(seconds)
    })
}

/// A request whose answer body we do not need.
fn sent<T>(
    answer: Result<twilight_http::Response<T>, twilight_http::Error>,
) -> Result<(), DiscordError> {
    answer.map(drop).map_err(DiscordError::from_twilight)
}

/// Whether the thing asked about exists: 404 (Unknown Channel, Role, Member, User...)
/// is an answer, not a failure. Deleting what is already gone is done.
fn found<T>(
    answer: Result<twilight_http::Response<T>, twilight_http::Error>,
) -> Result<bool, DiscordError> {
    match answer.map_err(DiscordError::from_twilight) {
        Ok(_) => Ok(true),
        Err(DiscordError::Refused { status: 404, .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Discord's limit on a role's name, in characters.
const ROLE_NAME_MAX: usize = 100;

/// The room role's name, `Room: {name}`, shortened with an ellipsis to fit Discord's
/// limit: a room name may use all of the channel's 100 characters, and the role is only
/// for admins to recognise.
fn role_name(room: &str) -> String {
    const PREFIX: &str = "Room: ";
    let full = format!("{PREFIX}{room}");
    if full.chars().count() <= ROLE_NAME_MAX {
        return full;
    }
    let keep = ROLE_NAME_MAX - PREFIX.chars().count() - 1;
    let cut: String = room.chars().take(keep).collect();
    format!("{PREFIX}{}…", cut.trim_end())
}

fn tokens<E: std::error::Error + 'static>(
    answer: Result<
        oauth2::basic::BasicTokenResponse,
        oauth2::RequestTokenError<E, oauth2::basic::BasicErrorResponse>,
    >,
) -> Result<Tokens, DiscordError> {
    match answer {
        Ok(t) => {
            let lifetime = t.expires_in().unwrap_or(Duration::from_secs(3600));
            Ok(Tokens {
                access_token: t.access_token().secret().clone(),
                refresh_token: t.refresh_token().map(|r| r.secret().clone()),
                expires_at: now_ms() + u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX / 2),
            })
        }
        // invalid_grant and friends: the code or refresh token is not (or no longer) good.
        Err(oauth2::RequestTokenError::ServerResponse(r)) => {
            tracing::info!(error = ?r.error(), "Discord refused a token request");
            Err(DiscordError::Unauthorized)
        }
        Err(oauth2::RequestTokenError::Request(e)) => Err(DiscordError::Unavailable(e.to_string())),
        Err(oauth2::RequestTokenError::Parse(e, _)) => Err(DiscordError::Malformed(e.to_string())),
        Err(oauth2::RequestTokenError::Other(e)) => Err(DiscordError::Unavailable(e)),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use axum::http::{HeaderMap, StatusCode};
    use oauth2::AsyncHttpClient;

    use super::{PatientError, PatientHttp, retry_after, role_name};

    #[test]
    fn the_wait_comes_from_retry_after_else_the_body() {
        let headers = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("retry-after", v.parse().unwrap());
            h
        };
        let body =
            br#"{"message":"You are being rate limited.","retry_after":0.25,"global":false}"#;
        for (h, b, want) in [
            (headers("2"), &body[..], Some(Duration::from_secs(2))),
            (headers("1.5"), &body[..], Some(Duration::from_millis(1500))),
            (
                HeaderMap::new(),
                &body[..],
                Some(Duration::from_millis(250)),
            ),
            (headers("soon"), &body[..], Some(Duration::from_millis(250))),
            (headers("-1"), &body[..], Some(Duration::from_millis(250))),
            (headers("NaN"), b"{}", None),
            (HeaderMap::new(), b"not json", None),
            (HeaderMap::new(), br#"{"retry_after":"1"}"#, None),
            (HeaderMap::new(), br#"{"retry_after":-3}"#, None),
        ] {
            assert_eq!(
                retry_after(&h, b),
                want,
                "{h:?} {}",
                String::from_utf8_lossy(b)
            );
        }
    }

    /// The n-th answer (from 0): status, headers, body.
    type Script = fn(usize) -> (StatusCode, Vec<(&'static str, &'static str)>, &'static str);

    /// A token endpoint that answers with `script(n)` for its n-th request, on a real
    /// socket; returns its URL and how many requests it saw.
    async fn endpoint(script: Script) -> (String, Arc<AtomicUsize>) {
        let seen = Arc::new(AtomicUsize::new(0));
        let count = seen.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move |body: String| {
                let n = count.fetch_add(1, Ordering::SeqCst);
                async move {
                    assert_eq!(body, "grant_type=x", "every try sends the same request");
                    let (status, headers, body) = script(n);
                    let mut h = HeaderMap::new();
                    for (k, v) in headers {
                        h.insert(k, v.parse().unwrap());
                    }
                    (status, h, body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{addr}/token"), seen)
    }

    async fn post(url: &str, budget: Duration) -> Result<u16, PatientError> {
        let client = PatientHttp {
            http: reqwest::Client::new(),
            budget,
        };
        let request = oauth2::http::Request::post(url)
            .body(b"grant_type=x".to_vec())
            .unwrap();
        client.call(request).await.map(|r| r.status().as_u16())
    }

    const LIMITED: &str =
        r#"{"message":"You are being rate limited.","retry_after":0.1,"global":false}"#;

    #[tokio::test]
    async fn a_429_is_waited_out_and_retried() {
        let (url, seen) = endpoint(|n| match n {
            0 | 1 => (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("retry-after", "0.1")],
                LIMITED,
            ),
            _ => (StatusCode::OK, vec![], "{}"),
        })
        .await;
        let started = Instant::now();
        assert_eq!(post(&url, Duration::from_secs(10)).await.ok(), Some(200));
        assert_eq!(seen.load(Ordering::SeqCst), 3);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn without_retry_after_the_body_says_how_long() {
        let (url, seen) = endpoint(|n| match n {
            0 => (StatusCode::TOO_MANY_REQUESTS, vec![], LIMITED),
            _ => (StatusCode::OK, vec![], "{}"),
        })
        .await;
        let started = Instant::now();
        assert_eq!(post(&url, Duration::from_secs(10)).await.ok(), Some(200));
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_wait_past_the_budget_gives_up_at_once() {
        let (url, seen) = endpoint(|_| {
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("retry-after", "30")],
                LIMITED,
            )
        })
        .await;
        let started = Instant::now();
        let answer = post(&url, Duration::from_secs(10)).await;
        assert!(
            matches!(answer, Err(PatientError::RateLimited(_))),
            "{answer:?}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn endless_429s_end_within_the_budget() {
        let (url, seen) = endpoint(|_| {
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("retry-after", "0.2")],
                LIMITED,
            )
        })
        .await;
        let started = Instant::now();
        let answer = post(&url, Duration::from_secs(1)).await;
        assert!(
            matches!(answer, Err(PatientError::RateLimited(_))),
            "{answer:?}"
        );
        assert!(started.elapsed() <= Duration::from_millis(1500));
        assert!(seen.load(Ordering::SeqCst) >= 4, "it kept trying");
    }

    #[tokio::test]
    async fn a_zero_wait_is_not_a_busy_loop_and_errors_are_not_answers() {
        let (url, seen) = endpoint(|_| {
            (
                StatusCode::TOO_MANY_REQUESTS,
                vec![("retry-after", "0")],
                LIMITED,
            )
        })
        .await;
        let _ = post(&url, Duration::from_millis(500)).await;
        assert!(
            seen.load(Ordering::SeqCst) <= 11,
            "at most one try per 50 ms"
        );

        let (url, _) = endpoint(|_| (StatusCode::SERVICE_UNAVAILABLE, vec![], "down")).await;
        let answer = post(&url, Duration::from_secs(10)).await;
        assert!(
            matches!(answer, Err(PatientError::Server(503))),
            "{answer:?}"
        );
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}/token", l.local_addr().unwrap())
        };
        let answer = post(&closed, Duration::from_secs(10)).await;
        assert!(
            matches!(answer, Err(PatientError::Unreachable(_))),
            "{answer:?}"
        );
    }

    #[test]
    fn role_names_always_fit_discords_limit() {
        assert_eq!(role_name("Draft pod"), "Room: Draft pod");
        let fits = "x".repeat(94);
        assert_eq!(role_name(&fits), format!("Room: {fits}"));
        for room in [
            "x".repeat(95),
            "x".repeat(100),
            "\u{e9}".repeat(100),
            "👨\u{200D}👩\u{200D}👧".repeat(20),
            format!("{}  tail", "y".repeat(91)),
        ] {
            let role = role_name(&room);
            assert!(role.chars().count() <= 100, "{role}");
            assert!(role.starts_with("Room: ") && role.ends_with('…'), "{role}");
        }
        assert_eq!(role_name(&"x".repeat(100)).chars().count(), 100);
    }
}
