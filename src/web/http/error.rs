//! The one place where failures become responses: every handler returns
//! `Result<_, WebError>`, and each kind has one status and one readable page. Never shows
//! internals (stack traces, tokens, Redis URLs); those go to the log.

use askama::Template;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use tower_sessions::Session;

use crate::bus::{BusError, Deployment};
use crate::discord::DiscordError;
use crate::web::session::{SessionUser, USER};
use crate::web::view::UserView;

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// No valid session. Pages send the browser to log in and come back to `return_to`;
    /// the API answers 401.
    #[error("not logged in")]
    NotLoggedIn { return_to: String, api: bool },
    /// A login from before communities: logged in again, once, with a page that says why.
    #[error("logged in before communities; log in again")]
    LoginAgain { api: bool },
    /// The community is past `MAX_GUILDS`: told so, served nothing.
    #[error("past this deployment's limit of {0} communities")]
    PastLimit(usize),
    /// The bot was removed from the guild (told to its former members only).
    #[error("Coven was removed from this server")]
    GuildGone,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Gone(String),
    #[error("request body too large")]
    TooLarge,
    #[error("too many requests; retry after {retry_after} s")]
    TooMany { retry_after: u64 },
    #[error("too many live streams (at most {max} per person on a replica)")]
    TooManyStreams { max: usize },
    #[error(transparent)]
    Discord(#[from] DiscordError),
    #[error("shared state unavailable: {0}")]
    Bus(#[from] BusError),
    #[error("sessions unavailable: {0}")]
    Session(#[from] tower_sessions::session::Error),
}

#[derive(Template)]
#[template(path = "web/error.html")]
struct ErrorPage<'a> {
    status: u16,
    title: &'a str,
    message: &'a str,
    /// Extra guidance under the message.
    hint: &'a str,
    /// What the page offers besides its words.
    offer: Offer,
    /// The logged-in header, filled in by [`with_header`] where the session is known.
    user: Option<UserView>,
    delayed: Option<String>,
}

/// Where an error page sends people next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Back to the rooms list.
    Rooms,
    /// Log in (again).
    LogIn,
}

/// An error page's words, kept on its response so that [`with_header`], which sits
/// inside the session layer, can render the same page again with the logged-in header.
#[derive(Debug, Clone)]
struct ErrorContent {
    status: StatusCode,
    title: String,
    message: String,
    hint: String,
    offer: Offer,
    /// Whether the session may be read for the header: not when the shared state (where
    /// sessions live) is what failed, or the page would wait on it a second time.
    header: bool,
}

impl ErrorContent {
    fn render(&self, user: Option<UserView>) -> String {
        ErrorPage {
            status: self.status.as_u16(),
            title: &self.title,
            message: &self.message,
            hint: &self.hint,
            offer: self.offer,
            user,
            delayed: None,
        }
        .render()
        .unwrap_or_else(|_| format!("{}: {}", self.status, self.message))
    }
}

impl WebError {
    /// What a room one may not see answers, exactly like a room that does not exist.
    pub fn no_such_room() -> Self {
        WebError::NotFound(
            "This room does not exist (any more). Rooms close when nobody has used them for a while."
                .to_owned(),
        )
    }
}

pub fn page(status: StatusCode, title: &str, message: &str, hint: &str) -> Response {
    page_with(status, title, message, hint, Offer::Rooms)
}

fn page_with(status: StatusCode, title: &str, message: &str, hint: &str, offer: Offer) -> Response {
    let content = ErrorContent {
        status,
        title: title.to_owned(),
        message: message.to_owned(),
        hint: hint.to_owned(),
        offer,
        header: true,
    };
    // Rendered without the session here (this runs where none may be at hand);
    // `with_header` adds the logged-in header where there is one.
    let mut response = (status, Html(content.render(None))).into_response();
    response.extensions_mut().insert(content);
    response
}

