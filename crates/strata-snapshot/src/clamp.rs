//! Clamping a layer's times: `SOURCE_DATE_EPOCH` for files.
//!
//! A reproducible image needs the same bytes from two builds run at
//! different times, on different machines, from checkouts made at
//! different times. Steps write layers with the times their files have;
//! [`clamp_times`] then copies a layer with every time later than the
//! epoch set to it (the reproducible-builds "clamp": earlier times carry
//! information and are kept). Everything else of every entry is kept
//! byte for byte: names (GNU long names included), owners, modes,
//! extended attributes, link targets and contents.

use std::io::{self, Read, Write};

use tar::{Archive, EntryType, Header, PaxExtensions};

use crate::error::{Error, Result};

/// The largest PAX extended header read into memory (names, link targets
/// and extended attributes of one entry).
const MAX_PAX_BYTES: u64 = 1 << 20;

const BLOCK: usize = 512;

/// PAX records holding times.
const PAX_TIMES: [&str; 3] = ["mtime", "atime", "ctime"];

/// Copies the layer tar `input` to `out` with no time later than `epoch`
/// (seconds since the Unix epoch): header times, GNU access and change
/// times, and PAX `mtime`/`atime`/`ctime` records. Returns how many
/// headers it changed. A layer it cannot copy faithfully (GNU sparse
/// files, a PAX `size` that the header does not repeat) is refused.
pub fn clamp_times(input: impl Read, mut out: impl Write, epoch: i64) -> Result<u64> {
    let limit = u64::try_from(epoch).unwrap_or(0);
    let mut archive = Archive::new(input);
    let entries = archive.entries().map_err(tar_err)?.raw(true);
    let mut changed = 0u64;
    // The PAX `size` the next entry must have, when its PAX header gave one.
    let mut pax_size: Option<u64> = None;
    for entry in entries {
        let mut entry = entry.map_err(tar_err)?;
        let mut header = entry.header().clone();
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = header.entry_type();
        if kind.is_gnu_sparse() {
            return Err(Error::Unsafe {
                entry: name,
                reason: "GNU sparse entries cannot have their times clamped".into(),
            });
        }
        let size = header.entry_size().map_err(tar_err)?;
        if kind.is_pax_local_extensions() || kind.is_pax_global_extensions() {
            if size > MAX_PAX_BYTES {
                return Err(Error::Unsafe {
                    entry: name,
                    reason: format!(
                        "a PAX header of {size} bytes (at most {MAX_PAX_BYTES} are read)"
                    ),
                });
            }
            let mut records = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            entry.read_to_end(&mut records).map_err(tar_err)?;
            let (rewritten, size_record) = clamp_pax(&records, limit, &name)?;
            if kind.is_pax_local_extensions() {
                pax_size = size_record;
            }
            if rewritten != records {
                header.set_size(rewritten.len() as u64);
                changed += 1;
            }
            header.set_cksum();
            write_entry(&mut out, &header, &mut rewritten.as_slice(), &name)?;
            continue;
        }
        let extension = matches!(kind, EntryType::GNULongName | EntryType::GNULongLink);
        if !extension
            && let Some(expected) = pax_size.take()
            && expected != size
        {
            return Err(Error::Unsafe {
                entry: name,
                reason: format!("its PAX header gives size {expected} but its tar header {size}"),
            });
        }
        if clamp_header(&mut header, limit) {
            changed += 1;
        }
        header.set_cksum();
        write_entry(&mut out, &header, &mut entry, &name)?;
    }
    out.write_all(&[0u8; 2 * BLOCK])
        .map_err(|source| write_err("(end of archive)", source))?;
    out.flush()
        .map_err(|source| write_err("(end of archive)", source))?;
    Ok(changed)
}

/// Clamps a header's own time fields; true when one changed.
fn clamp_header(header: &mut Header, limit: u64) -> bool {
    let mut changed = false;
    if header.mtime().is_ok_and(|t| t > limit) {
        header.set_mtime(limit);
        changed = true;
    }
    if let Some(gnu) = header.as_gnu_mut() {
        if gnu.atime().is_ok_and(|t| t > limit) {
            gnu.set_atime(limit);
            changed = true;
        }
        if gnu.ctime().is_ok_and(|t| t > limit) {
            gnu.set_ctime(limit);
            changed = true;
        }
    }
    changed
}

/// PAX records with their times clamped, and the `size` record if any.
fn clamp_pax(records: &[u8], limit: u64, name: &str) -> Result<(Vec<u8>, Option<u64>)> {
    let mut out = Vec::with_capacity(records.len());
    let mut size = None;
    for record in PaxExtensions::new(records) {
        let record = record.map_err(|e| Error::Unsafe {
            entry: name.to_string(),
            reason: format!("a malformed PAX record: {e}"),
        })?;
        let key = record.key_bytes();
        let value = record.value_bytes();
        if key == b"size" {
            size = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<u64>().ok());
        }
        let later = PAX_TIMES.iter().any(|k| k.as_bytes() == key) && pax_time_after(value, limit);
        let limit_text = limit.to_string();
        let value = if later { limit_text.as_bytes() } else { value };
        push_record(&mut out, key, value);
    }
    Ok((out, size))
}

/// Whether a PAX time (`1700000000`, `1700000000.25`, `-5`) is after
/// `limit`; one that does not parse is left alone.
fn pax_time_after(value: &[u8], limit: u64) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    match whole.parse::<i128>() {
        Ok(w) => {
            let w_after = w > i128::from(limit);
            let equal_with_fraction = w == i128::from(limit) && fraction.bytes().any(|b| b != b'0');
            w_after || equal_with_fraction
        }
        Err(_) => false,
    }
}

