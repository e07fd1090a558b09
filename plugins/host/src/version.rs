//! Which plugin interface a component was built for, read from the names of
//! what it exports and imports, before anything of it runs.

use std::fmt;
use wasmtime::component::Component;
use wasmtime::Engine;

/// The interface versions this host has bindings for (newest last).
pub const SUPPORTED: &[Version] = &[Version {
    major: 0,
    minor: 1,
    patch: 0,
}];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    fn parse(s: &str) -> Option<Version> {
        let core = s.split(['-', '+']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next()??,
        };
        parts.next().is_none().then_some(v)
    }

    /// Semver compatibility: same major, and for 0.x the same minor.
    fn compatible(&self, with: &Version) -> bool {
        self.major == with.major && (self.major > 0 || self.minor == with.minor)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

const PACKAGE: &str = "pixart:plugin";
const EXPORT: &str = "pixart:plugin/plugin@";
/// Interfaces a plugin may import, by name without the version.
const PROVIDED: &[&str] = &[
    "pixart:plugin/types",
    "pixart:plugin/host",
    "pixart:plugin/files",
];

/// The supported version a component was built for, or why it cannot load.
pub(crate) fn detect(engine: &Engine, component: &Component) -> Result<Version, String> {
    let ty = component.component_type();
    let exports: Vec<&str> = ty.exports(engine).map(|(name, _)| name).collect();
    let Some(found) = exports.iter().find_map(|name| name.strip_prefix(EXPORT)) else {
        return Err(format!(
            "not a pixart-flow plugin: it exports no `{PACKAGE}/plugin` interface (it exports: {})",
            list(&exports)
        ));
    };
    let Some(version) = Version::parse(found) else {
        return Err(format!("unreadable interface version `{found}`"));
    };
    let Some(supported) = SUPPORTED.iter().find(|s| s.compatible(&version)) else {
        return Err(format!(
            "built for interface {PACKAGE}@{version}; this host supports {}",
            SUPPORTED
                .iter()
                .map(|s| format!("{PACKAGE}@{}.{}.x", s.major, s.minor))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    for (name, _) in ty.imports(engine) {
        let (interface, v) = name.split_once('@').unwrap_or((name, ""));
        let same_version = Version::parse(v).is_some_and(|v| v.compatible(supported));
        if PROVIDED.contains(&interface) && same_version {
            continue;
        }
        return Err(if name.starts_with("wasi:") {
            format!(
                "imports `{name}`: plugins get no filesystem, network, clock or environment \
                 access (WASI); build it for wasm32-unknown-unknown, and ask for a read-only \
                 folder through `{PACKAGE}/files` instead"
            )
        } else {
            format!("imports `{name}`, which this host does not provide")
        });
    }
    Ok(*supported)
}

fn list(names: &[&str]) -> String {
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_match_like_semver() {
        let v010 = Version::parse("0.1.0").unwrap();
        assert!(Version::parse("0.1.3").unwrap().compatible(&v010));
        assert!(!Version::parse("0.2.0").unwrap().compatible(&v010));
        assert!(!Version::parse("1.1.0").unwrap().compatible(&v010));
        assert_eq!(Version::parse("0.1"), None);
        assert_eq!(Version::parse("0.1.0-rc1"), Some(v010));
    }
}
