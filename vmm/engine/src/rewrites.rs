//! How an operating system legitimately rewrites its own code after loading it, which the
//! expected-bytes check (rule 1) must accept. The engine knows no OS: the OS layer passes its
//! policy in when it builds the engine ([`Engine::new`]); without one, guest code must match the patch's
//! expected bytes exactly.

#[cfg(doc)]
use crate::Engine;
use crate::plan::PlanError;
use crate::target::Target;

/// One site's code as the patch expects it and as the guest holds it.
#[derive(Debug, Clone, Copy)]
pub struct SiteText<'a> {
    pub site: &'a str,
    pub expected: &'a [u8],
    pub current: &'a [u8],
    /// The run-time address of both.
    pub at: u64,
    /// The bytes start at a function's entry.
    pub function_entry: bool,
}

/// An OS's known rewrites of its own text.
pub trait TextRewrites: Send + Sync {
    /// `text.expected` with the OS's rewrites taken from `text.current` where (and only where)
    /// they are the known ones; an error when the guest's code is in a form the patcher must
    /// not touch.
    fn reconcile(&self, text: &SiteText<'_>, target: &Target) -> Result<Vec<u8>, PlanError>;
}

/// Images loaded as they are: the expected bytes must match exactly.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRewrites;

impl TextRewrites for NoRewrites {
    fn reconcile(&self, text: &SiteText<'_>, _target: &Target) -> Result<Vec<u8>, PlanError> {
        Ok(text.expected.to_vec())
    }
}
