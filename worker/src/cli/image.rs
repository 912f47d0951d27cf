//! `quilt image pull|import|ls|inspect|rm|prune`: the local image store.

use std::path::{Path, PathBuf};

use std::io::{IsTerminal, Write};

use anyhow::Context;
use clap::{Args, Subcommand};
use quilt::image::{ImageRecord, ImageStore, PullOptions};

#[derive(Subcommand, Debug)]
pub(crate) enum ImageCommand {
    /// Pull an image from a registry (verified, resumable) and unpack it.
    Pull(PullArgs),
    /// Import an OCI image layout (directory or tarball), a docker-archive
    /// tarball, or a rootfs tarball (as a one-layer image).
    Import(ImportArgs),
    /// List stored images.
    Ls(ListArgs),
    /// Show one image as JSON.
    Inspect {
        /// Image name or manifest digest.
        name: String,
    },
    /// Remove an image's name (its layers stay until `prune`).
    Rm {
        /// Image names or manifest digests.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove blobs and snapshots no image refers to; never one a running container uses.
    Prune,
}

#[derive(Args, Debug)]
pub(crate) struct ImportArgs {
    /// The directory or tarball.
    path: PathBuf,
    /// Name to store it under, e.g. python:3.11 or registry.example/team/tool:1.
    #[arg(long)]
    name: String,
}

#[derive(Args, Debug)]
pub(crate) struct PullArgs {
    /// Image reference, e.g. busybox, ghcr.io/org/tool:1 or localhost:5000/x@sha256:...
    name: String,
    /// A registry (host or host:port) to reach over plain HTTP; loopback
    /// registries always are (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    /// Docker config.json with credentials (`auths`); default
    /// $HOME/.docker/config.json when it exists.
    #[arg(long, value_name = "FILE")]
    credentials: Option<PathBuf>,
    /// Give up when the download is not done within this (`30s`, `10m`); unpacking is not counted.
    #[arg(long, value_name = "DUR", default_value = "10m")]
    timeout: String,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// Print JSON records instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(data_dir: &Path, command: ImageCommand) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    let store = ImageStore::open(data_dir).context("opening the image store")?;
    match command {
        ImageCommand::Pull(args) => {
            let timeout =
                quilt::engine::parse_duration(&args.timeout)
                    .filter(|timeout| !timeout.is_zero())
                    .with_context(|| format!("invalid --timeout {:?}: use e.g. 30s or 10m", args.timeout))?;
            let options = PullOptions {
                timeout,
                insecure_registries: args.insecure_registries,
                credentials: args.credentials,
                progress: std::io::stderr().is_terminal(),
                ..PullOptions::default()
            };
            let record =
                store.pull(&args.name, &options).with_context(|| format!("pulling {}", args.name))?;
            writeln!(out, "{} {}", record.name, record.manifest_digest)?;
        }
        ImageCommand::Import(args) => {
            let record = store
                .import(&args.path, &args.name)
                .with_context(|| format!("importing {}", args.path.display()))?;
            writeln!(out, "{} {}", record.name, record.manifest_digest)?;
        }
        ImageCommand::Ls(args) => {
            let records = store.list()?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&records)?)?;
            } else {
                writeln!(out, "{:<50} {:<19} {:>7} {:>10}", "NAME", "DIGEST", "LAYERS", "SIZE")?;
                for record in &records {
                    writeln!(
                        out,
                        "{:<50} {:<19} {:>7} {:>10}",
                        record.name,
                        short_digest(&record.manifest_digest),
                        record.layers.len(),
                        human_size(record.size())
                    )?;
                }
            }
        }
        ImageCommand::Inspect { name } => {
            let record: ImageRecord = store.find(&name)?;
            writeln!(out, "{}", serde_json::to_string_pretty(&record)?)?;
        }
        ImageCommand::Rm { names } => {
            for name in names {
                let record = store.find(&name)?;
                store.remove(&record.name)?;
                writeln!(out, "removed {}", record.name)?;
            }
        }
        ImageCommand::Prune => {
            let report = store.prune()?;
            writeln!(
                out,
                "removed {} blobs ({}) and {} snapshots; kept {} snapshots in use",
                report.blobs,
                human_size(report.bytes),
                report.snapshots,
                report.in_use
            )?;
        }
    }
    Ok(0)
}

fn short_digest(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
