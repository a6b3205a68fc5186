//! `RUN --mount=…` specifications.
//!
//! A mount is checked twice, as BuildKit does: its CSV shape and its `from`
//! when the Dockerfile is parsed, and everything else once its `$VAR`s can be
//! expanded ([`MountSpec::resolve`]).

/// The kind of a RUN mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountType {
    /// A read-only (by default) view of the context or another stage.
    Bind,
    /// A persistent cache directory, kept between builds by `id`.
    Cache,
    /// An empty in-memory filesystem.
    Tmpfs,
    /// A secret file (or environment variable) given to the build.
    Secret,
    /// An SSH agent socket.
    Ssh,
}

impl MountType {
    /// The name as written in a Dockerfile.
    pub fn as_str(self) -> &'static str {
        match self {
            MountType::Bind => "bind",
            MountType::Cache => "cache",
            MountType::Tmpfs => "tmpfs",
            MountType::Secret => "secret",
            MountType::Ssh => "ssh",
        }
    }
}

/// How concurrent builds share a cache mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// All writers share one directory.
    Shared,
    /// Each concurrent writer gets its own copy.
    Private,
    /// Writers take turns.
    Locked,
}

/// A fully resolved mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// What kind of mount.
    pub kind: MountType,
    /// `from=`: a stage name or index, or an image.
    pub from: Option<String>,
    /// `source=`: a path within `from` (or the context), or a secret's source.
    pub source: Option<String>,
    /// `target=`: where it appears in the container.
    pub target: Option<String>,
    /// Read-only; bind and secret mounts are unless `rw` is given.
    pub read_only: bool,
    /// `size=` of a tmpfs, in bytes.
    pub size_limit: Option<u64>,
    /// `id=` of a cache or secret.
    pub id: Option<String>,
    /// `sharing=` of a cache.
    pub sharing: Option<Sharing>,
    /// `required`: a missing secret fails the build.
    pub required: bool,
    /// `env=`: expose a secret as this environment variable.
    pub env: Option<String>,
    /// `mode=` (octal) of a cache, secret or ssh mount.
    pub mode: Option<u32>,
    /// `uid=` of a cache, secret or ssh mount.
    pub uid: Option<u32>,
    /// `gid=` of a cache, secret or ssh mount.
    pub gid: Option<u32>,
}

/// A `--mount` value as written, its shape already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    raw: String,
}

impl MountSpec {
    /// Checks the parts that need no variables: the CSV syntax, and that
    /// `from=` names a stage without `$VAR`s.
    pub fn new(raw: &str) -> Result<MountSpec, String> {
        for field in csv_fields(raw)? {
            if let Some((key, value)) = field.split_once('=')
                && key.eq_ignore_ascii_case("from")
                && value.find('$').is_some_and(|i| i != value.len() - 1)
            {
                return Err(format!(
                    "'{key}' doesn't support variable expansion, define alias stage instead"
                ));
            }
        }
        Ok(MountSpec {
            raw: raw.to_string(),
        })
    }

