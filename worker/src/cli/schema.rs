//! `quilt schema`: writes the JSON Schema files of the wire protocol
//! (`schemas/` in the source tree is this command's output, and a test
//! fails when the two differ).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct SchemaArgs {
    /// Directory to write the schema files into (task.json, result.json, ..., api/*.json).
    #[arg(long, default_value = "schemas")]
    out: PathBuf,
}

pub(crate) fn run(args: SchemaArgs) -> anyhow::Result<u8> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    for (name, text) in quilt::protocol::schema_files() {
        let path = args.out.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(0)
}
