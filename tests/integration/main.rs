//! Quilt's integration tests: real containers on a busybox rootfs, run as root.
//! One binary (ripgrep style); one module per area.

mod abuse;
mod accounts;
mod bad_input;
mod broker;
mod bundle;
mod cgroup_v2;
mod cluster;
mod control_api;
mod cross_container;
mod debian;
mod deploy_units;
mod environments;
mod escapes;
mod events;
mod images;
mod isolation;
mod limits;
mod long_running;
mod long_running_engine;
mod metrics;
mod pipeline;
mod pipeline_crash;
mod pipeline_poison;
mod pipeline_tls;
mod python_client;
mod registry;
mod sim;
mod userns;
