//! The control API: a NATS micro service named `quilt` that every worker
//! runs, so `$SRV.PING.quilt`, `$SRV.INFO.quilt` and `$SRV.STATS.quilt`
//! answer with each worker (its id in the service metadata `worker_id`).
//!
//! Each verb answers on `quilt.api.<worker_id>.<verb>` (that worker) and on
//! `quilt.api.any.<verb>` (one worker of the fleet, through a queue group).
//! Replies are JSON [`ApiReply`] values: `{"ok": ...}` or
//! `{"error": {"kind", "message"}}` with a stable kind (`not_found`,
//! `bad_request`, `internal`); schemas are in `schemas/api/`.
//!
//! Verbs: `containers.list`; `containers.inspect` (the request body is the
//! container id); `images.list`; `worker.info`; `health`. It reads the
//! worker through [`WorkerView`] and changes nothing: the verbs that act on
//! containers (exec, stop, rm, logs) come with long-running containers.

use futures_util::StreamExt;

use crate::broker::subjects;
use crate::orchestrator::WorkerView;
use crate::protocol::{ApiReply, ErrorInfo};

/// The service's name, as `$SRV.*` lists it.
pub const SERVICE_NAME: &str = "quilt";

/// The verbs every worker answers.
pub const VERBS: [&str; 5] =
    ["containers.list", "containers.inspect", "images.list", "worker.info", "health"];

/// Failures starting the service.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Registering the service or one of its endpoints.
    #[error("starting the control API service: {0}")]
    Start(#[source] async_nats::Error),
}

/// Starts the service on the worker's connection and answers requests
/// until the connection closes (run it in a task of its own).
pub async fn serve(view: WorkerView) -> Result<(), ApiError> {
    use async_nats::service::ServiceExt;
    let worker_id = view.worker_id().to_owned();
    let service = view
        .client()
        .service_builder()
        .description("Quilt worker control API")
        .metadata([("worker_id".to_owned(), worker_id.clone())].into())
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(ApiError::Start)?;
    let own = service.group(subjects::api_prefix(&worker_id));
    let any = service.group_with_queue_group(subjects::api_prefix(subjects::API_ANY), "quilt-api");
    let mut endpoints = Vec::new();
    for verb in VERBS {
        for group in [&own, &any] {
            let endpoint = group.endpoint(verb).await.map_err(ApiError::Start)?;
            endpoints.push(endpoint.map(move |request| (verb, request)).boxed());
        }
    }
    let mut requests = futures_util::stream::select_all(endpoints);
    while let Some((verb, request)) = requests.next().await {
        let view = view.clone();
        tokio::spawn(async move {
            let reply = answer(&view, verb, &request.message.payload).await;
            if let Err(error) = request.respond(Ok(reply.into())).await {
                tracing::debug!(%error, verb, "control API reply not sent");
            }
        });
    }
    Ok(())
}

fn reply<T: serde::Serialize>(value: ApiReply<T>) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap_or_else(|error| {
        serde_json::to_vec(&ApiReply::<()>::Error(ErrorInfo {
            kind: "internal".into(),
            message: format!("reply does not serialize: {error}"),
        }))
        .unwrap_or_default()
    })
}

fn error(kind: &str, message: impl Into<String>) -> ApiReply<()> {
    ApiReply::Error(ErrorInfo { kind: kind.to_owned(), message: message.into() })
}

async fn answer(view: &WorkerView, verb: &str, payload: &[u8]) -> Vec<u8> {
    match verb {
        "containers.list" => reply(ApiReply::Ok(view.containers())),
        "containers.inspect" => {
            let Ok(id) = std::str::from_utf8(payload).map(str::trim) else {
                return reply(error("bad_request", "the request body must be a container id (UTF-8)"));
            };
            match view.containers().into_iter().find(|container| container.id == id) {
                Some(container) => reply(ApiReply::Ok(container)),
                None => {
                    reply(error("not_found", format!("no container {id:?} on worker {}", view.worker_id())))
                }
            }
        }
        "images.list" => {
            let images = {
                let view = view.clone();
                tokio::task::spawn_blocking(move || view.images()).await
            };
            match images {
                Ok(Ok(images)) => reply(ApiReply::Ok(images)),
                Ok(Err(failure)) => reply(error("internal", failure.to_string())),
                Err(failure) => reply(error("internal", failure.to_string())),
            }
        }
        "worker.info" => reply(ApiReply::Ok(view.info())),
        "health" => reply(ApiReply::Ok("ok")),
        other => reply(error("bad_request", format!("unknown verb {other:?}"))),
    }
}
