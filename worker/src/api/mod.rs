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
//! Verbs: `containers.list`; `containers.inspect` (the request body is a
//! container id or a long-running container's name); `containers.stop`,
//! `containers.remove` (`{"name", "grace_s"}`); `containers.logs`
//! (`{"name", "offset"}` or `{"name", "tail"}`, with `max_bytes`);
//! `containers.exec` (`{"name", "command", "env", "workdir", "user",
//! "timeout_s"}`: runs it inside the container and replies with the task
//! result); `containers.forget` (`{"name"}`: drops the name's registration
//! when its owner is gone for good); `images.list`; `worker.info`; `health`.
//!
//! A verb on a long-running container that reaches a worker through
//! `quilt.api.any` is relayed to the owner named in `quilt_containers`, so
//! clients need not know where a container lives.

use futures_util::StreamExt;

use crate::broker::subjects;
use crate::orchestrator::WorkerView;
use crate::protocol::{ApiReply, ContainerRequest, ErrorInfo};

/// The service's name, as `$SRV.*` lists it.
pub const SERVICE_NAME: &str = "quilt";

/// The verbs every worker answers.
pub const VERBS: [&str; 10] = [
    "containers.list",
    "containers.inspect",
    "containers.stop",
    "containers.remove",
    "containers.logs",
    "containers.exec",
    "containers.forget",
    "images.list",
    "worker.info",
    "health",
];

/// How long a relayed request may take: the longest exec (an hour) and
/// then some. The asking client sets its own, shorter, limit.
const RELAY_TIMEOUT_S: u64 = 3700;

/// Most log bytes one `containers.logs` reply carries.
pub const MAX_LOG_BYTES: usize = 256 * 1024;

/// Failures starting the service.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Registering the service or one of its endpoints.
    #[error("starting the control API service: {0}")]
    Start(#[source] async_nats::Error),
}

/// Starts the service on the worker's connection: returns once every
/// endpoint is subscribed, with the task that answers requests until the
/// connection closes.
pub async fn serve(view: WorkerView) -> Result<tokio::task::JoinHandle<()>, ApiError> {
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
    // Make sure the server has the subscriptions before anyone is told to ask.
    view.client().flush().await.map_err(|error| ApiError::Start(error.into()))?;
    Ok(tokio::spawn(async move {
        // The service stays registered while this task runs.
        let _service = service;
        while let Some((verb, request)) = requests.next().await {
            let view = view.clone();
            tokio::spawn(async move {
                let relayable = request.message.subject.starts_with(&subjects::api_prefix(subjects::API_ANY));
                let reply = answer(&view, verb, &request.message.payload, relayable).await;
                if let Err(error) = request.respond(Ok(reply.into())).await {
                    tracing::debug!(%error, verb, "control API reply not sent");
                }
            });
        }
    }))
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

async fn answer(view: &WorkerView, verb: &str, payload: &[u8], relayable: bool) -> Vec<u8> {
    match verb {
        "containers.list" => reply(ApiReply::Ok(view.containers())),
        "containers.stop" | "containers.remove" | "containers.logs" | "containers.exec"
        | "containers.forget" => {
            let request: ContainerRequest = match serde_json::from_slice(payload) {
                Ok(request) => request,
                Err(failure) => return reply(error("bad_request", format!("the request body: {failure}"))),
            };
            if verb != "containers.forget" && view.long_running(&request.name).is_none() {
                if relayable {
                    if let Some(relayed) = relay(view, &request.name, verb, payload).await {
                        return relayed;
                    }
                }
                return reply(error(
                    "not_found",
                    format!("no long-running container {:?} on worker {}", request.name, view.worker_id()),
                ));
            }
            container_verb(view, verb, request).await
        }
        "containers.inspect" => {
            let Ok(id) = std::str::from_utf8(payload).map(str::trim) else {
                return reply(error("bad_request", "the request body must be a container id (UTF-8)"));
            };
            if relayable && view.long_running(id).is_none() && !view.containers().iter().any(|c| c.id == id) {
                if let Some(relayed) = relay(view, id, verb, payload).await {
                    return relayed;
                }
            }
            match view
                .containers()
                .into_iter()
                .find(|container| container.id == id || container.name.as_deref() == Some(id))
            {
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

/// Asks the owner of container `name` (by its registration) instead.
async fn relay(view: &WorkerView, name: &str, verb: &str, payload: &[u8]) -> Option<Vec<u8>> {
    let value = view.jetstream().containers.get(name).await.ok()??;
    let owner: crate::protocol::ContainerRegistration = serde_json::from_slice(&value).ok()?;
    if owner.worker_id == view.worker_id() {
        return None;
    }
    // As long as the slowest verb may take (an exec's timeout, a stop's
    // grace period), not the client's default of 10 s.
    let request = async_nats::Request::new()
        .payload(payload.to_vec().into())
        .timeout(Some(std::time::Duration::from_secs(RELAY_TIMEOUT_S)));
    match view.client().send_request(subjects::api(&owner.worker_id, verb), request).await {
        Ok(message) => Some(message.payload.to_vec()),
        Err(_) => Some(reply(error(
            "unavailable",
            format!("container {name:?} belongs to worker {}, which did not answer", owner.worker_id),
        ))),
    }
}

fn grace(request: &ContainerRequest) -> std::time::Duration {
    request
        .grace_s
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map_or(std::time::Duration::from_secs(10), |seconds| {
            std::time::Duration::from_secs_f64(seconds.min(3600.0))
        })
}

fn control_error(failure: crate::orchestrator::long_running::ControlError) -> Vec<u8> {
    reply(error(failure.kind, failure.message))
}

async fn container_verb(view: &WorkerView, verb: &str, request: ContainerRequest) -> Vec<u8> {
    match verb {
        "containers.stop" => match view.stop(&request.name, grace(&request)).await {
            Ok(summary) => reply(ApiReply::Ok(summary)),
            Err(failure) => control_error(failure),
        },
        "containers.remove" => match view.remove(&request.name, grace(&request)).await {
            Ok(()) => reply(ApiReply::Ok(request.name)),
            Err(failure) => control_error(failure),
        },
        "containers.logs" => {
            let view = view.clone();
            let max_bytes = request.max_bytes.unwrap_or(MAX_LOG_BYTES).clamp(1, MAX_LOG_BYTES);
            let read = tokio::task::spawn_blocking(move || {
                view.logs(&request.name, request.offset, request.tail, max_bytes)
            })
            .await;
            match read {
                Ok(Ok(chunk)) => reply(ApiReply::Ok(crate::protocol::LogChunkReply {
                    data: String::from_utf8_lossy(&chunk.data).into_owned(),
                    start: chunk.start,
                    next: chunk.next,
                })),
                Ok(Err(failure)) => control_error(failure),
                Err(failure) => reply(error("internal", failure.to_string())),
            }
        }
        "containers.exec" => match view.exec(request).await {
            Ok(result) => reply(ApiReply::Ok(result)),
            Err(failure) => control_error(failure),
        },
        "containers.forget" => match view.forget(&request.name).await {
            Ok(()) => reply(ApiReply::Ok(request.name)),
            Err(failure) => control_error(failure),
        },
        other => reply(error("bad_request", format!("unknown verb {other:?}"))),
    }
}
