//! The private Redis the integration tests rely on: it starts on its own port, answers,
//! and survives a restart, without touching the machine's shared server.

use fred::prelude::*;

use crate::harness::RedisServer;

#[tokio::test]
async fn a_private_redis_starts_answers_and_restarts() {
    let mut redis = RedisServer::start();
    assert_ne!(redis.port, 6379);
    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.expect("connects");
    let _: () = client.set("k", "v", None, None, false).await.unwrap();
    let v: String = client.get("k").await.unwrap();
    assert_eq!(v, "v");
    client.quit().await.unwrap();

    redis.restart();
    let client = Client::new(Config::from_url(&redis.url()).unwrap(), None, None, None);
    client.init().await.expect("connects after restart");
    let gone: Option<String> = client.get("k").await.unwrap();
    assert_eq!(gone, None, "a restarted test server starts empty");
}
