//! turbosched: an always-on task scheduler.
//!
//! The concepts, each with its home:
//! - a **task** is one `[tasks.<name>]` of the config ([`config`]);
//! - a **fire** is one tick of its cron schedule in its time zone ([`schedule`]), claimed
//!   once in the store so it can never run twice ([`store::Store::claim_fire`]);
//! - a **run** is what a fire (or a manual trigger, a catch-up, a downstream trigger)
//!   becomes: a row in the store that reaches exactly one terminal state ([`model::RunState`]);
//! - an **attempt** is one child process of a run ([`runner`], [`worker`]); a failed one is
//!   retried with backoff while attempts remain;
//! - a **built-in handler** is task code compiled in, listed once in [`builtins`] and run
//!   by the worker with a [`handlers::TaskContext`];
//! - the **engine** ([`engine`]) is the loop that fires, checks dependencies, admits runs
//!   under `max_workers` and `overlap`, supervises attempts and finds orphans;
//! - **maintenance** ([`maintenance`]) archives old logs into verified zips, prunes history
//!   and backs up the database;
//! - the **API** ([`api`]) is the HTTP skin over the engine: status, triggers, runs,
//!   events as server-sent events, health, metrics;
//! - the **pipeline** ([`pipeline`]) is the first users' market tasks, built in: `ingest` today;
//! - an **event** is a numbered, persisted record of every state change ([`store::EventRow`]);
//! - a **view** is the JSON shape of one of these, the same from the API and the command
//!   line ([`views`]).
//!
//! See ARCHITECTURE.md for the map and the invariants.

#![warn(missing_docs, unreachable_pub)]

pub mod alerts;
pub mod api;
pub mod audit;
pub mod builtins;
pub mod config;
pub mod engine;
pub mod handlers;
pub mod maintenance;
pub mod model;
pub mod outputs;
pub mod pipeline;
pub mod runner;
pub mod schedule;
pub mod spawn;
pub mod store;
pub mod tasklog;
pub mod times;
pub mod views;
pub mod worker;
