//! Image references: the `alpine`, `ghcr.io/org/tool:v1` and
//! `localhost:5000/x@sha256:…` strings that tasks and the command line name
//! images with, parsed and normalised the way Docker and containerd read them.
//!
//! This module owns the text form only. It does not contact registries, look
//! host names up, or decide trust beyond reporting whether the registry host
//! is loopback (where, as in Docker, plain HTTP is allowed).
//!
//! # Grammar
//!
//! It follows the grammar of [distribution/reference] (the package Docker,
//! containerd and the registry itself use):
//!
//! ```text
//! reference        := name [ ":" tag ] [ "@" digest ]
//! name             := [ registry "/" ] path
//! registry         := host [ ":" port ]
//! host             := domain-label ( "." domain-label )* | "[" IPv6 address "]"
//! domain-label     := [a-zA-Z0-9] | [a-zA-Z0-9] [a-zA-Z0-9-]* [a-zA-Z0-9]
//! port             := [0-9]+            (and at most 65535)
//! path             := path-component ( "/" path-component )*
//! path-component   := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag              := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! digest           := algorithm ":" hex   (sha256: 64, sha512: 128 lowercase hex)
//! ```
//!
//! The first `/`-separated component is the registry when the name has more
//! than one component and that first one contains `.` or `:` or is exactly
//! `localhost`; otherwise the whole name is a Docker Hub path. Hosts may hold
//! uppercase letters, paths may not. Whitespace and control characters are
//! refused everywhere, the path (after normalisation) is at most 255
//! characters, and input over 4096 bytes is refused before any other work.
//!
//! # Normalisation
//!
//! - No registry means Docker Hub, `docker.io`; `index.docker.io` (Docker
//!   Hub's legacy name) becomes `docker.io` too.
//! - A single-component Docker Hub path gets the official-images namespace:
//!   `alpine` is `docker.io/library/alpine`. Other registries keep paths as
//!   written.
//! - Neither tag nor digest means the tag `latest`. A reference with both
//!   keeps both; the digest is what gets pulled.
//! - `name:5000` with no `/` is a Docker Hub name with the tag `5000`, not a
//!   registry, exactly as in Docker.
//! - A bare 64-character hex string is refused: Docker reads it as an image
//!   id, never as a name.
//!
//! [`Reference`]'s `Display` is the canonical full form
//! (`docker.io/library/alpine:latest`), and parsing it gives the same value
//! back.
//!
//! # Where this is stricter than Docker
//!
//! Docker parses these; this module refuses them:
//!
//! - A port must fit in 16 bits, and a bracketed IPv6 host must be an address
//!   (Docker's pattern takes any run of hex digits and colons, such as `[:::]`).
//! - A host name is at most 253 characters, the DNS limit. Docker sets none;
//!   without one, a near-4096-byte reference with a huge host was accepted
//!   but its canonical form (with `:latest` added) was over the input limit
//!   and did not parse back (found by the `image_reference` fuzz target).
//! - Digests are `sha256` or `sha512`, the algorithms the OCI image
//!   specification registers; Docker also takes `sha384`.
//! - A first component with uppercase letters and no `.` or `:` (`Foo/bar`) is
//!   an invalid repository. Current distribution/reference and containerd
//!   read it as a registry host `Foo`; older Docker releases refused it, and
//!   an unqualified uppercase word is far likelier a mistyped Docker Hub
//!   namespace than a registry.
//!
//! # Why by hand
//!
//! `oci-client` re-exports `oci-spec`'s `distribution::Reference`, which needs
//! the `regex` crate (and oci-spec's `distribution` feature), has no IPv6
//! hosts, accepts uppercase digest hex and reports fixed errors without the
//! offending text. The grammar is small enough that a hand-written matcher is
//! shorter than the regular expressions and can say which part is wrong. The
//! registry client can build its own reference from this type's canonical
//! string.
//!
//! [distribution/reference]: https://github.com/distribution/reference/blob/main/reference.go

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Longest input looked at; longer text is refused before any parsing.
const MAX_INPUT_BYTES: usize = 4096;
/// distribution's `RepositoryNameTotalLengthMax`, applied to the normalised path.
const MAX_REPOSITORY_LENGTH: usize = 255;
/// Longest tag, from distribution's tag grammar.
const MAX_TAG_LENGTH: usize = 128;
/// Longest registry host name: the DNS limit (RFC 1035 2.3.4, without the
/// root label). It also keeps every canonical form far below [`MAX_INPUT_BYTES`].
const MAX_HOST_LENGTH: usize = 253;
/// Characters of offending text quoted in an error message.
const QUOTE_LIMIT: usize = 80;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// Where Docker Hub's registry API actually answers; `docker.io` itself does not serve it.
const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";
const OFFICIAL_NAMESPACE: &str = "library";
const LOCALHOST: &str = "localhost";
const DEFAULT_TAG: &str = "latest";

/// A parsed, normalised image reference.
///
/// Serialises as its canonical string and deserialises through [`Reference::parse`],
/// so a reference read from the wire is validated like one typed by hand.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

