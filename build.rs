//! Generates the gRPC code from `proto/` with a vendored protoc, so no system protoc is needed.
//!
//! The API is two passes over the same file. The first makes the messages and the clients. The
//! second makes the servers only, on those messages, except that `Subscribe` streams
//! `crate::grpc::wire::EncodedNotification`: a `Notification` already encoded, so that
//! a notification going to many streams is encoded once, not once per stream. The bus's
//! wire format, which only instances speak to each other, is messages only.
//!
//! It also compresses the console's files (gzip, best level) once, here, so the service
//! sends a browser that accepts gzip about a third of the bytes without compressing at
//! run time.

use std::io::Write as _;
use std::path::Path;

/// The console's files the service embeds, where the repository keeps them: the page
/// as written, and the script and style as the console's bundler wrote them.
const CONSOLE_FILES: [&str; 3] = [
    "console/src/index.html",
    "console/dist/app.js",
    "console/dist/app.css",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script is single-threaded; prost-build reads PROTOC from the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["proto/restock/v1/restock.proto"];
    tonic_prost_build::configure()
        .build_server(false)
        .file_descriptor_set_path(out_dir.join("restock_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    let servers = out_dir.join("servers");
    std::fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_client(false)
        .out_dir(&servers)
        .extern_path(
            ".restock.v1.Notification",
            "crate::grpc::wire::EncodedNotification",
        )
        .extern_path(".restock.v1", "crate::grpc::proto")
        .compile_protos(&protos, &["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/restock/bus/v1/bus.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    compress_console(&out_dir.join("console"))?;
    Ok(())
}

/// Writes `<name>.gz` of each of [`CONSOLE_FILES`] into `dir`. The gzip header carries
/// no name and no time, so the same files always give the same bytes.
fn compress_console(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    for path in CONSOLE_FILES {
        println!("cargo:rerun-if-changed={path}");
        let bytes = std::fs::read(path)?;
        let name = Path::new(path).file_name().ok_or("a file name")?;
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(&bytes)?;
        let mut out = dir.join(name).into_os_string();
        out.push(".gz");
        std::fs::write(out, gzip.finish()?)?;
    }
    Ok(())
}
