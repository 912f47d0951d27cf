//! Shared by the benchmarks (`#[path]`-included): publishing a burst of
//! tasks the way an agent does.

use async_nats::jetstream::message::PublishMessage;

/// Publishes a busybox `/bin/true` task for each id to `quilt.tasks`, with
/// the id as JetStream message id, all before waiting for any PubAck; then
/// waits for every one.
pub(crate) async fn publish_true_tasks(
    jetstream: &async_nats::jetstream::Context,
    ids: impl IntoIterator<Item = String>,
) {
    let mut acks = Vec::new();
    for id in ids {
        let task = serde_json::json!({"id": id, "image": "busybox", "command": ["/bin/true"]});
        acks.push(
            jetstream
                .send_publish(
                    "quilt.tasks",
                    PublishMessage::build()
                        .payload(serde_json::to_vec(&task).unwrap().into())
                        .message_id(&id),
                )
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}