/// Why a string is not an image reference. Each message is one line that
/// names the problem and quotes the offending text (cut to about 80 characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The reference is the empty string.
    #[error("empty image reference")]
    Empty,
    /// The input is longer than the 4096 bytes any reference could need.
    #[error("image reference is {length} bytes long; the limit is {MAX_INPUT_BYTES}")]
    TooLong {
        /// Length of the input in bytes.
        length: usize,
    },
    /// The repository path is missing, malformed, uppercase or over 255 characters.
    #[error("invalid repository name: {0}")]
    InvalidRepository(String),
    /// The tag is empty, too long or has characters tags cannot have.
    #[error("invalid tag: {0}")]
    InvalidTag(String),
    /// The digest is malformed, of an unsupported algorithm, or of the wrong length.
    #[error("invalid digest: {0}")]
    InvalidDigest(String),
    /// The registry host or its port is malformed.
    #[error("invalid registry host: {0}")]
    InvalidRegistry(String),
}

impl Reference {
    /// Parses and normalises a reference as Docker does: `alpine` is
    /// `docker.io/library/alpine:latest`, `user/img` is `docker.io/user/img:latest`,
    /// `index.docker.io/x` is `docker.io/library/x:latest`, and
    /// `ghcr.io/org/tool@sha256:…`, `localhost:5000/x:1`, `127.0.0.1:5000/a/b:t`
    /// and `[::1]:5000/x` name their registries. `name:tag@digest` keeps both;
    /// the digest is what [`Reference::reference_for_pull`] asks for.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        if text.len() > MAX_INPUT_BYTES {
            return Err(ReferenceError::TooLong { length: text.len() });
        }
        if text.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if text.len() == 64 && text.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(ReferenceError::InvalidRepository(format!(
                "{} is 64 hex characters, which Docker reads as an image id, not a name",
                quote(text)
            )));
        }

        // Neither names nor tags may hold '@', so the first one starts the digest.
        let (name_and_tag, digest) = match text.split_once('@') {
            Some((name_and_tag, digest)) => (name_and_tag, Some(digest)),
            None => (text, None),
        };
        // A ':' after the last '/' can only start the tag; earlier ones belong to a registry port.
        let (name, tag) = match name_and_tag.rfind(':') {
            Some(colon) if !name_and_tag[colon..].contains('/') => {
                (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
            }
            _ => (name_and_tag, None),
        };

        let (registry, repository) = split_registry(name)?;
        if let Some(problem) = repository_problem(&repository) {
            return Err(ReferenceError::InvalidRepository(problem));
        }
        if let Some(problem) = tag.and_then(tag_problem) {
            return Err(ReferenceError::InvalidTag(problem));
        }
        if let Some(digest) = digest {
            validate_digest(digest)?;
        }

        let tag = match (tag, digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(Reference { registry: registry.to_owned(), repository, tag, digest: digest.map(str::to_owned) })
    }

    /// The registry as named, with its port: `docker.io`, `ghcr.io`, `localhost:5000`, `[::1]:5000`.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host (and port) to contact: `registry-1.docker.io` for Docker Hub,
    /// [`Reference::registry`] for every other registry.
    pub fn registry_endpoint(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// The repository path within the registry: `library/alpine`, `org/tool`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, when the reference has one (`latest` when it had neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, `algorithm:hex`, when the reference has one.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// What to ask the registry for: the digest when present, else the tag, else `latest`.
    pub fn reference_for_pull(&self) -> &str {
        self.digest.as_deref().or(self.tag.as_deref()).unwrap_or(DEFAULT_TAG)
    }

    /// True when the registry host is loopback (`localhost`, `127.0.0.0/8`,
    /// `[::1]`), where plain HTTP is allowed as Docker allows it. Decided from
    /// the text alone: no name is looked up.
    pub fn is_loopback_registry(&self) -> bool {
        let host = match self.registry.strip_prefix('[') {
            Some(bracketed) => bracketed.split_once(']').map_or(bracketed, |(inside, _)| inside),
            None => self.registry.split_once(':').map_or(self.registry.as_str(), |(host, _)| host),
        };
        if host.eq_ignore_ascii_case(LOCALHOST) {
            return true;
        }
        if let Ok(address) = host.parse::<Ipv4Addr>() {
            return address.is_loopback();
        }
        match host.parse::<Ipv6Addr>() {
            Ok(address) => {
                address.is_loopback() || address.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
            Err(_) => false,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(formatter, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(formatter, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Reference::parse(text)
    }
}

impl TryFrom<String> for Reference {
    type Error = ReferenceError;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Reference::parse(&text)
    }
}

impl From<Reference> for String {
    fn from(reference: Reference) -> Self {
        reference.to_string()
    }
}

/// Validates a bare digest: `sha256:` and 64 lowercase hex characters, or
/// `sha512:` and 128. Other well-formed algorithms are refused as unsupported.
pub fn validate_digest(digest: &str) -> Result<(), ReferenceError> {
    digest_problem(digest).map_or(Ok(()), |problem| Err(ReferenceError::InvalidDigest(problem)))
}

/// Splits a name (no tag, no digest) into registry and normalised repository path.
fn split_registry(name: &str) -> Result<(&str, String), ReferenceError> {
    if name.is_empty() {
        return Err(ReferenceError::InvalidRepository(
            "no repository name before the tag or digest".to_owned(),
        ));
    }
    let (registry, path) = match name.split_once('/') {
        None => (DOCKER_HUB, name),
        Some((first, rest)) if first == DOCKER_HUB || first == DOCKER_HUB_LEGACY => (DOCKER_HUB, rest),
        Some((first, rest)) if first == LOCALHOST || first.contains(['.', ':']) => {
            if let Some(problem) = registry_problem(first) {
                return Err(ReferenceError::InvalidRegistry(problem));
            }
            (first, rest)
        }
        Some(_) => (DOCKER_HUB, name),
    };
    if path.is_empty() {
        return Err(ReferenceError::InvalidRepository(format!(
            "no repository path after the registry {}",
            quote(registry)
        )));
    }
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("{OFFICIAL_NAMESPACE}/{path}")
    } else {
        path.to_owned()
    };
    Ok((registry, repository))
}

fn repository_problem(repository: &str) -> Option<String> {
    if repository.len() > MAX_REPOSITORY_LENGTH {
        return Some(format!(
            "{} is {} characters; the limit is {MAX_REPOSITORY_LENGTH}",
            quote(repository),
            repository.len()
        ));
    }
    repository.split('/').find_map(|component| path_component_problem(component, repository))
}

/// Hand-written matcher for `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`.
fn path_component_problem(component: &str, repository: &str) -> Option<String> {
    if component.is_empty() {
        return Some(format!(
            "{} has an empty path component (a leading, trailing or doubled '/')",
            quote(repository)
        ));
    }
    if let Some(character) =
        component.chars().find(|&c| !(is_lower_alphanumeric(c) || matches!(c, '.' | '_' | '-')))
    {
        return Some(if character.is_ascii_uppercase() {
            format!("{} has uppercase letters; repository names must be lowercase", quote(component))
        } else {
            format!(
                "{} has {}; path components are lowercase letters, digits, '.', '_' and '-'",
                quote(component),
                describe(character)
            )
        });
    }
    let starts_well = component.starts_with(is_lower_alphanumeric);
    let ends_well = component.ends_with(is_lower_alphanumeric);
    if !starts_well || !ends_well {
        return Some(format!(
            "{} {} with a separator; path components start and end with a letter or digit",
            quote(component),
            if starts_well { "ends" } else { "starts" }
        ));
    }
    // Past the checks above, every separator run sits between two alphanumerics.
    component
        .split(is_lower_alphanumeric)
        .filter(|run| !run.is_empty())
        .find(|run| !(matches!(*run, "." | "_" | "__") || run.bytes().all(|byte| byte == b'-')))
        .map(|run| {
            format!(
                "{} joins parts with {}; only '.', '_', '__' or a run of '-' may",
                quote(component),
                quote(run)
            )
        })
}

fn is_lower_alphanumeric(character: char) -> bool {
    character.is_ascii_lowercase() || character.is_ascii_digit()
}

fn registry_problem(registry: &str) -> Option<String> {
    let (host_problem, port) = match registry.strip_prefix('[') {
        Some(bracketed) => {
            let Some((inside, after)) = bracketed.split_once(']') else {
                return Some(format!("{} opens '[' without a closing ']'", quote(registry)));
            };
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port),
                None if after.is_empty() => None,
                None => {
                    return Some(format!("{} has {} after the closing ']'", quote(registry), quote(after)))
                }
            };
            let is_plain_ipv6 = inside.bytes().all(|byte| byte.is_ascii_hexdigit() || byte == b':')
                && inside.parse::<Ipv6Addr>().is_ok();
            let problem = (!is_plain_ipv6).then(|| {
                format!(
                    "{} is not an IPv6 address in hex and ':' (zone ids and embedded IPv4 are refused)",
                    quote(inside)
                )
            });
            (problem, port)
        }
        None => {
            let (host, port) = match registry.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (registry, None),
            };
            (domain_name_problem(host, registry), port)
        }
    };
    if host_problem.is_some() {
        return host_problem;
    }
    match port {
        Some(port) if port.is_empty() || !port.bytes().all(|byte| byte.is_ascii_digit()) => {
            Some(format!("{} has port {}; a port is decimal digits", quote(registry), quote(port)))
        }
        Some(port) if port.parse::<u16>().is_err() => {
            Some(format!("{} has port {port}, above 65535", quote(registry)))
        }
        _ => None,
    }
}

