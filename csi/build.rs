fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc (and its bundled google/protobuf includes) keeps `cargo build`
    // working on machines without protobuf-compiler.
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let include = protoc_bin_vendored::include_path()?;
    let include = include.to_str().ok_or("protoc include path is not UTF-8")?;
    tonic_prost_build::configure()
        .compile_protos(&["../proto/csi/csi.proto"], &["../proto/csi", include])?;
    println!("cargo:rerun-if-changed=../proto/csi");
    Ok(())
}
