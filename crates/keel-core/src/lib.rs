//! keel's shared vocabulary: the event kinds of the log (DESIGN §6) and the
//! single classification of upstream failures (DESIGN §5).
//!
//! This crate owns names and meanings only; it does no I/O.

pub mod api_error;
pub mod canonical;
pub mod class;
pub mod event;
#[cfg(feature = "prometheus")]
pub mod metric;
pub mod text;

pub use api_error::{ApiError, bearer_token};
pub use canonical::{CanonicalText, Document};
pub use class::ErrorClass;
pub use event::{EventKind, NewEvent, TextMember};
#[cfg(feature = "prometheus")]
pub use metric::{AgentLabels, LabelValue};