/// Labels of `[a-zA-Z0-9]` with inner `-`, joined by single dots.
fn domain_name_problem(host: &str, registry: &str) -> Option<String> {
    // Inputs like "../x" or "my_host.io/x" are registries only by this rule, so the message says it.
    const WHY_A_REGISTRY: &str = "(a first path component holding '.' or ':' names a registry)";
    if host.len() > MAX_HOST_LENGTH {
        return Some(format!(
            "{} has a host name of {} characters; the limit is {MAX_HOST_LENGTH}",
            quote(registry),
            host.len()
        ));
    }
    if let Some(character) = host.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))) {
        return Some(format!(
            "{} has {}; host names are letters, digits, '.' and '-' {WHY_A_REGISTRY}",
            quote(registry),
            describe(character)
        ));
    }
    let label_problem = host.split('.').find_map(|label| {
        if label.is_empty() {
            Some("an empty label, from a leading, trailing or doubled '.'".to_owned())
        } else if label.starts_with('-') || label.ends_with('-') {
            Some(format!("the label {} starting or ending with '-'", quote(label)))
        } else {
            None
        }
    });
    label_problem.map(|problem| format!("{} has {problem} {WHY_A_REGISTRY}", quote(registry)))
}

/// Tag grammar `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn tag_problem(tag: &str) -> Option<String> {
    let is_word = |character: char| character.is_ascii_alphanumeric() || character == '_';
    if tag.is_empty() {
        return Some("empty tag after ':'".to_owned());
    }
    if let Some(character) = tag.chars().find(|&c| !(is_word(c) || matches!(c, '.' | '-'))) {
        return Some(format!(
            "{} has {}; tags are letters, digits, '_', '.' and '-'",
            quote(tag),
            describe(character)
        ));
    }
    if !tag.starts_with(is_word) {
        return Some(format!(
            "{} starts with a separator; tags start with a letter, digit or '_'",
            quote(tag)
        ));
    }
    if tag.len() > MAX_TAG_LENGTH {
        return Some(format!("{} is {} characters; the limit is {MAX_TAG_LENGTH}", quote(tag), tag.len()));
    }
    None
}

