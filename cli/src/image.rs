//! `dormant image …`: the Linux guest's root filesystem images (KVM tier).
//!
//! ```text
//! dormant image build NAME                      a built-in image: base, coding
//! dormant image build NAME --packages "P1 P2"   base plus these Debian packages
//! dormant image build NAME --rootfs DIR|TAR     from a root filesystem (e.g. `docker export`'s tar)
//! dormant image list                            the images built into the cache
//! ```

use std::time::Instant;

use dormant::kvm::{BUILTIN_IMAGES, ImageSource, build_image_with_progress, list_images};
use dormant::{Error, Result};

pub const USAGE: &str = "image build NAME [--packages \"P1 P2 …\" | --rootfs DIR|TAR] | image list";

/// Runs `dormant image ARGS…`.
pub fn command(args: &[String]) -> Result<()> {
    match args {
        [cmd, name, rest @ ..] if cmd == "build" => {
            let source = match rest {
                [] => ImageSource::Builtin,
                [flag, list] if flag == "--packages" => {
                    ImageSource::Packages(list.split_whitespace().map(str::to_owned).collect())
                }
                [flag, path] if flag == "--rootfs" => ImageSource::Rootfs(path.into()),
                _ => return Err(usage()),
            };
            let t = Instant::now();
            eprintln!(
                "building image {name} (the first build of a Debian image takes a minute or two)"
            );
            let bar = crate::progress_bar::Bar::new();
            let disk = build_image_with_progress(name, &source, &bar);
            bar.finish();
            let disk = disk?;
            println!(
                "{}: {} ({}, {:.1} s)",
                disk.name,
                disk.path.display(),
                disk.fingerprint,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        [cmd] if cmd == "list" => {
            println!("minimal (busybox in the initramfs)");
            for d in list_images()? {
                let size = std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0);
                let builtin = if BUILTIN_IMAGES.contains(&d.name.as_str()) {
                    ", built-in"
                } else {
                    ""
                };
                println!(
                    "{} ({} MiB{builtin}): {}",
                    d.name,
                    size >> 20,
                    d.path.display()
                );
            }
            Ok(())
        }
        _ => Err(usage()),
    }
}

fn usage() -> Error {
    Error::InvalidArgument(format!("usage: dormant {USAGE}"))
}