    /// The value as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Expands each value with `expand` and checks the mount.
    pub fn resolve(
        &self,
        expand: &mut dyn FnMut(&str) -> Result<String, String>,
    ) -> Result<Mount, String> {
        let mut m = Mount {
            kind: MountType::Bind,
            from: None,
            source: None,
            target: None,
            read_only: false,
            size_limit: None,
            id: None,
            sharing: None,
            required: false,
            env: None,
            mode: None,
            uid: None,
            gid: None,
        };
        let mut ro_given = false;
        for field in csv_fields(&self.raw)? {
            let Some((key, value)) = field.split_once('=') else {
                match field.to_ascii_lowercase().as_str() {
                    "readonly" | "ro" => (m.read_only, ro_given) = (true, true),
                    "readwrite" | "rw" => (m.read_only, ro_given) = (false, true),
                    "required" if matches!(m.kind, MountType::Secret | MountType::Ssh) => {
                        m.required = true;
                    }
                    "required" => {
                        return Err(format!(
                            "unexpected key 'required' for mount type '{}'",
                            m.kind.as_str()
                        ));
                    }
                    _ => return Err(format!("invalid field '{field}' must be a key=value pair")),
                }
                continue;
            };
            let key = key.to_ascii_lowercase();
            let value = expand(value)?;
            let kind = m.kind;
            let bad_value = || format!("invalid value for {key}: {value}");
            match key.as_str() {
                "type" => {
                    m.kind = match value.to_ascii_lowercase().as_str() {
                        "bind" => MountType::Bind,
                        "cache" => MountType::Cache,
                        "tmpfs" => MountType::Tmpfs,
                        "secret" => MountType::Secret,
                        "ssh" => MountType::Ssh,
                        _ => {
                            return Err(format!(
                                "unsupported mount type {}",
                                crate::go_quote(&value)
                            ));
                        }
                    }
                }
                "from" => m.from = Some(value),
                "source" | "src" => m.source = Some(value),
                "target" | "dst" | "destination" => m.target = Some(value),
                "readonly" | "ro" => {
                    m.read_only = parse_go_bool(&value).ok_or_else(bad_value)?;
                    ro_given = true;
                }
                "readwrite" | "rw" => {
                    m.read_only = !parse_go_bool(&value).ok_or_else(bad_value)?;
                    ro_given = true;
                }
                "required" if matches!(kind, MountType::Secret | MountType::Ssh) => {
                    m.required = parse_go_bool(&value).ok_or_else(bad_value)?;
                }
                "size" if kind == MountType::Tmpfs => {
                    m.size_limit = Some(parse_ram_size(&value).ok_or_else(bad_value)?);
                }
                "required" | "size" => {
                    return Err(format!(
                        "unexpected key '{key}' for mount type '{}'",
                        kind.as_str()
                    ));
                }
                "id" => m.id = Some(value),
                "sharing" => {
                    m.sharing = Some(match value.to_ascii_lowercase().as_str() {
                        "shared" => Sharing::Shared,
                        "private" => Sharing::Private,
                        "locked" => Sharing::Locked,
                        _ => {
                            return Err(format!(
                                "unsupported sharing value {}",
                                crate::go_quote(&value)
                            ));
                        }
                    })
                }
                "mode" => {
                    m.mode = Some(
                        u32::from_str_radix(&value, 8)
                            .map_err(|_| format!("invalid value {value} for mode"))?,
                    )
                }
                "uid" => {
                    m.uid = Some(
                        value
                            .parse()
                            .map_err(|_| format!("invalid value {value} for uid"))?,
                    )
                }
                "gid" => {
                    m.gid = Some(
                        value
                            .parse()
                            .map_err(|_| format!("invalid value {value} for gid"))?,
                    )
                }
                "env" => m.env = Some(value),
                _ => return Err(format!("unexpected key '{key}' in '{field}'")),
            }
        }
        let file_info_allowed = matches!(
            m.kind,
            MountType::Secret | MountType::Ssh | MountType::Cache
        );
        if !file_info_allowed {
            for (set, what) in [
                (m.mode.is_some(), "mode"),
                (m.uid.is_some(), "uid"),
                (m.gid.is_some(), "gid"),
            ] {
                if set {
                    return Err(format!(
                        "{what} not allowed for \"{}\" type mounts",
                        m.kind.as_str()
                    ));
                }
            }
        }
        if !ro_given {
            m.read_only = !matches!(m.kind, MountType::Cache | MountType::Tmpfs);
        }
        if m.kind == MountType::Secret {
            if m.from.is_some() {
                return Err("secret mount should not have a from".into());
            }
            if m.sharing.is_some() {
                return Err("secret mount should not define sharing".into());
            }
            if m.source.is_none() && m.target.is_none() && m.id.is_none() {
                return Err("invalid secret mount. one of source, target required".into());
            }
            if m.source.is_some() && m.id.is_some() {
                return Err("both source and id can't be set".into());
            }
        }
        if m.sharing.is_some() && m.kind != MountType::Cache {
            return Err(format!(
                "invalid cache sharing set for {} mount",
                m.kind.as_str()
            ));
        }
        Ok(m)
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A size such as `64m`, `1.5g` or `1024` with binary multipliers, as
/// Docker's `units.RAMInBytes` reads it.
fn parse_ram_size(s: &str) -> Option<u64> {
    let digits = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (num, unit) = s.split_at(digits);
    let num: f64 = num.parse().ok()?;
    let unit = unit.strip_prefix(' ').unwrap_or(unit).to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return None,
    };
    let bytes = num * (1u64 << shift) as f64;
    (bytes.is_finite() && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Splits one CSV record: comma-separated fields, a field that starts with
/// `"` is quoted and `""` inside it is a literal quote.
pub(crate) fn csv_fields(s: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut rest = s;
    loop {
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut field = String::new();
            let mut chars = quoted.char_indices();
            let after = loop {
                match chars.next() {
                    Some((i, '"')) => {
                        if quoted[i + 1..].starts_with('"') {
                            field.push('"');
                            chars.next();
                        } else {
                            break &quoted[i + 1..];
                        }
                    }
                    Some((_, c)) => field.push(c),
                    None => {
                        return Err(format!(
                            "failed to parse csv mounts: extraneous or missing \" in quoted-field: {s}"
                        ));
                    }
                }
            };
            fields.push(field);
            match after.strip_prefix(',') {
                Some(next) => rest = next,
                None if after.is_empty() => return Ok(fields),
                None => {
                    return Err(format!(
                        "failed to parse csv mounts: extraneous or missing \" in quoted-field: {s}"
                    ));
                }
            }
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            let field = &rest[..end];
            if field.contains('"') {
                return Err(format!(
                    "failed to parse csv mounts: bare \" in non-quoted-field: {s}"
                ));
            }
            fields.push(field.to_string());
            if end == rest.len() {
                return Ok(fields);
            }
            rest = &rest[end + 1..];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(raw: &str) -> Result<Mount, String> {
        MountSpec::new(raw)?.resolve(&mut |v| Ok(v.replace("$ID", "gocache")))
    }

    #[test]
    fn cache_mount_defaults_to_read_write() {
        let m = resolve("type=cache,target=/root/.cache,id=$ID,sharing=locked").unwrap();
        assert_eq!(m.kind, MountType::Cache);
        assert!(!m.read_only);
        assert_eq!(m.id.as_deref(), Some("gocache"));
        assert_eq!(m.sharing, Some(Sharing::Locked));
    }

    #[test]
    fn bind_mount_defaults_to_read_only() {
        let m = resolve("target=/src,from=builder,source=/out").unwrap();
        assert_eq!(m.kind, MountType::Bind);
        assert!(m.read_only);
        assert!(!resolve("type=bind,target=/src,rw").unwrap().read_only);
    }

    #[test]
    fn secret_and_tmpfs_rules() {
        assert!(resolve("type=secret,id=x,required").unwrap().required);
        assert!(resolve("type=secret,from=a,id=x").is_err());
        assert!(resolve("type=secret").is_err());
        assert_eq!(
            resolve("type=tmpfs,target=/t,size=64m").unwrap().size_limit,
            Some(64 << 20)
        );
        assert!(resolve("type=bind,size=1").is_err());
        assert!(resolve("type=bind,mode=0600").is_err());
        assert!(resolve("type=cache,target=/x,mode=0755").is_ok());
        assert!(resolve("type=nope").is_err());
        assert!(resolve("target").is_err());
    }

    #[test]
    fn from_cannot_use_variables() {
        assert!(MountSpec::new("from=$STAGE").is_err());
        assert!(MountSpec::new("from=x$").is_ok());
    }

    #[test]
    fn csv_quoting() {
        assert_eq!(csv_fields("a,\"b,c\",d").unwrap(), ["a", "b,c", "d"]);
        assert_eq!(csv_fields("\"x\"\"y\"").unwrap(), ["x\"y"]);
        assert!(csv_fields("a\"b").is_err());
        assert!(csv_fields("\"ab").is_err());
        assert_eq!(csv_fields("").unwrap(), [""]);
    }

    #[test]
    fn ram_sizes() {
        assert_eq!(parse_ram_size("1024"), Some(1024));
        assert_eq!(parse_ram_size("1k"), Some(1024));
        assert_eq!(parse_ram_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_ram_size("x"), None);
    }
}
