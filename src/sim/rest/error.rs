//! Discord's JSON errors (`{"code", "message", "errors"?}`) with their documented
//! statuses, and how the world's refusals map onto them.
//!
//! Shapes only; must not decide whether a request is refused.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::sim::world::Refusal;

#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) body: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"code": code, "message": message.into()}),
        }
    }

    /// A known Discord JSON error code with its documented message and status.
    pub fn code(code: u32) -> Self {
        let (status, message) = match code {
            10003 => (StatusCode::NOT_FOUND, "Unknown Channel"),
            10004 => (StatusCode::NOT_FOUND, "Unknown Guild"),
            10007 => (StatusCode::NOT_FOUND, "Unknown Member"),
            10009 => (StatusCode::NOT_FOUND, "Unknown Overwrite"),
            10011 => (StatusCode::NOT_FOUND, "Unknown Role"),
            10013 => (StatusCode::NOT_FOUND, "Unknown User"),
            10065 => (StatusCode::NOT_FOUND, "Unknown Voice State"),
            40009 => (
                StatusCode::BAD_REQUEST,
                "Only one channel can have a parent_id modified at a time",
            ),
            40032 => (
                StatusCode::BAD_REQUEST,
                "Target user is not connected to voice.",
            ),
            50001 => (StatusCode::FORBIDDEN, "Missing Access"),
            50013 => (StatusCode::FORBIDDEN, "Missing Permissions"),
            50025 => (StatusCode::UNAUTHORIZED, "Invalid OAuth2 access token"),
            50035 => (StatusCode::BAD_REQUEST, "Invalid Form Body"),
            50109 => (
                StatusCode::BAD_REQUEST,
                "The request body contains invalid JSON.",
            ),
            _ => (StatusCode::BAD_REQUEST, "Error"),
        };
        Self::new(status, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized")
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, 0, "404: Not Found")
    }

    /// 50035 with one field error, nested as Discord nests them: a dotted path
    /// (`permission_overwrites.0.id`) is one object per step, the error list at the leaf
    /// ("Error Messages" in Opcodes and Status Codes).
    pub fn invalid_field(field: &str, code: &str, message: &str) -> Self {
        let mut e = Self::code(50035);
        let mut errors = json!({"_errors": [{"code": code, "message": message}]});
        for step in field.rsplit('.') {
            errors = json!({ step: errors });
        }
        e.body["errors"] = errors;
        e
    }
}

impl ApiError {
    /// The same refusal for a field of entry `index` of a JSON array body: Discord nests
    /// it under the entry's index (`{"0": {"position": {"_errors": ...}}}`).
    pub fn in_entry(mut self, index: usize) -> Self {
        if let Some(errors) = self.body.get_mut("errors").map(Value::take) {
            self.body["errors"] = json!({ index.to_string(): errors });
        }
        self
    }

    /// 50035 for the body as a whole: Discord puts the error list at the top of `errors`.
    pub fn invalid_body(code: &str, message: &str) -> Self {
        let mut e = Self::code(50035);
        e.body["errors"] = json!({"_errors": [{"code": code, "message": message}]});
        e
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::UnknownChannel => Self::code(10003),
            Refusal::UnknownRole => Self::code(10011),
            Refusal::UnknownMember => Self::code(10007),
            Refusal::UnknownUser => Self::code(10013),
            Refusal::UnknownVoiceState => Self::code(10065),
            Refusal::UnknownOverwrite => Self::code(10009),
            Refusal::MissingAccess => Self::code(50001),
            Refusal::NotInVoice => Self::code(40032),
            Refusal::MissingPermission(_) => Self::code(50013),
            Refusal::ChannelFull => Self::new(StatusCode::BAD_REQUEST, 0, "Channel is full."),
            Refusal::OneParentAtATime => Self::code(40009),
            Refusal::Invalid(field, code, message) => Self::invalid_field(field, code, &message),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

pub(super) type ApiResult<T = Response> = Result<T, ApiError>;
