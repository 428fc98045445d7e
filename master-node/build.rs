//! Compiles the etcd API subset used by the write benchmark (an example), with
//! a vendored protoc. The Master's own protocols are built by slap-proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=examples/etcd");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["examples/etcd/etcd_subset.proto"], &["examples/etcd"])?;
    Ok(())
}
