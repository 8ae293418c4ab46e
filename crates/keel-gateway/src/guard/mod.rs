//! Guards on content entering a task.

pub mod injection;
