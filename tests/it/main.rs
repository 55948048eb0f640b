//! Integration tests: the real `turbosched` binary, real SQLite files, real child
//! processes, each test in its own folder. One test binary for all of them, to keep
//! link time down.

mod alerts;
mod api;
mod backfill;
mod bench;
mod bench_cluster;
mod boundaries;
mod browser;
mod cascade;
mod chaos;
mod cli;
mod cluster;
mod cluster_storm;
mod docs;
mod faults;
mod install;
mod maintenance;
mod market;
mod migrate;
mod params;
mod pipeline;
mod pools;
mod recovery;
mod run_watch;
mod scheduling;
mod schema;
mod supervision;
mod support;
mod systemd;
mod times;
