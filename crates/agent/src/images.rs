//! A host agent's own copies of images. An order names an image by the files the control plane
//! keeps (`.../images/DIR/{vmlinux,initrd,rootfs.ext4}`); the agent copies them from the control
//! plane into `DATA/images/DIR` the first time an instance there needs them (one fetch per image
//! at a time, into a partial directory renamed when whole, each file checked against its size),
//! and boots from its copies. Each host then makes its own warm snapshot of the image in the
//! background: a snapshot holds CPU state, which is only sure to restore on the machine it was
//! made on. Until it is made, launches there boot cold.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stratus_api::model::{Image, Network, WarmSnapshot, VMM_VERSION};

use crate::HostAgent;

/// The files an image directory may hold, the only ones fetched or served.
pub const IMAGE_FILES: [&str; 3] = ["vmlinux", "initrd", "rootfs.ext4"];

/// Whether the image's warm snapshot exists and was made by this VMM version.
pub fn warm_is_current(image: &Image) -> bool {
    image.warm.as_ref().is_some_and(|w| {
        w.vmm_version == VMM_VERSION && Path::new(&w.memory).exists() && Path::new(&w.disk).exists()
    })
}

/// Where an agent gets the files of images it lacks.
pub trait ImageSource: Send + Sync {
    /// Writes `file` of image directory `dir` (its name) to `dest`; the bytes written.
    fn fetch(&self, dir: &str, file: &str, dest: &Path) -> Result<u64, String>;
}

