//! The browser's files (`assets/`: our CSS and JS, vendored htmx), embedded in the binary
//! at build time by `build.rs`.
//!
//! Each is served at `/assets/<name>` with an ETag and a day's revalidation, and at a
//! content-hashed name (`/assets/app.<hash>.css`) that may be cached for a year, since any
//! change gives a new name; pages link the hashed names through [`url`]. Text files are
//! sent brotli- or gzip-compressed when the browser accepts it (memory-serve does all of
//! this).
//!
//! Owns asset URLs and serving. Must not serve anything that is not in `assets/`.

use std::sync::OnceLock;

use axum::Router;
use memory_serve::{CacheControl, Manifest, MemoryServe};

static MANIFEST: OnceLock<Manifest> = OnceLock::new();

fn assets() -> MemoryServe {
    memory_serve::load!()
        .index_file(None)
        .enable_hashed_routes(true)
        .enable_brotli(true)
        .enable_gzip(true)
        .cache_control(CacheControl::Medium)
}

/// The router for `/assets` (to be nested there). Call once: memory-serve keeps what it
/// serves for the life of the process.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let assets = assets();
    let _ = MANIFEST.set(assets.manifest());
    assets.into_router()
}

/// The URL a page links for asset `path` (`"/app.css"`): its content-hashed name.
pub fn url(path: &str) -> String {
    let manifest = MANIFEST.get_or_init(|| assets().manifest());
    format!("/assets{}", manifest.get(path).unwrap_or(path))
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_link_content_hashed_names_of_embedded_files() {
        let css = super::url("/app.css");
        assert!(
            css.starts_with("/assets/app.") && css.ends_with(".css") && css != "/assets/app.css",
            "{css}"
        );
        assert_eq!(super::url("/nope.js"), "/assets/nope.js");
    }
}
