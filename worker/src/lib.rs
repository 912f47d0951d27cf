//! Quilt: a lightweight container runtime and task orchestrator for AI agent
//! workloads. Agents publish tasks to NATS; Quilt workers run each in an
//! isolated, limited container and publish the result.
//!
//! This crate is the whole runtime; the `quilt` binary is a thin command line
//! over it. Components (see DESIGN.md in the project's shared docs):
//!
//! - [`engine`]: containers: namespaces, cgroups, rootfs, process spawn, wait, kill.
//! - [`env`]: language environments: packages built once into a layer, cached by content.
//! - [`image`]: the OCI content store, registry pull, image import, layer unpacking.
//! - [`events`]: the durable event log (redb, group commit), projections, snapshots.
//! - [`broker`]: the embedded nats-server (config, start, supervision, stop), NATS
//!   connections, subject names and the JetStream set-up.
//! - [`protocol`]: the wire messages: task, result, output chunk, event.
//! - [`orchestrator`]: the worker: claims tasks, runs them, records and publishes results.
//! - [`api`]: the control API, a NATS micro service over a running worker.
//! - [`shim`]: the per-container parent of a long-running container's init: log segments, exit file.
//!
//! `unsafe` lives only in the engine's syscall layer.

#![deny(unsafe_code)]

pub mod api;
pub mod broker;
pub mod engine;
pub mod env;
pub mod events;
pub mod image;
pub mod metrics;
pub mod orchestrator;
pub mod protocol;
pub mod shim;

/// Chooses rustls's cryptography provider for the whole process, once.
/// Two dependencies (the NATS client and the registry client) enable
/// different providers of rustls; with both compiled in, rustls refuses to
/// guess and panics at the first TLS connection unless one is installed.
pub(crate) fn install_crypto_provider() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // An error means another part of the process installed one first: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
