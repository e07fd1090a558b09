//! Chat templates as transformers renders them: the folder's Jinja template in an
//! environment set up like transformers' (`trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, Python string methods), with transformers'
//! `{% generation %}` extension tag understood.

use minijinja::{Environment, Error, ErrorKind};
use pixart_models::weights::{parse_json, LoadError};
use std::path::Path;

/// A Jinja environment holding the folder's chat template as "chat"; a template
/// that does not parse is a load error.
pub fn chat_environment(dir: &Path) -> Result<Environment<'static>, LoadError> {
    let source = chat_template(dir)?;
    environment(source)
        .map_err(|e| LoadError::file(dir, format!("the chat template does not parse: {e}")))
}

/// The environment for a template's source.
pub fn environment(source: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template_owned("chat", without_generation_tags(&source))?;
    Ok(env)
}

/// transformers' `{% generation %}…{% endgeneration %}` marks the assistant's
/// text so it can return a mask of those tokens; the body renders unchanged, in a
/// scope of its own. Jinja's `with` block is exactly that, so each tag becomes
/// `with` / `endwith`, keeping its whitespace-control marks (`{%-`, `-%}`).
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            rest = tag;
            break;
        };
        let inner = &tag[2..end];
        let body = inner
            .trim_start_matches(['-', '+'])
            .trim_end_matches(['-', '+']);
        let replacement = match body.trim() {
            "generation" => Some("with"),
            "endgeneration" => Some("endwith"),
            _ => None,
        };
        match replacement {
            Some(word) => {
                let open = &inner[..inner.len() - inner.trim_start_matches(['-', '+']).len()];
                let close = &inner[inner.trim_end_matches(['-', '+']).len()..];
                out.push_str(&format!("{{%{open} {word} {close}%}}"));
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// The chat template: `chat_template.jinja` (transformers 5), `chat_template.json`
/// (the hub's llava-1.5 folders), or the `chat_template` of the processor or
/// tokenizer config.
fn chat_template(dir: &Path) -> Result<String, LoadError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map_err(|e| LoadError::file(&jinja, e));
    }
    for file in [
        "chat_template.json",
        "processor_config.json",
        "tokenizer_config.json",
    ] {
        let path = dir.join(file);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let json: serde_json::Value = parse_json(&path, &text)?;
            if let Some(t) = json.get("chat_template").and_then(|t| t.as_str()) {
                return Ok(t.to_string());
            }
        }
    }
    Err(LoadError::file(
        dir,
        "no chat template (chat_template.jinja, chat_template.json, or `chat_template` in processor_config.json or tokenizer_config.json)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: serde_json::Value) -> String {
        let env = environment(source.to_string()).unwrap();
        env.get_template("chat")
            .unwrap()
            .render(minijinja::context! { messages => messages, add_generation_prompt => true })
            .unwrap()
    }

    #[test]
    fn generation_tags_become_scopes_keeping_whitespace_control() {
        assert_eq!(
            without_generation_tags("a{%- generation -%} b {%+endgeneration%}{% if x %}"),
            "a{%- with -%} b {%+ endwith %}{% if x %}"
        );
        // A template without them is untouched, unterminated tags included.
        let plain = "{{ x }}{% for m in ms %}{% endfor %}{% generation_x %} {% if";
        assert_eq!(without_generation_tags(plain), plain);
    }

    #[test]
    fn generation_body_renders_once_and_its_sets_stay_inside() {
        let t = "{% set n = 1 %}{% for m in messages %}{% generation %}{% set n = 2 %}\
                 [{{ m.content }}]{% endgeneration %}{% endfor %}{{ n }}";
        let messages = serde_json::json!([{"role": "assistant", "content": "hi"}]);
        assert_eq!(render(t, messages), "[hi]1");
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_renders() {
        let t = "{% for m in messages %}\n  {% if m.role %}{{ m.role }};{% endif %}\n{% endfor %}";
        let messages = serde_json::json!([{"role": "user"}, {"role": "assistant"}]);
        assert_eq!(render(t, messages), "user;assistant;");
    }
}