/// Whether `dir` can name an image directory: an image name, a dash and a tag (no path).
pub fn valid_dir(dir: &str) -> bool {
    !dir.is_empty()
        && dir.len() <= 100
        && !dir.starts_with(['.', '-'])
        && dir.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The agent's image copies under `root` (`DATA/images`).
pub struct HostImages {
    root: PathBuf,
    source: Arc<dyn ImageSource>,
    driver: Arc<dyn HostAgent>,
    /// Held while fetching: one image copied at a time.
    fetching: Mutex<()>,
    /// Images whose warm snapshot is being made.
    warming: Mutex<HashSet<String>>,
}

impl HostImages {
    pub fn new(root: &Path, source: Arc<dyn ImageSource>, driver: Arc<dyn HostAgent>) -> Arc<HostImages> {
        Arc::new(HostImages {
            root: root.to_path_buf(),
            source,
            driver,
            fetching: Mutex::default(),
            warming: Mutex::default(),
        })
    }

    /// `image` (as the control plane keeps it) as this host's copy: fetched first if this
    /// host has none, with this host's warm snapshot when one is made (and one set to be made
    /// on `network` when the control plane's image has one and this host's has not).
    pub fn local(
        self: &Arc<Self>,
        image: &Image,
        network: &Network,
        progress: &mut dyn FnMut(String),
    ) -> Result<Image, String> {
        let dir_name = Path::new(&image.rootfs)
            .parent()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            .filter(|n| valid_dir(n))
            .ok_or_else(|| format!("image {}: its files are not in an image directory", image.name))?
            .to_string();
        let dir = self.root.join(&dir_name);
        let mut wanted = vec![("vmlinux", 0)];
        if image.initrd.is_some() {
            wanted.push(("initrd", 0));
        }
        wanted.push(("rootfs.ext4", image.rootfs_bytes));
        if !dir.join("rootfs.ext4").exists() {
            let _one = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            if !dir.join("rootfs.ext4").exists() {
                self.fetch(image, &dir_name, &wanted, progress)?;
            }
        }
        let mut local = Image {
            kernel: dir.join("vmlinux").display().to_string(),
            initrd: image.initrd.as_ref().map(|_| dir.join("initrd").display().to_string()),
            rootfs: dir.join("rootfs.ext4").display().to_string(),
            warm: std::fs::read(dir.join("warm.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()),
            ..image.clone()
        };
        if !warm_is_current(&local) {
            local.warm = None;
            if image.warm.is_some() {
                self.make_warm(&local, &dir_name, network);
            }
        }
        Ok(local)
    }

    fn fetch(
        &self,
        image: &Image,
        dir_name: &str,
        files: &[(&str, u64)],
        progress: &mut dyn FnMut(String),
    ) -> Result<(), String> {
        let partial = self.root.join(format!(".{dir_name}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(|e| format!("creating {}: {e}", partial.display()))?;
        let started = std::time::Instant::now();
        let mut total = 0;
        for (file, size) in files {
            progress(format!("copying image {} from the control plane: {file}", image.name));
            let written = self.source.fetch(dir_name, file, &partial.join(file)).inspect_err(|_| {
                let _ = std::fs::remove_dir_all(&partial);
            })?;
            if *size != 0 && written < *size {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(format!("image {}: {file} came short ({written} of {size} bytes)", image.name));
            }
            total += written;
        }
        let dir = self.root.join(dir_name);
        std::fs::rename(&partial, &dir).map_err(|e| format!("renaming {}: {e}", partial.display()))?;
        progress(format!(
            "image {} copied here: {} MiB in {:.1} s",
            image.name,
            total >> 20,
            started.elapsed().as_secs_f64()
        ));
        Ok(())
    }

    /// Makes this host's warm snapshot of `local` in the background (once at a time).
    fn make_warm(self: &Arc<Self>, local: &Image, dir_name: &str, network: &Network) {
        if !self.warming.lock().unwrap_or_else(|p| p.into_inner()).insert(dir_name.to_string()) {
            return;
        }
        let (this, image, network, dir_name) =
            (Arc::clone(self), local.clone(), network.clone(), dir_name.to_string());
        let _ = std::thread::Builder::new().name(format!("warm-{}", image.name)).spawn(move || {
            let made: Result<WarmSnapshot, String> =
                this.driver.warm(&image, &network, &mut |_| {}).map_err(|e| e.to_string());
            match made.and_then(|warm| {
                let bytes = serde_json::to_vec(&warm).map_err(|e| e.to_string())?;
                let path = this.root.join(&dir_name).join("warm.json");
                std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))
            }) {
                Ok(()) => {
                    eprintln!("stratus agent: image {}: this host's warm snapshot is ready", image.name)
                }
                Err(e) => eprintln!("stratus agent: image {}: no warm snapshot here: {e}", image.name),
            }
            this.warming.lock().unwrap_or_else(|p| p.into_inner()).remove(&dir_name);
        });
    }
}

/// Image files from the control plane's `GET /agent/v1/images/DIR/FILE`, asked of each
/// replica in turn, as host `host` with its credential.
pub struct HttpImageSource {
    pub replicas: Vec<String>,
    pub host: String,
    pub credential: String,
}

impl ImageSource for HttpImageSource {
    fn fetch(&self, dir: &str, file: &str, dest: &Path) -> Result<u64, String> {
        let mut last = format!("no control plane to copy image {dir} from");
        let http = file_client();
        for url in &self.replicas {
            let response = http
                .get(&format!("{url}/agent/v1/images/{dir}/{file}"))
                .query("host", &self.host)
                .set("authorization", &format!("Bearer {}", self.credential))
                .call();
            let response = match response {
                Ok(response) => response,
                Err(ureq::Error::Status(code, response)) => {
                    let text = response.into_string().unwrap_or_default();
                    return Err(format!("the control plane refused {dir}/{file} ({code}): {}", text.trim()));
                }
                Err(e) => {
                    last = format!("copying {dir}/{file} from {url}: {e}");
                    continue;
                }
            };
            return save_file(response, &format!("{dir}/{file} from {url}"), dest);
        }
        Err(last)
    }
}

/// An HTTP client for copying image files: no limit on a whole copy (images can be large),
/// only on silences.
pub fn file_client() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout_read(Duration::from_secs(60))
        .build()
}

/// Writes the body of `response` (image file `what`, for messages) to `dest`, synced; its
/// length, which must be the response's `Content-Length` when it gives one.
pub fn save_file(response: ureq::Response, what: &str, dest: &Path) -> Result<u64, String> {
    let expected: Option<u64> = response.header("content-length").and_then(|v| v.parse().ok());
    let mut out = std::fs::File::create(dest).map_err(|e| format!("creating {}: {e}", dest.display()))?;
    let written =
        std::io::copy(&mut response.into_reader(), &mut out).map_err(|e| format!("copying {what}: {e}"))?;
    if expected.is_some_and(|expected| expected != written) {
        return Err(format!("copying {what}: {written} bytes of {expected:?}"));
    }
    out.sync_all().map_err(|e| format!("writing {}: {e}", dest.display()))?;
    Ok(written)
}
