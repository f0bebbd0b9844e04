fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps `cargo build` working on a machine without protobuf-compiler.
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    // File data as `Bytes`: decoding slices the received buffer instead of copying it, and a
    // heal passes a block read from one brick on to another without a copy of its own.
    tonic_prost_build::configure()
        .bytes(".mortar.v1.ReadReply.data")
        .bytes(".mortar.v1.Write.data")
        .bytes(".mortar.v1.HealWrite.data")
        .bytes(".mortar.v1.HealEntry.data")
        .compile_protos(&["proto/mortar.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
