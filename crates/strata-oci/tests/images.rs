//! The image store with real blobs: create, name, export, import back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use strata_cas::{ContentStore, MetaDb};
use strata_oci::{
    Compression, ImageConfig, ImageStore, ImportFormat, LayerRef, Reference, export_docker_archive,
    export_oci, import,
};

fn layer_tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn setup() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(ContentStore::open(&dir.path().join("content")).unwrap());
    let meta = MetaDb::open(&dir.path().join("meta"), ImageStore::COLUMN_FAMILIES).unwrap();
    let store = ImageStore::open(meta, cas).unwrap();
    (dir, store)
}

fn sample(store: &ImageStore) -> strata_oci::Image {
    let cas = store.content();
    let mut layers = Vec::new();
    for files in [&[("a", "one")][..], &[("b", "two"), ("c", "three")][..]] {
        let bytes = layer_tar(files);
        let blob = cas.put(&bytes).unwrap();
        let info = cas.info(&blob).unwrap().unwrap();
        layers.push(LayerRef {
            blob,
            diff_id: info.sha256,
            size: info.size,
        });
    }
    let mut config = ImageConfig::scratch("linux", "amd64", None);
    config.config.cmd = Some(vec!["/a".into()]);
    config.rootfs.diff_ids = layers.iter().map(|l| l.diff_id.to_string()).collect();
    store.create(&config, &layers).unwrap()
}

#[test]
fn name_get_list_untag() {
    let (_d, store) = setup();
    let image = sample(&store);
    let name: Reference = "myapp:1".parse().unwrap();
    store.tag(&name, &image).unwrap();
    let got = store.get("docker.io/library/myapp:1").unwrap().unwrap();
    assert_eq!(got.image, image);
    assert_eq!(
        store.get(&image.id.hex()[..12]).unwrap().unwrap().image.id,
        image.id
    );
    assert!(store.get("other").unwrap().is_none());
    assert_eq!(store.list().unwrap().len(), 1);
    assert!(store.untag(&name).unwrap());
    assert!(store.get("myapp:1").unwrap().is_none());
}

#[test]
fn oci_layout_and_docker_archive_round_trip() {
    let (dir, store) = setup();
    let image = sample(&store);
    let name: Reference = "round/trip:v1".parse().unwrap();
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let out = dir.path().join(format!("oci-{compression:?}.tar"));
        export_oci(
            store.content(),
            &image,
            Some(&name),
            &out,
            true,
            compression,
        )
        .unwrap();
        let (back, format) =
            import(&store, &out, &dir.path().join("tmp"), "linux", "amd64").unwrap();
        assert_eq!(format, ImportFormat::OciLayout);
        assert_eq!(back.id, image.id, "the config is kept byte for byte");
        assert_eq!(back.layers, image.layers);
        assert_eq!(back.manifest_digest, image.manifest_digest);
    }
    let dir_out = dir.path().join("oci-dir");
    export_oci(
        store.content(),
        &image,
        None,
        &dir_out,
        false,
        Compression::Gzip,
    )
    .unwrap();
    assert!(dir_out.join("oci-layout").is_file());
    assert_eq!(
        import(&store, &dir_out, dir.path(), "linux", "amd64")
            .unwrap()
            .0
            .id,
        image.id
    );

    let archive = dir.path().join("docker.tar");
    export_docker_archive(store.content(), &image, &[name], &archive).unwrap();
    let (back, format) =
        import(&store, &archive, &dir.path().join("tmp"), "linux", "amd64").unwrap();
    assert_eq!(format, ImportFormat::DockerArchive);
    assert_eq!(back.id, image.id);
}

#[test]
fn rootfs_tar_becomes_a_one_layer_image() {
    let (dir, store) = setup();
    let path = dir.path().join("rootfs.tar.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(
        &mut gz,
        &layer_tar(&[("bin/sh", "#!"), ("etc/passwd", "root")]),
    )
    .unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    let (image, format) = import(&store, &path, dir.path(), "linux", "amd64").unwrap();
    assert_eq!(format, ImportFormat::RootfsTar);
    assert_eq!(image.layers.len(), 1);
    assert_eq!(
        image.config.rootfs.diff_ids,
        [image.layers[0].diff_id.to_string()]
    );
    assert_eq!(image.config.os, "linux");
}

#[test]
fn tampered_archive_is_refused() {
    let (dir, store) = setup();
    let image = sample(&store);
    let out = dir.path().join("layout");
    export_oci(
        store.content(),
        &image,
        None,
        &out,
        false,
        Compression::None,
    )
    .unwrap();
    let blob = out.join("blobs/sha256").join(image.layers[0].diff_id.hex());
    std::fs::write(&blob, layer_tar(&[("a", "evil")])).unwrap();
    let err = import(&store, &out, dir.path(), "linux", "amd64").unwrap_err();
    assert!(err.to_string().contains("hashes to"), "{err}");
}

#[test]
fn an_image_read_before_is_read_again_once_a_blob_it_names_is_gone() {
    let (_d, store) = setup();
    let image = sample(&store);
    assert_eq!(store.load(&image.manifest_blob).unwrap(), image);
    assert_eq!(store.load(&image.manifest_blob).unwrap(), image, "as read");
    // A layer pruned since: the image is no longer whole, and says so.
    store.content().delete(&image.layers[1].blob).unwrap();
    let err = store.load(&image.manifest_blob).unwrap_err().to_string();
    assert!(err.contains("is missing"), "{err}");
}
