//! High availability: appends that wait for a replica (`REDIS_MIN_REPLICAS`), and the whole
//! stack on a Sentinel URL over TLS riding out failovers longer than five seconds.
//! Redis is real `redis-server` processes (primary, replicas, three sentinels); nothing
//! here sleeps to synchronise: every wait is on a condition with a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coven::bus::redis::{Durability, RedisBus};
use coven::bus::{Bus, BusError, Request, Since};
use coven::event::{EventData, EventId};
use fred::prelude::*;
use twilight_model::id::Id;

use crate::harness::sentinel::plain_node;
use crate::harness::within;

const GUILD: u64 = 1190000000000000001;

fn ping(seq: u64) -> EventData {
    EventData::Ping { seq, ts: seq }
}

async fn client(url: &str) -> Client {
    let client = Client::new(Config::from_url(url).expect("URL"), None, None, None);
    client.init().await.expect("Redis answers");
    client
}

/// Whether the replica at `url` is linked to its primary.
async fn linked(replica: &Client) -> Option<()> {
    let info: String = replica
        .info(Some(fred::types::InfoKind::Replication))
        .await
        .ok()?;
    info.contains("master_link_status:up").then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_is_done_published_and_replayed_only_once_a_replica_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let primary = plain_node(dir.path(), "primary", None);
    let replica = plain_node(dir.path(), "replica", Some(primary.port));
    let url = format!("redis://127.0.0.1:{}", primary.port);
    let replica_client = client(&format!("redis://127.0.0.1:{}", replica.port)).await;
    crate::harness::wait_for("the replica to link", || linked(&replica_client)).await;
    let durability = Durability {
        min_replicas: 1,
        timeout: Duration::from_millis(300),
    };
    let connect = || {
        RedisBus::connect_durable(
            &url,
            "test",
            Id::new(GUILD),
            1_000,
            Duration::from_secs(5),
            durability,
        )
    };
    let writer = connect().await.unwrap();
    let reader = connect().await.unwrap();
    let raw = client(&url).await;
    let events = format!("test:{{{GUILD}}}:events");
    let mut live = reader.subscribe();
    let request = |seq| Request {
        writer: "test-writer".to_owned(),
        seq,
    };

    let first = writer
        .append_once(ping(1), None, &request(1))
        .await
        .unwrap();
    let heard = within("the first event live", live.recv()).await.unwrap();
    assert_eq!(heard.id, first.id, "a durable append is published");

    // The replica stops acknowledging: the append is in the primary's log but not done.
    replica.freeze();
    let short = writer.append_once(ping(2), None, &request(2)).await;
    assert!(
        matches!(
            short,
            Err(BusError::NotDurable {
                acked: 0,
                wanted: 1
            })
        ),
        "{short:?}"
    );
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "the primary holds the withheld event");
    assert_eq!(
        reader.since(first.id, 100).await.unwrap(),
        Since::Events(Vec::new()),
        "replay stops at the durable id"
    );
    assert!(
        matches!(reader.snapshot().await, Err(BusError::NotDurable { .. })),
        "a snapshot valid at a withheld event is not handed out"
    );
    assert!(
        matches!(
            live.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "nothing withheld was published"
    );
    let again = writer.append_once(ping(2), None, &request(2)).await;
    assert!(
        matches!(again, Err(BusError::NotDurable { .. })),
        "{again:?}"
    );
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "a retried request appends nothing twice");

    replica.thaw();
    let second = within("the retried append", async {
        loop {
            match writer.append_once(ping(2), None, &request(2)).await {
                Ok(event) => return event,
                Err(BusError::NotDurable { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    let len: u64 = raw.xlen(&events).await.unwrap();
    assert_eq!(len, 2, "the retry that succeeded appended nothing either");
    let heard = within("the second event live", live.recv()).await.unwrap();
    assert_eq!(heard.id, second.id, "published once durable");
    assert!(second.id > first.id);
    match reader.since(first.id, 100).await.unwrap() {
        Since::Events(events) => {
            assert_eq!(
                events.iter().map(|e| e.id).collect::<Vec<EventId>>(),
                [second.id]
            );
        }
        Since::Gap => panic!("no gap"),
    }
    assert_eq!(reader.snapshot().await.unwrap().at, second.id);

    // An unnamed append (a web replica's) is withheld the same way, and published by the
    // next append that is durable, in id order.
    replica.freeze();
    let withheld = writer.append(ping(3), None).await;
    assert!(
        matches!(withheld, Err(BusError::NotDurable { .. })),
        "{withheld:?}"
    );
    replica.thaw();
    let fourth = within("an append after the thaw", async {
        loop {
            match writer.append_once(ping(4), None, &request(4)).await {
                Ok(event) => return event,
                Err(BusError::NotDurable { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    let third = within("the withheld event live", live.recv())
        .await
        .unwrap();
    assert!(
        matches!(third.data, EventData::Ping { seq: 3, .. }),
        "{third:?}"
    );
    let heard = within("the fourth event live", live.recv()).await.unwrap();
    assert_eq!(heard.id, fourth.id);
    let _ = Arc::clone(&heard);
}