/// Sits inside the session layer, around every route of the site (the not-found fallback
/// included): an error page answered to someone logged in is rendered again with the
/// header they see everywhere else (their name, Rooms, Log out), so an error is never a
/// dead end. Status and headers stay as the error set them; a session that cannot be read
/// leaves the page as it was.
pub async fn with_header(session: Session, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let Some(content) = response
        .extensions_mut()
        .remove::<ErrorContent>()
        .filter(|c| c.header)
    else {
        return response;
    };
    let user = match session.get::<SessionUser>(USER).await {
        Ok(Some(user)) => user,
        Ok(None) => return response,
        Err(e) => {
            tracing::debug!(error = %e, "error page without the header: session unreadable");
            return response;
        }
    };
    let body = content.render(Some(UserView::of(&user)));
    let (mut parts, _) = response.into_parts();
    // The length was the anonymous page's.
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        match &self {
            WebError::NotLoggedIn { return_to, api } => {
                if *api {
                    let mut r = (StatusCode::UNAUTHORIZED, "log in first\n").into_response();
                    r.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Cookie realm=\"coven_session\""),
                    );
                    return r;
                }
                let query = url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("return_to", return_to)
                    .finish();
                Redirect::to(&format!("/auth/login?{query}")).into_response()
            }
            WebError::LoginAgain { api: true, .. } => {
                (StatusCode::UNAUTHORIZED, "log in again\n").into_response()
            }
            WebError::LoginAgain { .. } => page_with(
                StatusCode::UNAUTHORIZED,
                "Please log in again",
                "Coven now serves every Discord server its bot is in, and needs your permission to see which of your servers those are.",
                "Log in once more with Discord; you will not be asked again.",
                Offer::LogIn,
            ),
            WebError::PastLimit(max) => page(
                StatusCode::FORBIDDEN,
                "Past this Coven's limit",
                &format!(
                    "This Coven serves at most {max} communities, and this server came after them, \
                     so Coven shows nothing of it here."
                ),
                "Ask whoever runs this Coven to raise MAX_GUILDS.",
            ),
            WebError::GuildGone => page_with(
                StatusCode::NOT_FOUND,
                "Coven is no longer in this server",
                "The Coven bot was removed from this Discord server, so its rooms are not shown here any more.",
                "A server admin can add Coven again from the communities page.",
                Offer::Rooms,
            ),
            WebError::BadRequest(m) => page(StatusCode::BAD_REQUEST, "That did not work", m, ""),
            WebError::Forbidden(m) => page(StatusCode::FORBIDDEN, "Not allowed", m, ""),
            WebError::NotFound(m) => page(StatusCode::NOT_FOUND, "Not found", m, ""),
            WebError::Conflict(m) => page(StatusCode::CONFLICT, "Not possible right now", m, ""),
            WebError::Gone(m) => page(StatusCode::GONE, "No longer valid", m, ""),
            // The unread rest of the body is answered with `Connection: close` by
            // `ops::close_if_unread`, like every answer that leaves a body unread.
            WebError::TooLarge => page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Too large",
                "That request was larger than Coven accepts.",
                "",
            ),
            WebError::TooMany { retry_after } => {
                let mut r = page(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Slow down",
                    "That was a lot of requests in a short time.",
                    &format!("Try again in {retry_after} s."),
                );
                if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                    r.headers_mut().insert(header::RETRY_AFTER, v);
                }
                r
            }
            WebError::TooManyStreams { max } => {
                let mut r = page(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Too many live pages",
                    &format!(
                        "You already have {max} Coven pages receiving live updates from this server, \
                         which is as many as one person may hold."
                    ),
                    "Close some Coven tabs or windows; this page updates again when you reload it.",
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
                r
            }
            WebError::Discord(e) => {
                tracing::warn!(error = %e, "Discord call failed");
                match e {
                    DiscordError::Unavailable(_) => page(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Discord is not answering",
                        "Discord did not answer in time. Nothing was changed; try again in a moment.",
                        "",
                    ),
                    DiscordError::Unauthorized => page(
                        StatusCode::UNAUTHORIZED,
                        "Your Discord login ran out",
                        "Discord no longer accepts this login.",
                        "Log in again to continue.",
                    ),
                    DiscordError::Refused { code, .. } => page(
                        StatusCode::BAD_GATEWAY,
                        "Discord refused",
                        &refusal_in_words(*code, &e.to_string()),
                        "",
                    ),
                    DiscordError::Malformed(_) => page(
                        StatusCode::BAD_GATEWAY,
                        "Discord answered strangely",
                        "Discord sent an answer Coven cannot read. Nothing was changed; try again.",
                        "",
                    ),
                }
            }
            WebError::Bus(e) => {
                tracing::error!(error = %e, "shared state unavailable");
                unavailable()
            }
            WebError::Session(e) => {
                tracing::error!(error = %e, "session store unavailable");
                unavailable()
            }
        }
    }
}

/// Discord's error codes that people can act on, in plain words.
fn refusal_in_words(code: u64, fallback: &str) -> String {
    match code {
        50013 => "The Coven bot lacks a permission it needs here (Manage Roles and Manage Channels, \
                  and its role must be above the room roles). Ask a server admin to check the bot's role."
            .to_owned(),
        10003 => "That voice channel no longer exists in Discord.".to_owned(),
        10011 => "That room's role no longer exists in Discord.".to_owned(),
        10007 => "That person is not a member of the server.".to_owned(),
        30005 => "The server has reached Discord's limit of 250 roles; close some rooms first.".to_owned(),
        30013 => "The server has reached Discord's limit of 500 channels; close some rooms first.".to_owned(),
        40032 => "You need to be in a voice channel of the server for Coven to move you.".to_owned(),
        50035 => "Discord did not accept that (for example the room name).".to_owned(),
        _ => fallback.to_owned(),
    }
}

/// Wraps the site's routes (outside the session layer), so what fails for want of Redis
/// fails the same way everywhere, in one place:
/// - while the bus knows Redis is unreachable, every page, post and stream answers the
///   503 page at once, instead of each request waiting out its command timeout;
/// - a 500 from below — tower-sessions answers a bare, empty 500 when it cannot save a
///   session, and handlers themselves never answer 500 — becomes the same readable 503
///   with `Retry-After`.
pub async fn shared_state_guard(
    State(bus): State<std::sync::Arc<dyn Deployment>>,
    request: Request,
    next: Next,
) -> Response {
    if !bus.reachable() {
        tracing::debug!(path = %request.uri().path(), "Redis unreachable; answering 503");
        return unavailable();
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(
            "a request failed with 500 (a session that could not be saved, or a bug); \
             answering 503"
        );
        return unavailable();
    }
    response
}

pub fn unavailable() -> Response {
    let mut r = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Temporarily unavailable",
        "Coven cannot reach its shared state right now.",
        "This usually passes within seconds; reload the page.",
    );
    if let Some(content) = r.extensions_mut().get_mut::<ErrorContent>() {
        content.header = false;
    }
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}
