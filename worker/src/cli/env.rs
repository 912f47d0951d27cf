//! `quilt env ls|inspect|prune`: the local store of built language
//! environments (`<data-dir>/environments`).

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;
use quilt::env::EnvStore;

#[derive(Subcommand, Debug)]
pub(crate) enum EnvCommand {
    /// List built environments, most recently used first.
    Ls {
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one environment (its key, or a unique prefix of it) and its build log.
    Inspect {
        /// The key or a prefix.
        key: String,
    },
    /// Remove environments, least recently used first, until the store holds at
    /// most --keep bytes (default: remove all); never one a running task uses.
    Prune {
        /// Bytes to keep, e.g. 2G (default 0).
        #[arg(long, default_value = "0")]
        keep: String,
    },
}

pub(crate) fn run(data_dir: &Path, command: EnvCommand) -> anyhow::Result<u8> {
    let store = EnvStore::open(data_dir).context("opening the environment store")?;
    match command {
        EnvCommand::Ls { json } => {
            let all = store.list();
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(0);
            }
            println!("{:<16} {:<36} {:>10} {:>10}  SPEC", "KEY", "IMAGE", "SIZE", "BUILD");
            for meta in all {
                let mut spec = Vec::new();
                for (manager, list) in [
                    ("apt", &meta.spec.apt),
                    ("apk", &meta.spec.apk),
                    ("pip", &meta.spec.pip),
                    ("npm", &meta.spec.npm),
                ] {
                    if !list.is_empty() {
                        spec.push(format!("{manager}: {}", list.join(" ")));
                    }
                }
                println!(
                    "{:<16} {:<36} {:>9.1}M {:>9.1}s  {}",
                    &meta.key[..16],
                    meta.image,
                    meta.size as f64 / (1 << 20) as f64,
                    meta.build_ms as f64 / 1e3,
                    spec.join("; ")
                );
            }
            Ok(0)
        }
        EnvCommand::Inspect { key } => {
            let matches: Vec<_> =
                store.list().into_iter().filter(|meta| meta.key.starts_with(&key)).collect();
            match matches.as_slice() {
                [meta] => {
                    println!("{}", serde_json::to_string_pretty(meta)?);
                    let log = std::fs::read_to_string(store.entry_dir(&meta.key).join("build.log"))
                        .unwrap_or_default();
                    println!("--- build log ---\n{log}");
                    Ok(0)
                }
                [] => {
                    // A failed build: its log, found by the key's prefix too.
                    let failed_dir =
                        store.failed_log(&key).parent().map(Path::to_path_buf).unwrap_or_default();
                    let found = std::fs::read_dir(&failed_dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|entry| entry.path())
                        .find(|path| {
                            path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(&key))
                        });
                    match found.and_then(|path| std::fs::read_to_string(path).ok()) {
                        Some(log) => {
                            println!("the build of {key} failed; its log:\n{log}");
                            Ok(1)
                        }
                        None => anyhow::bail!("no environment {key}"),
                    }
                }
                _ => anyhow::bail!("{key} is the prefix of {} environments; give more of it", matches.len()),
            }
        }
        EnvCommand::Prune { keep } => {
            let keep = quilt::engine::parse_size(&keep)
                .with_context(|| format!("--keep {keep:?}: a size such as 0, 500M or 2G"))?;
            for key in store.evict(keep) {
                println!("removed {key}");
            }
            Ok(0)
        }
    }
}
