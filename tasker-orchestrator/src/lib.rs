//! Tasker's orchestrator: claims due tasks, enqueues their runnable steps,
//! schedules retries, finalizes finished tasks, and serves the task API.
//!
//! | concept | module |
//! |---|---|
//! | the claim and orchestration loop | [`orchestrator`] |
//! | what a claimed task needs next | [`evaluation`] |
//! | failing attempts whose worker vanished | [`rescuer`] |
//! | the HTTP task API | [`api`] |
//! | building and running the service | [`startup`] |

pub mod api;
pub mod evaluation;
pub mod orchestrator;
pub mod rescuer;
pub mod startup;
