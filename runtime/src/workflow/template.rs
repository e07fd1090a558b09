//! `${scope.name}` references inside workflow strings.
//!
//! A string that is exactly one reference binds a typed value (a parameter, or an
//! edge from a node output); references inside a longer string interpolate text.
//! `$${` writes a literal `${`.

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Text(String),
    /// `${scope.name}`: scope is `params` or a node id.
    Ref {
        scope: String,
        name: String,
    },
}

pub fn parse(s: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        text.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            text.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unterminated reference in {s:?}: missing `}}`"))?;
            let inner = tail[..end].trim();
            let (scope, name) = inner
                .split_once('.')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains('.'))
                .ok_or_else(|| {
                    format!(
                        "reference `${{{inner}}}` must be `${{node.output}}` or `${{params.name}}`"
                    )
                })?;
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Ref {
                scope: scope.trim().to_string(),
                name: name.trim().to_string(),
            });
            rest = &tail[end + 1..];
        } else {
            text.push('$');
            rest = &after[1..];
        }
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(scope: &str, name: &str) -> Part {
        Part::Ref {
            scope: scope.into(),
            name: name.into(),
        }
    }

    #[test]
    fn parses_refs_text_and_escapes() {
        assert_eq!(
            parse("${noise.tensor}").unwrap(),
            vec![r("noise", "tensor")]
        );
        assert_eq!(
            parse("out/${ params.seed }.png").unwrap(),
            vec![
                Part::Text("out/".into()),
                r("params", "seed"),
                Part::Text(".png".into())
            ]
        );
        assert_eq!(
            parse("cost $5 $${x}").unwrap(),
            vec![Part::Text("cost $5 ${x}".into())]
        );
        assert!(parse("${oops").is_err());
        assert!(parse("${nodot}").is_err());
        assert!(parse("${a.b.c}").is_err());
    }
}
