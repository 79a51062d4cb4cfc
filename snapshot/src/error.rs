//! Errors: every failure names its cause and, where the user can act, the remedy.

use std::fmt;

/// The class of a failure, so callers (the CLI, tests) can react without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request was refused before anything changed: bad input or an unsupported state.
    Refused,
    /// The process or snapshot asked for does not exist.
    NotFound,
    /// Another capture, restore or delete holds the process or the snapshot.
    Busy,
    /// The snapshot on disk is damaged, incomplete or of an unknown version.
    Corrupt,
    /// A system call or file operation failed.
    System,
}

/// A failure with its cause and, where there is one, what the user can do about it.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    remedy: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The result type of the snapshot core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failure of the given kind with a message saying what happened.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            remedy: None,
            source: None,
        }
    }

    /// A refusal: the request cannot be done as asked; nothing was changed.
    pub fn refused(message: impl Into<String>, remedy: impl Into<String>) -> Self {
        Error::new(ErrorKind::Refused, message).with_remedy(remedy)
    }

    /// The thing asked for does not exist.
    pub fn not_found(message: impl Into<String>, remedy: impl Into<String>) -> Self {
        Error::new(ErrorKind::NotFound, message).with_remedy(remedy)
    }

    /// Something else holds the process or snapshot right now.
    pub fn busy(message: impl Into<String>, remedy: impl Into<String>) -> Self {
        Error::new(ErrorKind::Busy, message).with_remedy(remedy)
    }

    /// The snapshot on disk cannot be trusted.
    pub fn corrupt(message: impl Into<String>, remedy: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message).with_remedy(remedy)
    }

    /// A system call failed; `what` says what dolly was doing.
    pub fn sys(what: impl Into<String>, errno: nix::errno::Errno) -> Self {
        Error::new(ErrorKind::System, what).with_source(std::io::Error::from(errno))
    }

    /// A file operation failed; `what` says what dolly was doing.
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        Error::new(ErrorKind::System, what).with_source(err)
    }

    /// Adds what the user can do about it.
    pub fn with_remedy(mut self, remedy: impl Into<String>) -> Self {
        self.remedy = Some(remedy.into());
        self
    }

    /// Attaches the lower-level error that caused this one.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with what was being done when it failed.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// The class of the failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What happened, without the remedy.
    pub fn message(&self) -> String {
        match &self.source {
            Some(source) => format!("{}: {source}", self.message),
            None => self.message.clone(),
        }
    }

    /// What the user can do about it, if anything.
    pub fn remedy(&self) -> Option<&str> {
        self.remedy.as_deref()
    }

    /// The errno behind a system failure, if there is one.
    pub fn errno(&self) -> Option<i32> {
        self.source
            .as_ref()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .and_then(|e| e.raw_os_error())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())?;
        if let Some(remedy) = &self.remedy {
            write!(f, " (hint: {remedy})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

/// Adds "what was being done" to lower-level errors.
pub trait Context<T> {
    /// Turns the error into a dolly [`Error`] that says what was being done.
    fn context(self, what: impl Into<String>) -> Result<T>;
    /// Like [`Context::context`], with the message built only on failure.
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, nix::errno::Errno> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::sys(what, e))
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::sys(what(), e))
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::io(what, e))
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

impl<T> Context<T> for Result<T> {
    fn context(self, what: impl Into<String>) -> Result<T> {
        self.map_err(|e| e.context(what.into()))
    }
    fn with_context<S: Into<String>>(self, what: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| e.context(what().into()))
    }
}