/// Appends one PAX record: `LEN KEY=VALUE\n`, LEN counting itself.
fn push_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Writes a header and exactly the data it announces, padded to a block.
fn write_entry(
    out: &mut impl Write,
    header: &Header,
    data: &mut dyn Read,
    name: &str,
) -> Result<()> {
    let size = header.entry_size().map_err(tar_err)?;
    out.write_all(header.as_bytes())
        .map_err(|source| write_err(name, source))?;
    let copied = io::copy(&mut data.take(size), out).map_err(|source| write_err(name, source))?;
    if copied != size {
        return Err(Error::Tar(format!(
            "entry {name} is cut short: {copied} of {size} bytes"
        )));
    }
    let pad = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
    out.write_all(&[0u8; BLOCK][..pad])
        .map_err(|source| write_err(name, source))
}

fn tar_err(e: io::Error) -> Error {
    Error::Tar(e.to_string())
}

fn write_err(entry: &str, source: io::Error) -> Error {
    Error::Write {
        entry: entry.to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(b: &mut tar::Builder<Vec<u8>>, path: &str, mtime: u64, data: &[u8]) {
        let mut h = Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_size(data.len() as u64);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    /// A tar of one file `f` holding `x`, dated `mtime`, after a PAX
    /// header of `records`.
    fn with_pax(records: &[u8], mtime: u64) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut pax = Header::new_ustar();
        pax.set_entry_type(EntryType::XHeader);
        pax.set_size(records.len() as u64);
        pax.set_path("PaxHeaders/f").unwrap();
        pax.set_cksum();
        b.append(&pax, records).unwrap();
        entry(&mut b, "f", mtime, b"x");
        b.into_inner().unwrap()
    }

    fn times(tar: &[u8]) -> Vec<(String, u64)> {
        let mut a = Archive::new(tar);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn later_times_are_clamped_and_earlier_ones_kept() {
        let mut b = tar::Builder::new(Vec::new());
        entry(&mut b, "old", 1_000, b"kept");
        entry(&mut b, "new", 2_000_000_000, b"clamped");
        let long = format!("{}/file", "d".repeat(300));
        entry(&mut b, &long, 1_900_000_000, b"long name");
        let tar = b.into_inner().unwrap();

        let mut out = Vec::new();
        assert_eq!(
            clamp_times(tar.as_slice(), &mut out, 1_500_000_000).unwrap(),
            2
        );
        assert_eq!(
            times(&out),
            [
                ("old".to_string(), 1_000),
                ("new".to_string(), 1_500_000_000),
                (long.clone(), 1_500_000_000)
            ]
        );
        let mut a = Archive::new(out.as_slice());
        let contents: Vec<String> = a
            .entries()
            .unwrap()
            .map(|e| {
                let mut s = String::new();
                e.unwrap().read_to_string(&mut s).unwrap();
                s
            })
            .collect();
        assert_eq!(contents, ["kept", "clamped", "long name"]);

        // Clamping what is already clamped changes nothing, byte for byte.
        let mut again = Vec::new();
        assert_eq!(
            clamp_times(out.as_slice(), &mut again, 1_500_000_000).unwrap(),
            0
        );
        assert_eq!(again, out);
    }

    #[test]
    fn pax_times_are_clamped_and_other_records_kept() {
        let mut records = Vec::new();
        push_record(&mut records, b"mtime", b"2000000000.123456789");
        push_record(&mut records, b"atime", b"1000.5");
        push_record(&mut records, b"SCHILY.xattr.user.k", b"v");
        let tar = with_pax(&records, 2_000_000_000);

        let mut out = Vec::new();
        clamp_times(tar.as_slice(), &mut out, 1_500_000_000).unwrap();
        let mut a = Archive::new(out.as_slice());
        let mut entries = a.entries().unwrap();
        let mut f = entries.next().unwrap().unwrap();
        let pax: Vec<(String, String)> = f
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (r.key().unwrap().to_string(), r.value().unwrap().to_string())
            })
            .collect();
        assert_eq!(
            pax,
            [
                ("mtime".to_string(), "1500000000".to_string()),
                ("atime".to_string(), "1000.5".to_string()),
                ("SCHILY.xattr.user.k".to_string(), "v".to_string()),
            ]
        );
        assert_eq!(f.header().mtime().unwrap(), 1_500_000_000);
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "x");
    }

    #[test]
    fn a_pax_size_the_header_does_not_repeat_is_refused() {
        let mut records = Vec::new();
        push_record(&mut records, b"size", b"999");
        let tar = with_pax(&records, 5);
        let e = clamp_times(tar.as_slice(), Vec::new(), 0).unwrap_err();
        assert!(e.to_string().contains("PAX header gives size 999"), "{e}");
    }

    #[test]
    fn record_lengths_count_themselves() {
        for n in [0, 1, 4, 5, 90, 95, 96, 995, 1000] {
            let mut out = Vec::new();
            push_record(&mut out, b"k", "v".repeat(n).as_bytes());
            let (len, _) = std::str::from_utf8(&out).unwrap().split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), out.len(), "{n}");
        }
    }

    #[test]
    fn a_truncated_layer_is_an_error_not_a_shorter_layer() {
        let mut b = tar::Builder::new(Vec::new());
        entry(&mut b, "f", 5, &[7u8; 4096]);
        let tar = b.into_inner().unwrap();
        let mut out = Vec::new();
        assert!(clamp_times(&tar[..2048], &mut out, 0).is_err());
    }
}
