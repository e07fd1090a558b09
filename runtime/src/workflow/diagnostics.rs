//! Validation findings: every one names the file, line and column, the node and
//! the port where it can.

use serde::Serialize;
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagnosticKind {
    /// Not YAML, or not readable.
    Syntax,
    /// YAML, but not the shape of a workflow (missing `nodes:`, unknown keys …).
    Schema,
    UnknownNodeType,
    UnknownPort,
    MissingInput,
    TypeMismatch,
    OutOfRange,
    NotInChoices,
    /// `${x.y}` names a node, output or param that does not exist.
    MissingReference,
    Cycle,
    UnusedParam,
    /// A value that is well-typed but unusable (bad identifier, bad `--set`, …).
    InvalidValue,
    /// A plugin the workflow names could not be loaded.
    Plugin,
    /// The run would need more than the server allows one run.
    Resources,
}

impl DiagnosticKind {
    fn label(self) -> &'static str {
        match self {
            DiagnosticKind::Syntax => "syntax",
            DiagnosticKind::Schema => "schema",
            DiagnosticKind::UnknownNodeType => "unknown-node-type",
            DiagnosticKind::UnknownPort => "unknown-port",
            DiagnosticKind::MissingInput => "missing-input",
            DiagnosticKind::TypeMismatch => "type-mismatch",
            DiagnosticKind::OutOfRange => "out-of-range",
            DiagnosticKind::NotInChoices => "not-in-choices",
            DiagnosticKind::MissingReference => "missing-reference",
            DiagnosticKind::Cycle => "cycle",
            DiagnosticKind::UnusedParam => "unused-param",
            DiagnosticKind::InvalidValue => "invalid-value",
            DiagnosticKind::Plugin => "plugin",
            DiagnosticKind::Resources => "resources",
        }
    }
}

/// A position in the workflow file, 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Span {
    pub line: usize,
    pub column: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub kind: DiagnosticKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(kind: DiagnosticKind, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            kind,
            file: None,
            line: None,
            column: None,
            node: None,
            port: None,
            message: message.into(),
            help: None,
        }
    }

    pub fn warning(kind: DiagnosticKind, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(kind, message)
        }
    }

    pub fn at(mut self, span: Option<Span>) -> Self {
        if let Some(span) = span {
            self.line = Some(span.line);
            self.column = Some(span.column);
        }
        self
    }

    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    pub fn port(mut self, port: &str) -> Self {
        self.port = Some(port.to_string());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().unwrap_or("<workflow>");
        match (self.line, self.column) {
            (Some(line), Some(col)) => write!(f, "{file}:{line}:{col}: ")?,
            (Some(line), None) => write!(f, "{file}:{line}: ")?,
            _ => write!(f, "{file}: ")?,
        }
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{severity}[{}]: ", self.kind.label())?;
        match (&self.node, &self.port) {
            (Some(node), Some(port)) => write!(f, "node `{node}`, port `{port}`: ")?,
            (Some(node), None) => write!(f, "node `{node}`: ")?,
            _ => {}
        }
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// A workflow that did not load: all its findings, errors and warnings, in file order.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowError {
    pub diagnostics: Vec<Diagnostic>,
}

impl WorkflowError {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.errors().count();
        writeln!(
            f,
            "workflow is invalid: {errors} error{}",
            if errors == 1 { "" } else { "s" }
        )?;
        for d in &self.diagnostics {
            writeln!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for WorkflowError {}
