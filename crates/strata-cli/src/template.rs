//! `--format` as Docker's list commands take it: Go template actions on a
//! row's fields (`{{.Repository}}:{{.Tag}}`, `{{json .}}`,
//! `{{json .Labels}}`), a leading `table` for a header and aligned
//! columns, and `\t` for a column break. Only field lookups and `json`
//! are understood; anything else is refused with the action named.

use std::collections::BTreeMap;

use anyhow::{Result, bail};

/// A row: fields by name, and the header each shows under in a table.
pub struct Row {
    /// Field values.
    pub fields: BTreeMap<&'static str, serde_json::Value>,
}

/// One piece of a template.
enum Piece {
    Text(String),
    Field(String),
    Json(Option<String>),
}

/// A parsed `--format`.
pub struct Template {
    table: bool,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses `format`.
    pub fn parse(format: &str) -> Result<Template> {
        let (table, body) = match format.strip_prefix("table") {
            Some(rest) => (true, rest.trim_start()),
            None => (false, format),
        };
        let body = body.replace("\\t", "\t").replace("\\n", "\n");
        let mut pieces = Vec::new();
        let mut rest = body.as_str();
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find("}}") else {
                bail!("template: unclosed action in {format:?}");
            };
            let action = rest[open + 2..open + close].trim();
            pieces.push(match action.split_whitespace().collect::<Vec<_>>().as_slice() {
                ["json", "."] => Piece::Json(None),
                ["json", f] if f.starts_with('.') => Piece::Json(Some(f[1..].to_string())),
                [f] if f.starts_with('.') && f.len() > 1 => Piece::Field(f[1..].to_string()),
                _ => bail!("template: {{{{{action}}}}} is not supported (a field such as {{{{.ID}}}}, or json)"),
            });
            rest = &rest[open + close + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template { table, pieces })
    }

    fn field<'r>(row: &'r Row, name: &str) -> Result<&'r serde_json::Value> {
        row.fields.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "template: can't evaluate field {name}; the fields are {}",
                row.fields.keys().copied().collect::<Vec<_>>().join(", ")
            )
        })
    }

    fn render(&self, row: &Row) -> Result<String> {
        let mut s = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => s.push_str(t),
                Piece::Field(f) => match Self::field(row, f)? {
                    serde_json::Value::String(v) => s.push_str(v),
                    serde_json::Value::Null => {}
                    other => s.push_str(&other.to_string()),
                },
                Piece::Json(None) => s.push_str(&serde_json::to_string(&row.fields)?),
                Piece::Json(Some(f)) => s.push_str(&serde_json::to_string(Self::field(row, f)?)?),
            }
        }
        Ok(s)
    }

    /// The lines for `rows`; with `table`, a header from `headers` (by
    /// field) and tab-separated columns aligned.
    pub fn lines(&self, rows: &[Row], headers: &BTreeMap<&str, &str>) -> Result<Vec<String>> {
        let mut lines = Vec::new();
        if self.table {
            let header: String = self
                .pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.clone(),
                    Piece::Field(f) => headers
                        .get(f.as_str())
                        .map_or_else(|| f.to_uppercase(), |h| (*h).to_string()),
                    Piece::Json(_) => String::new(),
                })
                .collect();
            lines.push(header);
        }
        for r in rows {
            lines.push(self.render(r)?);
        }
        if !self.table {
            return Ok(lines);
        }
        // Align tab-separated cells, as Go's tabwriter does for Docker.
        let cells: Vec<Vec<&str>> = lines.iter().map(|l| l.split('\t').collect()).collect();
        let mut widths: Vec<usize> = Vec::new();
        for row in &cells {
            for (i, c) in row.iter().enumerate() {
                if i + 1 < row.len() {
                    if widths.len() <= i {
                        widths.push(0);
                    }
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        Ok(cells
            .iter()
            .map(|row| {
                let mut line = String::new();
                for (i, c) in row.iter().enumerate() {
                    if i + 1 < row.len() {
                        line.push_str(&format!("{c:<w$}   ", w = widths[i]));
                    } else {
                        line.push_str(c);
                    }
                }
                line
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> Row {
        Row {
            fields: BTreeMap::from([
                ("Repository", serde_json::json!("busybox")),
                ("Tag", serde_json::json!("latest")),
                ("Size", serde_json::json!("2.14MB")),
            ]),
        }
    }

    #[test]
    fn fields_json_and_tables_render_as_docker_s() {
        let t = Template::parse("{{.Repository}}:{{ .Tag }}").unwrap();
        assert_eq!(
            t.lines(&[row()], &BTreeMap::new()).unwrap(),
            ["busybox:latest"]
        );
        let t = Template::parse("{{json .}}").unwrap();
        assert_eq!(
            t.lines(&[row()], &BTreeMap::new()).unwrap(),
            [r#"{"Repository":"busybox","Size":"2.14MB","Tag":"latest"}"#]
        );
        let t = Template::parse("table {{.Repository}}\\t{{.Size}}").unwrap();
        let headers = BTreeMap::from([("Repository", "REPOSITORY")]);
        assert_eq!(
            t.lines(&[row()], &headers).unwrap(),
            ["REPOSITORY   SIZE", "busybox      2.14MB"]
        );
    }

    #[test]
    fn unknown_fields_and_actions_are_refused_by_name() {
        let t = Template::parse("{{.Nope}}").unwrap();
        let e = t.lines(&[row()], &BTreeMap::new()).unwrap_err().to_string();
        assert!(
            e.contains("can't evaluate field Nope") && e.contains("Repository"),
            "{e}"
        );
        assert!(Template::parse("{{range .}}").is_err());
        assert!(Template::parse("{{.Tag").is_err());
    }
}
