//! Guards on content entering a task, and on a task going round in circles.

pub mod injection;
pub mod input;
pub mod loops;
