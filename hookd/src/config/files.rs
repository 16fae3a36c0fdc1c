//! Where a configuration comes from: hookd.toml and the run-time
//! networks' files next to it ([`ConfigFiles`]), parsed and validated
//! together, with where each network was written ([`Origin`]).

use super::*;

/// The files a configuration is read from: hookd.toml (missing: `None`)
/// and the run-time networks' files next to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigFiles {
    pub main: PathBuf,
    pub main_text: Option<String>,
    pub runtime: Vec<RuntimeFile>,
}

/// Where a network was configured, for `qnetctl network show` and for
/// telling which networks `network edit` and `delete` may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    /// A run-time network (a file of `networks.d`), not one of hookd.toml.
    pub runtime: bool,
    /// The keys the file sets; every other key has its default.
    pub keys: BTreeSet<&'static str>,
}

impl ConfigFiles {
    /// Reads hookd.toml at `main` and the run-time networks next to it.
    pub fn read(main: &Path) -> Result<ConfigFiles, ConfigError> {
        let main_text = match std::fs::read_to_string(main) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(ConfigError::Read {
                    path: main.to_path_buf(),
                    source,
                })
            }
        };
        Ok(ConfigFiles {
            main: main.to_path_buf(),
            main_text,
            runtime: runtime::read_dir(&runtime::dir_for(main))?,
        })
    }

    /// The directory of the run-time networks' files.
    pub fn runtime_dir(&self) -> PathBuf {
        runtime::dir_for(&self.main)
    }

    /// These files with the run-time file at `path` replaced by `text`
    /// (added if new; removed with `None`).
    pub fn with_runtime(&self, path: &Path, text: Option<String>) -> ConfigFiles {
        let mut files = self.clone();
        files.runtime.retain(|f| f.path != path);
        if let Some(text) = text {
            files.runtime.push(RuntimeFile {
                path: path.to_path_buf(),
                text,
            });
            files.runtime.sort_by(|a, b| a.path.cmp(&b.path));
        }
        files
    }

    /// Parses and validates every file, then the networks against each
    /// other. The error is one line: what it quotes from a file is
    /// escaped and bounded.
    pub fn parse(&self) -> Result<Config, ConfigError> {
        self.parse_all().map_err(ConfigError::one_line)
    }

    fn parse_all(&self) -> Result<Config, ConfigError> {
        let raw: RawConfig = match &self.main_text {
            Some(text) => toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: self.main.clone(),
                message: toml_message(&e),
            })?,
            None => RawConfig::default(),
        };
        let main_text = self.main_text.as_deref().unwrap_or("");
        let mut tables: Vec<Table> = raw
            .network
            .into_iter()
            .map(|spanned| Table {
                file: self.main.clone(),
                line: line_of(main_text, spanned.span().start),
                runtime: false,
                raw: spanned.into_inner(),
            })
            .collect();
        let use_default_network = tables.is_empty() && raw.default_network.unwrap_or(true);
        for file in &self.runtime {
            tables.push(runtime_table(file)?);
        }
        let mut integration = Integration {
            global: raw.firewall_integration.unwrap_or(true),
            per_network: BTreeMap::new(),
        };
        let (networks, origins) = parse_networks(tables, &mut integration)?;
        if use_default_network {
            if let Some(origin) = origins.get(DEFAULT_NETWORK) {
                return Err(invalid_at(
                    origin,
                    DEFAULT_NETWORK,
                    "name",
                    "the default network has this name (hookd.toml configures no network)".into(),
                ));
            }
        }
        let forwards = parse_forwards(&self.main, main_text, raw.forward, &networks)?;
        let limits = raw
            .limits
            .unwrap_or_default()
            .validate()
            .map_err(|(key, problem)| ConfigError::InvalidLimits {
                path: self.main.clone(),
                key,
                problem,
            })?;
        let user_networks =
            raw.user_networks
                .unwrap_or_default()
                .validate()
                .map_err(|(key, problem)| ConfigError::InvalidPolicy {
                    path: self.main.clone(),
                    key,
                    problem,
                })?;
        Ok(Config {
            user_networks,
            networks,
            origins,
            forwards,
            use_default_network,
            default_network_explicit: raw.default_network.is_some(),
            limits,
            integration,
        })
    }
}

/// One network table and where it was written.
pub(super) struct Table {
    pub(super) file: PathBuf,
    pub(super) line: usize,
    pub(super) runtime: bool,
    pub(super) raw: RawNetwork,
}

/// A run-time network file: its keys at the top level, and named after
/// its network (so the daemon finds the file of a network by its name).
fn runtime_table(file: &RuntimeFile) -> Result<Table, ConfigError> {
    let raw: RawNetwork = toml::from_str(&file.text).map_err(|e| ConfigError::Parse {
        path: file.path.clone(),
        message: toml_message(&e),
    })?;
    let table = Table {
        file: file.path.clone(),
        line: 1,
        runtime: true,
        raw,
    };
    let stem = file.path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if stem != table.raw.name {
        let origin = table.origin();
        return Err(invalid_at(
            &origin,
            &table.raw.name,
            "name",
            format!(
                "the file of network `{}` must be named {}.toml",
                table.raw.name, table.raw.name
            ),
        ));
    }
    Ok(table)
}

impl Table {
    pub(super) fn origin(&self) -> Origin {
        Origin {
            file: self.file.clone(),
            line: self.line,
            runtime: self.runtime,
            keys: self.raw.keys(),
        }
    }
}

pub(super) fn invalid_at(
    origin: &Origin,
    network: &str,
    key: &'static str,
    problem: String,
) -> ConfigError {
    ConfigError::Invalid {
        path: origin.file.clone(),
        line: origin.line,
        network: network.to_owned(),
        key,
        problem,
    }
}
/// `FILE:LINE` of an origin, for messages.
pub struct Place<'a>(pub &'a Origin);

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0.file.display(), self.0.line)
    }
}
