//! Compiles `proto/trainmesh/**` with protox (pure Rust), so a fresh machine
//! builds with cargo alone. The descriptor set is also written to OUT_DIR for
//! server reflection.

use std::path::{Path, PathBuf};

fn protos(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read proto dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            protos(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    protos(&root.join("trainmesh"), &mut files);
    files.sort();
    println!(
        "cargo:rerun-if-changed={}",
        root.join("trainmesh").display()
    );
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }

    let fds = protox::compile(&files, [&root]).expect("compile protos");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let bytes = prost::Message::encode_to_vec(&fds);
    std::fs::write(out.join("trainmesh_descriptor.bin"), bytes).expect("write descriptor");

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(fds)
        .expect("generate code");
}
