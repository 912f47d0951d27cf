//! `image_reference`: `Reference::parse` on arbitrary text.
//!
//! References come from tasks and the command line. Every string must give
//! `Ok` or a `ReferenceError`, never a panic. For an accepted reference:
//!
//! - its canonical form (`Display`, also its serde form) parses back to the
//!   same reference and prints the same text (the module's documented
//!   promise; the registry client and the image store key on that text);
//! - each part obeys the grammar in the module doc, checked here by an
//!   independent matcher: the repository is 1 to 255 characters of
//!   lowercase path components, the tag matches the tag grammar, the digest
//!   passes `validate_digest`, the registry is a host name or bracketed IPv6
//!   address with an optional 16-bit port;
//! - Docker Hub names are normalised (`docker.io`, a `library/` namespace
//!   for one-component paths), and a reference without a digest has a tag.
#![no_main]

use std::net::Ipv6Addr;

use libfuzzer_sys::fuzz_target;
use quilt::image::reference::validate_digest;
use quilt::image::Reference;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = Reference::parse(text);
    assert_eq!(parsed, text.parse::<Reference>(), "FromStr disagrees with parse");
    let Ok(reference) = parsed else { return };

    let canonical = reference.to_string();
    let again = Reference::parse(&canonical)
        .unwrap_or_else(|error| panic!("canonical form {canonical:?} of {text:?} does not parse: {error}"));
    assert_eq!(again, reference, "canonical form {canonical:?} parses to another reference");
    assert_eq!(again.to_string(), canonical);
    let json = serde_json::to_string(&reference).expect("a reference serialises");
    assert_eq!(serde_json::from_str::<Reference>(&json).expect("its serde form parses"), reference);

    assert!(is_repository(reference.repository()), "bad repository in {canonical:?}");
    assert!(is_registry(reference.registry()), "bad registry in {canonical:?}");
    if let Some(tag) = reference.tag() {
        assert!(is_tag(tag), "bad tag in {canonical:?}");
    }
    if let Some(digest) = reference.digest() {
        validate_digest(digest).unwrap_or_else(|error| panic!("bad digest in {canonical:?}: {error}"));
    }
    assert!(reference.tag().is_some() || reference.digest().is_some(), "{canonical:?}: no tag or digest");
    assert_eq!(
        reference.reference_for_pull(),
        reference.digest().or(reference.tag()).unwrap(),
        "the pull reference is not the digest, else the tag"
    );
    assert_ne!(reference.registry(), "index.docker.io", "legacy Docker Hub name kept");
    if reference.registry() == "docker.io" {
        assert!(reference.repository().contains('/'), "{canonical:?}: Docker Hub path without namespace");
        assert_eq!(reference.registry_endpoint(), "registry-1.docker.io");
    } else {
        assert_eq!(reference.registry_endpoint(), reference.registry());
    }
    // Decided from the text alone; must not panic on any accepted registry.
    let _ = reference.is_loopback_registry();
});

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, components joined by `/`, 1 to 255 in all.
fn is_repository(repository: &str) -> bool {
    !repository.is_empty() && repository.len() <= 255 && repository.split('/').all(is_path_component)
}

fn is_path_component(component: &str) -> bool {
    let alphanumeric = |byte: u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
    let bytes = component.as_bytes();
    let mut index = 0;
    loop {
        // One run of alphanumerics...
        let start = index;
        while index < bytes.len() && alphanumeric(bytes[index]) {
            index += 1;
        }
        if index == start {
            return false;
        }
        if index == bytes.len() {
            return true;
        }
        // ...then one separator before the next run.
        let separator_start = index;
        while index < bytes.len() && !alphanumeric(bytes[index]) {
            index += 1;
        }
        let separator = &component[separator_start..index];
        if !matches!(separator, "." | "_" | "__") && !separator.bytes().all(|byte| byte == b'-') {
            return false;
        }
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn is_tag(tag: &str) -> bool {
    let word = |byte: u8| byte.is_ascii_alphanumeric() || byte == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&byte| word(byte) || byte == b'.' || byte == b'-')
}

/// `host[:port]` or `[ipv6][:port]`; host labels `[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?`.
fn is_registry(registry: &str) -> bool {
    let (host_ok, port) = match registry.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, after)) => {
                let port = match after.strip_prefix(':') {
                    Some(port) => Some(port),
                    None if after.is_empty() => None,
                    None => return false,
                };
                (inside.parse::<Ipv6Addr>().is_ok(), port)
            }
            None => return false,
        },
        None => {
            let (host, port) = match registry.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (registry, None),
            };
            let label = |label: &str| {
                let bytes = label.as_bytes();
                !bytes.is_empty()
                    && bytes[0].is_ascii_alphanumeric()
                    && bytes[bytes.len() - 1].is_ascii_alphanumeric()
                    && bytes.iter().all(|&byte| byte.is_ascii_alphanumeric() || byte == b'-')
            };
            (host.split('.').all(label), port)
        }
    };
    let port_ok =
        port.is_none_or(|port| port.bytes().all(|byte| byte.is_ascii_digit()) && port.parse::<u16>().is_ok());
    host_ok && port_ok
}