fn digest_problem(digest: &str) -> Option<String> {
    if digest.is_empty() {
        return Some("empty digest after '@'".to_owned());
    }
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Some(format!("{} has no ':' between algorithm and hex, as in sha256:<hex>", quote(digest)));
    };
    // OCI image-spec algorithm grammar: [a-z0-9]+([+._-][a-z0-9]+)*
    let algorithm_is_well_formed = algorithm
        .split(['+', '.', '_', '-'])
        .all(|part| !part.is_empty() && part.chars().all(is_lower_alphanumeric));
    if !algorithm_is_well_formed {
        return Some(format!("{} has a malformed algorithm {}", quote(digest), quote(algorithm)));
    }
    let expected_length = match algorithm {
        "sha256" => 64,
        "sha512" => 128,
        _ => {
            return Some(format!(
                "{} uses the unsupported algorithm {}; use sha256 or sha512",
                quote(digest),
                quote(algorithm)
            ))
        }
    };
    if let Some(character) = hex.chars().find(|&c| !matches!(c, '0'..='9' | 'a'..='f')) {
        return Some(if character.is_ascii_hexdigit() {
            format!("{} has uppercase hex; digests are lowercase", quote(digest))
        } else {
            format!("{} has {}, which is not a hex digit", quote(digest), describe(character))
        });
    }
    if hex.len() != expected_length {
        return Some(format!(
            "{} has {} hex characters; {algorithm} needs {expected_length}",
            quote(digest),
            hex.len()
        ));
    }
    None
}

/// Quotes offending text for an error message, escaped so it stays on one
/// line and cut after [`QUOTE_LIMIT`] characters.
fn quote(text: &str) -> String {
    match text.char_indices().nth(QUOTE_LIMIT) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
    }
}

