//! Logging in to a web replica through the simulator's OAuth2 flow, as a browser does,
//! but without a cookie jar: a benchmark keeps many people's sessions on one client.

/// Logs `user` (a simulated user's id or username) in at `web` (`http://host:port`);
/// answers the session cookie (`name=value`), cycled at login as Coven cycles it.
pub async fn session_cookie(
    http: &reqwest::Client,
    web: &str,
    user: &str,
) -> anyhow::Result<String> {
    let cookie_of = |r: &reqwest::Response| {
        r.headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_owned)
    };
    let location = |r: &reqwest::Response| -> anyhow::Result<String> {
        Ok(r.headers()
            .get("location")
            .ok_or_else(|| anyhow::anyhow!("{} without a redirect", r.url()))?
            .to_str()?
            .to_owned())
    };
    let start = http.get(format!("{web}/auth/login")).send().await?;
    let cookie = cookie_of(&start).ok_or_else(|| anyhow::anyhow!("no session cookie"))?;
    let authorize = location(&start)?;
    let picked = http
        .get(format!("{authorize}&sim_user={user}"))
        .send()
        .await?;
    let done = http
        .get(location(&picked)?)
        .header("cookie", &cookie)
        .send()
        .await?;
    anyhow::ensure!(done.status() == 303, "login of {user}: {}", done.status());
    Ok(cookie_of(&done).unwrap_or(cookie))
}
