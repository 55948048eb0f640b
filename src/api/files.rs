//! `GET /scheduler/files?path=…`: what runs produced (charts, metrics JSON, SHAP logs),
//! read-only, and only from the configured output folders of every task of the running
//! config: the folders its params name, else a built-in's default ones
//! ([`crate::config::output_folders`], read by [`crate::outputs::output_folders`]), less
//! any that is or holds the working directory, database, state or log folder
//! ([`crate::outputs::refusal`]; validation refuses those too).
//!
//! A path is served when, taken as the run's result names it (relative to the service's
//! working directory, as the worker wrote it), it lies inside one of those folders both as
//! written and once every symbolic link is resolved; `..` is refused outright. A folder
//! answers with its listing, a file with its bytes. Everything else is a 4xx JSON error.

use std::path::{Component, Path, PathBuf};

use actix_web::http::StatusCode;
use actix_web::web::{self, Data};
use actix_web::HttpResponse;
use serde::Deserialize;

use crate::views;

use super::errors::{ApiError, ApiResult};
use super::routes::snapshot;
use super::ApiState;

/// The largest file served.
const MAX_FILE: u64 = 32 * 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileQuery {
    path: Option<String>,
}

/// What a path resolved to.
enum Found {
    File(Vec<u8>),
    Folder(Vec<(String, u64)>),
}

pub(super) async fn file(query: web::Query<FileQuery>, state: Data<ApiState>) -> ApiResult {
    let Some(path) = query.into_inner().path.filter(|p| !p.is_empty()) else {
        return Err(ApiError::bad_request(
            "bad_query",
            "path: expected a file of a run's outputs, such as reports/backtest/run_12/equity.svg",
        ));
    };
    let snapshot = snapshot(&state)?;
    let folders: Vec<PathBuf> = snapshot
        .config
        .tasks
        .values()
        .flat_map(|spec| {
            // The folders its params name, else a built-in's defaults; validation refuses
            // a folder holding the service's own files, and so does serving.
            crate::config::output_folders(&spec.handler, &spec.params)
                .into_iter()
                .filter_map(|folder| {
                    match crate::config::output_folder_refusal(
                        &folder.path,
                        &snapshot.config.scheduler,
                    ) {
                        Some(reason) => {
                            tracing::warn!(
                                "not serving tasks.{}.params.{}: {reason}",
                                spec.name,
                                folder.param
                            );
                            None
                        }
                        None => Some(folder.path),
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let asked = path.clone();
    let found = web::block(move || resolve(&asked, &folders))
        .await
        .map_err(ApiError::internal)??;
    Ok(match found {
        Found::Folder(files) => HttpResponse::Ok().json(views::output_folder(&path, &files)),
        Found::File(bytes) => HttpResponse::Ok()
            .content_type(content_type(&path))
            // A served SVG must not run script or load anything in this origin.
            .insert_header((
                "Content-Security-Policy",
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox",
            ))
            .insert_header(("X-Content-Type-Options", "nosniff"))
            .body(bytes),
    })
}

fn content_type(path: &str) -> &'static str {
    match Path::new(path).extension().and_then(|e| e.to_str()) {
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("csv") => "text/csv; charset=utf-8",
        Some("png") => "image/png",
        Some("html") | Some("htm") => "text/plain; charset=utf-8",
        _ => "text/plain; charset=utf-8",
    }
}

fn outside(path: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "outside_outputs",
        format!("path {path:?}: {why}; only files in the configured output folders are served"),
    )
}

fn not_found(path: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("path {path:?}: no such file in the output folders"),
    )
}

/// `path` with `.` and `..` taken away by reading it, not the disk (a configured folder
/// may be `../reports`).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `path` as the worker wrote it, checked against `folders`.
fn resolve(path: &str, folders: &[PathBuf]) -> Result<Found, ApiError> {
    let asked = Path::new(path);
    if asked.components().any(|c| c == Component::ParentDir) {
        return Err(outside(path, "\"..\" is refused"));
    }
    let cwd = std::env::current_dir().map_err(ApiError::internal)?;
    let absolute = cwd.join(asked);
    let Some(folder) = folders
        .iter()
        .map(|f| lexical(&cwd.join(f)))
        .find(|f| absolute.starts_with(f))
    else {
        return Err(outside(path, "not inside an output folder"));
    };
    // Resolve symbolic links on both sides: a link in the folder to a file elsewhere is
    // outside.
    let real = absolute.canonicalize().map_err(|_| not_found(path))?;
    if !crate::outputs::within(std::slice::from_ref(&folder), &real) {
        return Err(outside(path, "a symbolic link out of its output folder"));
    }
    let folder = folder.canonicalize().map_err(|_| not_found(path))?;
    let metadata = std::fs::metadata(&real).map_err(|_| not_found(path))?;
    if metadata.is_dir() {
        let mut files = Vec::new();
        let entries = std::fs::read_dir(&real).map_err(|_| not_found(path))?;
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let Ok(target) = entry.path().canonicalize() else {
                continue;
            };
            match std::fs::metadata(&target) {
                Ok(meta) if meta.is_file() && target.starts_with(&folder) => {
                    files.push((name, meta.len()))
                }
                _ => {}
            }
        }
        files.sort();
        return Ok(Found::Folder(files));
    }
    if !metadata.is_file() {
        return Err(not_found(path));
    }
    if metadata.len() > MAX_FILE {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "path {path:?}: {} bytes, more than the {MAX_FILE} served",
                metadata.len()
            ),
        ));
    }
    std::fs::read(&real)
        .map(Found::File)
        .map_err(|_| not_found(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(result: Result<Found, ApiError>) -> String {
        match result {
            Ok(Found::File(bytes)) => format!("file {}", String::from_utf8_lossy(&bytes)),
            Ok(Found::Folder(files)) => format!("folder {files:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn only_files_inside_the_output_folders_are_served() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let reports = root.join("reports");
        std::fs::create_dir_all(reports.join("run_1")).unwrap();
        std::fs::write(reports.join("run_1/metrics.json"), "{}").unwrap();
        std::fs::write(root.join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(root.join("secret.txt"), reports.join("run_1/link.json"))
            .unwrap();
        // As a config may name it: through "..".
        let folders = vec![root.join("elsewhere/../reports")];
        let at = |p: &Path| p.display().to_string();

        assert_eq!(
            status(resolve(&at(&reports.join("run_1/metrics.json")), &folders)),
            "file {}"
        );
        assert_eq!(
            status(resolve(&at(&reports.join("run_1")), &folders)),
            "folder [(\"metrics.json\", 2)]",
            "the link out of the folder is not listed"
        );
        for (path, code) in [
            (
                at(&reports.join("run_1/../../secret.txt")),
                "outside_outputs",
            ),
            (at(&root.join("secret.txt")), "outside_outputs"),
            ("/etc/passwd".to_string(), "outside_outputs"),
            (at(&reports.join("run_1/link.json")), "outside_outputs"),
            (at(&reports.join("run_1/missing.json")), "not_found"),
        ] {
            let answer = status(resolve(&path, &folders));
            assert!(answer.starts_with(code), "{path}: {answer}");
        }
    }
}