fn describe(character: char) -> String {
    if character == ' ' {
        "a space".to_owned()
    } else if character.is_whitespace() || character.is_control() {
        format!("the whitespace or control character '{}'", character.escape_debug())
    } else {
        format!("'{}'", character.escape_debug())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    macro_rules! hex64 {
        () => {
            "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
        };
    }
    macro_rules! sha256 {
        () => {
            concat!("sha256:", hex64!())
        };
    }
    macro_rules! sha512 {
        () => {
            concat!("sha512:", hex64!(), hex64!())
        };
    }

    struct Good {
        input: &'static str,
        display: &'static str,
        registry: &'static str,
        repository: &'static str,
        tag: Option<&'static str>,
        digest: Option<&'static str>,
    }

    const fn good(
        input: &'static str,
        display: &'static str,
        registry: &'static str,
        repository: &'static str,
        tag: Option<&'static str>,
        digest: Option<&'static str>,
    ) -> Good {
        Good { input, display, registry, repository, tag, digest }
    }

    const TAG_128: &str = "t123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\
                           0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn good_cases() -> Vec<Good> {
        let latest = Some("latest");
        vec![
            // Docker Hub, short and long forms.
            good("alpine", "docker.io/library/alpine:latest", "docker.io", "library/alpine", latest, None),
            good(
                "alpine:3.20",
                "docker.io/library/alpine:3.20",
                "docker.io",
                "library/alpine",
                Some("3.20"),
                None,
            ),
            good(
                "library/alpine",
                "docker.io/library/alpine:latest",
                "docker.io",
                "library/alpine",
                latest,
                None,
            ),
            good(
                "docker.io/alpine",
                "docker.io/library/alpine:latest",
                "docker.io",
                "library/alpine",
                latest,
                None,
            ),
            good(
                "docker.io/library/alpine:3.20",
                "docker.io/library/alpine:3.20",
                "docker.io",
                "library/alpine",
                Some("3.20"),
                None,
            ),
            good(
                "index.docker.io/alpine",
                "docker.io/library/alpine:latest",
                "docker.io",
                "library/alpine",
                latest,
                None,
            ),
            good(
                "index.docker.io/user/img:v1",
                "docker.io/user/img:v1",
                "docker.io",
                "user/img",
                Some("v1"),
                None,
            ),
            good("user/img", "docker.io/user/img:latest", "docker.io", "user/img", latest, None),
            good("test_com/foo", "docker.io/test_com/foo:latest", "docker.io", "test_com/foo", latest, None),
            // Nested repositories keep their path, also under library/.
            good(
                "library/foo/bar",
                "docker.io/library/foo/bar:latest",
                "docker.io",
                "library/foo/bar",
                latest,
                None,
            ),
            good(
                "store/foo/bar:1",
                "docker.io/store/foo/bar:1",
                "docker.io",
                "store/foo/bar",
                Some("1"),
                None,
            ),
            good(
                "registry.example.com/a/b/c/d/e:1",
                "registry.example.com/a/b/c/d/e:1",
                "registry.example.com",
                "a/b/c/d/e",
                Some("1"),
                None,
            ),
            // Other registries keep single-component paths as written.
            good(
                "example.com/privatebase",
                "example.com/privatebase:latest",
                "example.com",
                "privatebase",
                latest,
                None,
            ),
            good(
                "example.com:8000/private/moonbase:v2",
                "example.com:8000/private/moonbase:v2",
                "example.com:8000",
                "private/moonbase",
                Some("v2"),
                None,
            ),
            good(
                "Registry.Example.COM/x",
                "Registry.Example.COM/x:latest",
                "Registry.Example.COM",
                "x",
                latest,
                None,
            ),
            good(
                "xn--n3h.com:18080/foo",
                "xn--n3h.com:18080/foo:latest",
                "xn--n3h.com:18080",
                "foo",
                latest,
                None,
            ),
            good("test-com:8080/foo", "test-com:8080/foo:latest", "test-com:8080", "foo", latest, None),
            // Digests, with and without tags.
            good(
                concat!("ghcr.io/org/tool@", sha256!()),
                concat!("ghcr.io/org/tool@", sha256!()),
                "ghcr.io",
                "org/tool",
                None,
                Some(sha256!()),
            ),
            good(
                concat!("ghcr.io/org/tool:v1@", sha256!()),
                concat!("ghcr.io/org/tool:v1@", sha256!()),
                "ghcr.io",
                "org/tool",
                Some("v1"),
                Some(sha256!()),
            ),
            good(
                concat!("alpine@", sha256!()),
                concat!("docker.io/library/alpine@", sha256!()),
                "docker.io",
                "library/alpine",
                None,
                Some(sha256!()),
            ),
            good(
                concat!("busybox:latest@", sha256!()),
                concat!("docker.io/library/busybox:latest@", sha256!()),
                "docker.io",
                "library/busybox",
                latest,
                Some(sha256!()),
            ),
            good(
                concat!("ghcr.io/o/t@", sha512!()),
                concat!("ghcr.io/o/t@", sha512!()),
                "ghcr.io",
                "o/t",
                None,
                Some(sha512!()),
            ),
            // localhost, ports, IPv4 and IPv6 hosts.
            good("localhost:5000/x:1", "localhost:5000/x:1", "localhost:5000", "x", Some("1"), None),
            good("localhost/x", "localhost/x:latest", "localhost", "x", latest, None),
            good(
                "localhost",
                "docker.io/library/localhost:latest",
                "docker.io",
                "library/localhost",
                latest,
                None,
            ),
            good(
                "localhost:5000",
                "docker.io/library/localhost:5000",
                "docker.io",
                "library/localhost",
                Some("5000"),
                None,
            ),
            good(
                "example.com",
                "docker.io/library/example.com:latest",
                "docker.io",
                "library/example.com",
                latest,
                None,
            ),
            good(
                "192.168.0.1:80",
                "docker.io/library/192.168.0.1:80",
                "docker.io",
                "library/192.168.0.1",
                Some("80"),
                None,
            ),
            good("127.0.0.1:5000/a/b:t", "127.0.0.1:5000/a/b:t", "127.0.0.1:5000", "a/b", Some("t"), None),
            good("[::1]:5000/x", "[::1]:5000/x:latest", "[::1]:5000", "x", latest, None),
            good("[::1]/x", "[::1]/x:latest", "[::1]", "x", latest, None),
            good(
                "[fc00:1:2:3:4:5:6:7]:5000/library/debian",
                "[fc00:1:2:3:4:5:6:7]:5000/library/debian:latest",
                "[fc00:1:2:3:4:5:6:7]:5000",
                "library/debian",
                latest,
                None,
            ),
            // Tags with dots, dashes, underscores and capitals; separators in paths.
            good(
                "img:v1.2.3-rc_1",
                "docker.io/library/img:v1.2.3-rc_1",
                "docker.io",
                "library/img",
                Some("v1.2.3-rc_1"),
                None,
            ),
            good(
                "img:_private",
                "docker.io/library/img:_private",
                "docker.io",
                "library/img",
                Some("_private"),
                None,
            ),
            good("img:UPPER", "docker.io/library/img:UPPER", "docker.io", "library/img", Some("UPPER"), None),
            good(
                "a-b---c__d/e.f_g:t",
                "docker.io/a-b---c__d/e.f_g:t",
                "docker.io",
                "a-b---c__d/e.f_g",
                Some("t"),
                None,
            ),
            good(
                concat!("docker.io/", hex64!()),
                concat!("docker.io/library/", hex64!(), ":latest"),
                "docker.io",
                concat!("library/", hex64!()),
                latest,
                None,
            ),
        ]
    }

    #[test]
    fn good_references_parse_to_their_parts_and_canonical_form() {
        let cases = good_cases();
        assert!(cases.len() >= 25);
        for case in &cases {
            let parsed = Reference::parse(case.input)
                .unwrap_or_else(|error| panic!("{:?} should parse: {error}", case.input));
            assert_eq!(parsed.to_string(), case.display, "display of {:?}", case.input);
            assert_eq!(parsed.registry(), case.registry, "registry of {:?}", case.input);
            assert_eq!(parsed.repository(), case.repository, "repository of {:?}", case.input);
            assert_eq!(parsed.tag(), case.tag, "tag of {:?}", case.input);
            assert_eq!(parsed.digest(), case.digest, "digest of {:?}", case.input);
        }
    }

    #[test]
    fn canonical_form_round_trips() {
        for case in good_cases() {
            let parsed = Reference::parse(case.input).unwrap();
            let reparsed = Reference::parse(&parsed.to_string()).unwrap();
            assert_eq!(reparsed, parsed, "round trip of {:?}", case.input);
            assert_eq!(case.input.parse::<Reference>().unwrap(), parsed);
        }
    }

    #[test]
    fn longest_tag_is_accepted() {
        assert_eq!(TAG_128.len(), MAX_TAG_LENGTH);
        let parsed = Reference::parse(&format!("img:{TAG_128}")).unwrap();
        assert_eq!(parsed.tag(), Some(TAG_128));
    }

    /// Found by the `image_reference` fuzz target: a 4089-character host
    /// name with a one-letter path parsed, and its canonical form, 4098
    /// bytes with `:latest`, was refused as too long.
    #[test]
    fn every_accepted_reference_has_a_canonical_form_that_parses() {
        let huge_host = ["a"; 2045].join(".");
        let error = Reference::parse(&format!("{huge_host}/x")).unwrap_err();
        assert!(registry(&error), "{error:?}");
        assert!(error.to_string().contains("host name of 4089 characters; the limit is 253"), "{error}");

        // The longest reference of each part still round-trips.
        let host = format!("{}.{}", "h".repeat(63), ["a"; 95].join("."));
        assert_eq!(host.len(), MAX_HOST_LENGTH);
        let path = format!("{}/{}", "p".repeat(127), "q".repeat(127));
        let longest = format!("{host}:65535/{path}:{TAG_128}@{}", sha512!());
        let parsed = Reference::parse(&longest).unwrap();
        assert_eq!(parsed.to_string(), longest);
        assert_eq!(Reference::parse(&parsed.to_string()), Ok(parsed));
        let error = Reference::parse(&format!("a{host}/x")).unwrap_err();
        assert!(registry(&error), "{error:?}");
    }

    #[test]
    fn longest_repository_is_accepted() {
        let name = "a".repeat(MAX_REPOSITORY_LENGTH - "library/".len());
        assert_eq!(Reference::parse(&name).unwrap().repository().len(), MAX_REPOSITORY_LENGTH);
    }

    type Variant = fn(&ReferenceError) -> bool;

    fn repository(error: &ReferenceError) -> bool {
        matches!(error, ReferenceError::InvalidRepository(_))
    }
    fn tag(error: &ReferenceError) -> bool {
        matches!(error, ReferenceError::InvalidTag(_))
    }
    fn digest(error: &ReferenceError) -> bool {
        matches!(error, ReferenceError::InvalidDigest(_))
    }
    fn registry(error: &ReferenceError) -> bool {
        matches!(error, ReferenceError::InvalidRegistry(_))
    }
    fn empty(error: &ReferenceError) -> bool {
        matches!(error, ReferenceError::Empty)
    }
    fn too_long(error: &ReferenceError) -> bool {
        matches!(error, ReferenceError::TooLong { .. })
    }

    fn bad_cases() -> Vec<(String, Variant)> {
        let cases: Vec<(&str, Variant)> = vec![
            ("", empty),
            // Repository paths.
            ("a/../b", repository),
            ("x/..", repository),
            ("Alpine", repository),
            // Current Docker reads "A" as a registry host; see the module doc.
            ("A/b", repository),
            ("docker/Docker", repository),
            ("docker.io/docker/Docker", repository),
            ("a//b", repository),
            ("docker///docker", repository),
            ("-a", repository),
            ("a-", repository),
            ("_docker/_docker", repository),
            ("a/", repository),
            ("docker.io/", repository),
            ("example.com/", repository),
            ("a..b", repository),
            ("a._b", repository),
            ("a___b", repository),
            ("ålpine", repository),
            ("a:b:c", repository),
            ("[::1]:5000", repository),
            (concat!("@", sha256!()), repository),
            (":tag", repository),
            (hex64!(), repository),
            // Whitespace and control characters.
            ("alpine latest", repository),
            (" alpine", repository),
            ("alpine\n", repository),
            ("alpine\0", repository),
            ("alp\tine:1", repository),
            ("alpine:3.20 ", tag),
            // Registries.
            ("../x", registry),
            ("https://github.com/docker/docker", registry),
            ("[fe80::1%eth0]:5000/debian", registry),
            ("[2001:db8:3:4::192.0.2.33]:5000/debian", registry),
            ("[:::]/x", registry),
            ("[::1/x", registry),
            ("[::1]x/y", registry),
            ("fc00::1:5000/debian", registry),
            ("localhost:/x", registry),
            ("localhost:99999/x", registry),
            ("host:abc/x", registry),
            ("-host.com/x", registry),
            ("host-.com/x", registry),
            ("my_host.com/x", registry),
            ("a..com/x", registry),
            ("img:bad/tag", registry),
            // Tags.
            ("a:", tag),
            ("img:bad!tag", tag),
            ("img:-x", tag),
            ("img:.x", tag),
            ("alpine:lätest", tag),
            (concat!("a:@", sha256!()), tag),
            // Digests.
            ("a@", digest),
            ("a/b:t@", digest),
            ("img@sha256:abc", digest),
            ("img@sha256", digest),
            (concat!("img@", "sha256:", hex64!(), hex64!()), digest),
            (concat!("img@", "sha256:", hex64!(), "@x"), digest),
            ("img@sha256:DBCC1C35AC38DF41FD2F5E4130B32FFDB93EBAE8B3DBE638C23575912276FC9C", digest),
            ("img@sha256:gbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c", digest),
            (concat!("img@md5:", hex64!()), digest),
            (concat!("img@sha384:", hex64!(), "dbcc1c35ac38df41fd2f5e4130b32ffd"), digest),
            (concat!("img@SHA256:", hex64!()), digest),
            (concat!("img@sha256+:", hex64!()), digest),
        ];
        let mut cases: Vec<(String, Variant)> =
            cases.into_iter().map(|(input, variant)| (input.to_owned(), variant)).collect();
        cases.push(("a".repeat(10 * 1024), too_long));
        cases.push(("a".repeat(MAX_INPUT_BYTES + 1), too_long));
        cases.push(("a".repeat(MAX_INPUT_BYTES), repository));
        cases.push(("a".repeat(MAX_REPOSITORY_LENGTH - "library/".len() + 1), repository));
        cases.push((format!("img:{TAG_128}x"), tag));
        cases
    }

    #[test]
    fn bad_references_fail_with_the_expected_variant() {
        let cases = bad_cases();
        assert!(cases.len() >= 20);
        for (input, is_expected) in &cases {
            match Reference::parse(input) {
                Ok(parsed) => panic!("{input:?} should not parse, got {parsed}"),
                Err(error) => assert!(is_expected(&error), "{input:?} gave the wrong variant: {error:?}"),
            }
        }
    }

    #[test]
    fn error_messages_are_one_short_line_quoting_the_input() {
        for (input, _) in bad_cases() {
            let message = Reference::parse(&input).unwrap_err().to_string();
            assert!(!message.contains('\n'), "{message}");
            assert!(message.len() < 400, "{} bytes: {message}", message.len());
        }
        let message = Reference::parse("docker/Docker").unwrap_err().to_string();
        assert_eq!(
            message,
            "invalid repository name: \"Docker\" has uppercase letters; repository names must be lowercase"
        );
        let message = Reference::parse("alpine\n").unwrap_err().to_string();
        assert!(message.contains("\"alpine\\n\""), "{message}");
        let message = Reference::parse(&"b".repeat(300)).unwrap_err().to_string();
        assert!(message.contains(&format!("\"library/{}\"… is 308 characters", "b".repeat(72))), "{message}");
        let message = Reference::parse(&"a".repeat(10 * 1024)).unwrap_err().to_string();
        assert_eq!(message, "image reference is 10240 bytes long; the limit is 4096");
    }

    #[test]
    fn digest_validation() {
        assert_eq!(validate_digest(sha256!()), Ok(()));
        assert_eq!(validate_digest(sha512!()), Ok(()));
        for bad in ["", "sha256", "sha256:", concat!("sha256:", hex64!(), "0"), concat!("sha512:", hex64!())]
        {
            assert!(matches!(validate_digest(bad), Err(ReferenceError::InvalidDigest(_))), "{bad:?}");
        }
        assert_eq!(
            validate_digest("sha256:abc").unwrap_err().to_string(),
            "invalid digest: \"sha256:abc\" has 3 hex characters; sha256 needs 64"
        );
    }

    #[test]
    fn pull_reference_prefers_digest_then_tag_then_latest() {
        assert_eq!(Reference::parse("alpine").unwrap().reference_for_pull(), "latest");
        assert_eq!(Reference::parse("alpine:3.20").unwrap().reference_for_pull(), "3.20");
        assert_eq!(Reference::parse(concat!("alpine@", sha256!())).unwrap().reference_for_pull(), sha256!());
        assert_eq!(
            Reference::parse(concat!("alpine:3.20@", sha256!())).unwrap().reference_for_pull(),
            sha256!()
        );
    }

    #[test]
    fn docker_hub_is_contacted_at_its_registry_host() {
        let endpoint = |text: &str| Reference::parse(text).unwrap().registry_endpoint().to_owned();
        assert_eq!(endpoint("alpine"), "registry-1.docker.io");
        assert_eq!(endpoint("index.docker.io/user/img"), "registry-1.docker.io");
        assert_eq!(endpoint("ghcr.io/org/tool"), "ghcr.io");
        assert_eq!(endpoint("localhost:5000/x"), "localhost:5000");
        assert_eq!(endpoint("[::1]:5000/x"), "[::1]:5000");
    }

    #[test]
    fn loopback_registries() {
        let loopback = |text: &str| Reference::parse(text).unwrap().is_loopback_registry();
        for text in [
            "localhost/x",
            "localhost:5000/x",
            "LOCALHOST:5000/x",
            "127.0.0.1/x",
            "127.0.0.1:5000/x",
            "127.1.2.3:80/x",
            "[::1]/x",
            "[::1]:5000/x",
            "[0:0:0:0:0:0:0:1]:5000/x",
            "[::ffff:7f00:1]:5000/x",
        ] {
            assert!(loopback(text), "{text} is loopback");
        }
        for text in [
            "alpine",
            "localhost",
            "localhost:5000",
            "ghcr.io/x",
            "localhost.example.com/x",
            "128.0.0.1:5000/x",
            "10.0.0.1:5000/x",
            "[::2]:5000/x",
            "[fc00::1]/x",
            "127.0.0.1.example.com/x",
        ] {
            assert!(!loopback(text), "{text} is not loopback");
        }
    }

    #[test]
    fn serde_uses_the_canonical_string_and_validates() {
        let reference = Reference::parse("alpine:3.20").unwrap();
        let json = serde_json::to_string(&reference).unwrap();
        assert_eq!(json, "\"docker.io/library/alpine:3.20\"");
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), reference);
        assert_eq!(
            serde_json::from_str::<Reference>("\"alpine\"").unwrap().to_string(),
            "docker.io/library/alpine:latest"
        );
        assert!(serde_json::from_str::<Reference>("\"Alpine\"").is_err());
        assert!(serde_json::from_str::<Reference>(r#"{"registry":"x","repository":"Y"}"#).is_err());
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }
    }

    #[test]
    fn random_inputs_never_panic_and_accepted_ones_round_trip() {
        const PIECES: &[&str] = &[
            "a",
            "b",
            "z",
            "0",
            "9",
            "x1",
            "A",
            "Q",
            ".",
            "..",
            "_",
            "__",
            "-",
            "--",
            "/",
            "/",
            "/",
            ":",
            ":",
            "@",
            "[",
            "]",
            "::1",
            "localhost",
            "docker.io",
            "index.docker.io",
            "example.com",
            "5000",
            "99999",
            "library",
            sha256!(),
            sha512!(),
            "sha256:",
            hex64!(),
            "sha384",
            " ",
            "\n",
            "\0",
            "é",
            "\u{feff}",
        ];
        let mut random = Random(0x9E37_79B9_7F4A_7C15);
        let mut accepted = 0;
        for _ in 0..10_000 {
            let pieces = random.below(10);
            let input: String = (0..pieces).map(|_| PIECES[random.below(PIECES.len())]).collect();
            match Reference::parse(&input) {
                Ok(parsed) => {
                    accepted += 1;
                    let canonical = parsed.to_string();
                    assert_eq!(Reference::parse(&canonical).as_ref(), Ok(&parsed), "round trip of {input:?}");
                    assert!(!canonical.contains(char::is_whitespace), "{input:?} gave {canonical:?}");
                    assert!(parsed.tag().is_some() || parsed.digest().is_some(), "{input:?}");
                }
                Err(error) => {
                    let message = error.to_string();
                    assert!(!message.contains('\n') && message.len() < 600, "{input:?}: {message}");
                }
            }
        }
        // The generator must reach the accepting paths too, or the round trip is untested.
        println!("{accepted} of 10000 random inputs parsed");
        assert!(accepted > 500, "only {accepted} of 10000 inputs parsed");
    }
}
