//! Rendering broker-config/embedded.conf with the values of one start.

use std::path::Path;

use super::BrokerError;

/// The template, compiled into the binary so an installed `quilt` does not
/// need the source tree.
const EMBEDDED_TEMPLATE: &str = include_str!("../../../broker-config/embedded.conf");

/// Renders the embedded single-node config. Values go into quoted strings of
/// the nats-server config language, so anything that could end the string or
/// the line (quotes, backslashes, control characters) is refused rather than
/// escaped: a path like that is a mistake, not something to support.
pub(super) fn render_embedded(port: u16, server_name: &str, store_dir: &Path) -> Result<String, BrokerError> {
    if server_name.is_empty()
        || !server_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(BrokerError::RenderConfig {
            reason: format!(
                "server name {server_name:?} must be non-empty ASCII letters, digits, '-' or '_'"
            ),
        });
    }
    let store_dir = store_dir.to_str().ok_or_else(|| BrokerError::RenderConfig {
        reason: format!("store directory {} is not UTF-8", store_dir.display()),
    })?;
    if let Some(bad) = store_dir.chars().find(|&c| c == '"' || c == '\\' || c.is_control()) {
        return Err(BrokerError::RenderConfig {
            reason: format!("store directory {store_dir:?} contains the character {bad:?}"),
        });
    }
    Ok(EMBEDDED_TEMPLATE
        .replace("{{port}}", &port.to_string())
        .replace("{{server_name}}", server_name)
        .replace("{{store_dir}}", store_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_placeholder_and_keeps_sync_always() {
        let text = render_embedded(4222, "quilt-1", Path::new("/var/lib/quilt/broker/jetstream")).unwrap();
        assert!(!text.contains("{{"), "unrendered placeholder in:\n{text}");
        assert!(text.contains("listen: \"127.0.0.1:4222\""));
        assert!(text.contains("server_name: \"quilt-1\""));
        assert!(text.contains("store_dir: \"/var/lib/quilt/broker/jetstream\""));
        assert!(text.contains("sync_interval: always"));
    }

    #[test]
    fn refuses_values_that_could_escape_their_string() {
        for dir in ["/tmp/a\"b", "/tmp/a\nlisten: 0.0.0.0:1", "/tmp/a\\b"] {
            let error = render_embedded(1, "q", Path::new(dir)).unwrap_err();
            assert_eq!(error.kind(), "render_config", "{dir:?}");
        }
        for name in ["", "a b", "a\"", "a\n"] {
            let error = render_embedded(1, name, Path::new("/tmp/x")).unwrap_err();
            assert_eq!(error.kind(), "render_config", "{name:?}");
        }
    }
}
