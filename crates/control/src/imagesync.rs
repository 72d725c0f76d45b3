//! Image files on every control plane replica. An image is installed (built or imported) on one
//! replica, into its data directory; its record, in the shared store, names the files there.
//! Hosts copy an image's files from whichever replica answers, so every replica keeps a copy:
//! each one announces where it serves under [`REPLICAS`], and [`spawn`] fetches, every few
//! seconds, the files of every image on record that it does not have, from the replicas that
//! do (`GET /v1/image-files/DIR/FILE`, with the API token the replicas share), into a partial
//! file renamed when whole and checked against the size the serving replica gave.
//!
//! A file is known by its image directory and name (`DIR/FILE`), not by the absolute path in
//! the record: replicas may keep their data in different directories.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stratus_api::model::Image;

use crate::state::AppState;

/// Where each replica says it serves the API: `REPLICAS` + name -> URL.
pub const REPLICAS: &str = "/control/replicas/";

/// How often a replica looks for image files it lacks.
const EVERY: Duration = Duration::from_secs(3);

/// The `(DIR, FILE)` of each file of `image`.
pub fn files(image: &Image) -> Vec<(String, String)> {
    let paths = [Some(&image.kernel), image.initrd.as_ref(), Some(&image.rootfs)];
    paths
        .into_iter()
        .flatten()
        .filter_map(|path| {
            let path = Path::new(path);
            let file = path.file_name()?.to_str()?.to_string();
            let dir = path.parent()?.file_name()?.to_str()?.to_string();
            (stratus_agent::images::valid_dir(&dir)
                && stratus_agent::images::IMAGE_FILES.contains(&file.as_str()))
            .then_some((dir, file))
        })
        .collect()
}

/// Whether `DIR/FILE` is a file of an image on record (the only files the routes serve).
pub fn on_record(images: &[Image], dir: &str, file: &str) -> bool {
    images.iter().any(|image| files(image).iter().any(|(d, f)| d == dir && f == file))
}

/// Announces this replica (`name` at `url`) and starts fetching the image files it lacks.
pub fn spawn(state: Arc<AppState>, name: &str, url: &str) {
    let _ = state.db.put(&format!("{REPLICAS}{name}"), &url.to_string());
    let name = name.to_string();
    let _ = std::thread::Builder::new().name("image-sync".into()).spawn(move || loop {
        pass(&state, &name);
        std::thread::sleep(EVERY);
    });
}

/// One look: every missing file fetched from the first replica that has it.
fn pass(state: &AppState, me: &str) {
    let Ok(images) = state.db.list::<Image>("/images/") else { return };
    let Ok(replicas) = state.db.store().list(REPLICAS) else { return };
    let others: Vec<String> = replicas
        .into_iter()
        .filter(|e| e.key != format!("{REPLICAS}{me}"))
        .filter_map(|e| serde_json::from_slice::<String>(&e.value).ok())
        .collect();
    for image in &images {
        for (dir, file) in files(image) {
            let local = state.data_dir.join("images").join(&dir).join(&file);
            if local.exists() {
                continue;
            }
            let fetched = others.iter().find_map(|url| fetch(url, &state.token, &dir, &file, &local).ok());
            if let Some(bytes) = fetched {
                state.db.event(
                    stratus_api::model::DEFAULT_PROJECT,
                    "",
                    "info",
                    format!("replica {me}: copied image {}'s {dir}/{file} ({} MiB)", image.name, bytes >> 20),
                );
            }
        }
    }
}

/// Copies `DIR/FILE` from the replica at `url` to `to`; its size.
fn fetch(url: &str, token: &str, dir: &str, file: &str, to: &Path) -> Result<u64, String> {
    let response = stratus_agent::images::file_client()
        .get(&format!("{url}/v1/image-files/{dir}/{file}"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .map_err(|e| e.to_string())?;
    // A replica's answer always says its length: one that does not is not taken.
    response.header("content-length").ok_or("no length")?;
    let parent = to.parent().ok_or("no directory")?;
    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    let partial: PathBuf = parent.join(format!(".{file}.partial"));
    let copied = stratus_agent::images::save_file(response, &format!("{dir}/{file} from {url}"), &partial)
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&partial);
        })?;
    std::fs::rename(&partial, to).map_err(|e| e.to_string())?;
    Ok(copied)
}
