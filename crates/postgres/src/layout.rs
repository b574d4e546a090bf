//! Where a PostgreSQL repository keeps things (the seed tool's layout, kept as is).
//!
//! Flat:    `<name>/manifest.json`, `<name>/base.tar.zst[.age]`, `<wal-prefix>/<segment>…`
//! Cluster: `<cluster>/backup/<name>/…`, `<cluster>/wal_archive/<segment>…`

/// Default WAL prefix of the flat layout.
pub const DEFAULT_WAL_PREFIX: &str = "wal_archive";
pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    cluster: Option<String>,
    wal_prefix: Option<String>,
}

impl Layout {
    pub fn new(cluster: Option<&str>, wal_prefix: Option<&str>) -> Result<Self, String> {
        let cluster = cluster.filter(|c| !c.is_empty()).map(str::to_owned);
        if let Some(c) = &cluster {
            validate_component("cluster name", c)?;
        }
        let wal_prefix = wal_prefix.map(|p| p.trim_matches('/').to_owned()).filter(|p| !p.is_empty());
        Ok(Layout { cluster, wal_prefix })
    }

    pub fn cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// The folder that holds every backup, with a trailing slash, or "" in the flat layout.
    pub fn backups_root(&self) -> String {
        match &self.cluster {
            Some(c) => format!("{c}/backup/"),
            None => String::new(),
        }
    }

    /// The folder of one backup, with a trailing slash.
    pub fn backup_dir(&self, name: &str) -> String {
        format!("{}{name}/", self.backups_root())
    }

    /// The WAL archive folder, with a trailing slash.
    pub fn wal_dir(&self) -> String {
        match (&self.cluster, &self.wal_prefix) {
            (Some(c), _) => format!("{c}/wal_archive/"),
            (None, Some(p)) => format!("{p}/"),
            (None, None) => format!("{DEFAULT_WAL_PREFIX}/"),
        }
    }
}

/// A backup or cluster name becomes one path component: keep it to characters every
/// object store and file system accepts unchanged.
pub fn validate_component(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > 200 {
        return Err(format!("{what} {name:?} is longer than 200 characters"));
    }
    if name == "." || name == ".." || name.starts_with('.') {
        return Err(format!("{what} {name:?} must not start with a dot"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '+'))) {
        return Err(format!("{what} {name:?} contains {c:?}; use letters, digits and - _ . : + only"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_and_cluster_paths() {
        let flat = Layout::new(None, None).unwrap();
        assert_eq!(flat.backup_dir("prod-1"), "prod-1/");
        assert_eq!(flat.wal_dir(), "wal_archive/");
        let custom = Layout::new(None, Some("/wal/x/")).unwrap();
        assert_eq!(custom.wal_dir(), "wal/x/");
        let c = Layout::new(Some("prod-pg17"), Some("ignored")).unwrap();
        assert_eq!(c.backup_dir("2026-03-22"), "prod-pg17/backup/2026-03-22/");
        assert_eq!(c.wal_dir(), "prod-pg17/wal_archive/");
    }

    #[test]
    fn names_are_single_safe_components() {
        assert!(validate_component("backup name", "prod-2026-03-22").is_ok());
        assert!(validate_component("backup name", "a/b").is_err());
        assert!(validate_component("backup name", "..").is_err());
        assert!(validate_component("backup name", "").is_err());
        assert!(validate_component("backup name", "x y").is_err());
        assert!(Layout::new(Some("a/b"), None).is_err());
    }
}
