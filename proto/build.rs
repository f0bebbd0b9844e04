fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps `cargo build` working on a machine without protobuf-compiler.
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    tonic_prost_build::configure().compile_protos(&["proto/mortar.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
