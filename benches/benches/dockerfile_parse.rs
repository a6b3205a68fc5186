//! Frontend throughput on a large generated Dockerfile: 10 000 instructions
//! over 20 stages, with continuations, heredocs, flags and expansions.
//!
//! Baseline in the same run: splitting the same bytes into lines, the least
//! any parser must do. `cargo bench -p strata-benches --bench dockerfile_parse`
//! prints MiB/s for each.

// A benchmark whose input does not parse must stop loudly.
#![allow(clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use strata_dockerfile::{Dockerfile, Platform, predefined_args};

fn generate(instructions: usize) -> String {
    let mut s = String::from(
        "# syntax=docker/dockerfile:1\nARG BASE=debian:bookworm\nARG DIR=/srv\nFROM busybox AS tools\n",
    );
    for i in 0..instructions {
        if i % 500 == 0 {
            s.push_str(&format!("FROM ${{BASE}} AS stage{}\n", i / 500));
        }
        match i % 8 {
            0 => s.push_str(&format!(
                "RUN apt-get update && \\\n    apt-get install -y --no-install-recommends pkg{i} && \\\n    rm -rf /var/lib/apt/lists/*\n"
            )),
            1 => s.push_str(&format!("ENV VAR_{i}=\"value {i}\" PATH=/opt/{i}/bin:$PATH\n")),
            2 => s.push_str(&format!(
                "COPY --from=tools --chown=app:app --chmod=0755 /src/{i} ${{DIR}}/{i}/\n"
            )),
            3 => s.push_str(&format!("RUN <<EOF\nset -e\necho building {i}\nmake -j$(nproc) target{i}\nEOF\n")),
            4 => s.push_str(&format!("WORKDIR ${{HOME:-/root}}/w{i}\n")),
            5 => s.push_str(&format!("LABEL org.example.n{i}=\"x y\" build.id=${{VAR_{i}:+set}}\n")),
            6 => s.push_str(&format!(
                "RUN --mount=type=cache,target=/root/.cache,id=c{i} --network=none [\"sh\", \"-c\", \"echo {i}\"]\n"
            )),
            _ => s.push_str(&format!("ARG A{i}=${{DIR%/*}}/${{BASE##*:}}\n")),
        }
    }
    s.push_str("CMD [\"/app\"]\n");
    s
}

fn bench(c: &mut Criterion) {
    let text = generate(10_000);
    let bytes = text.as_bytes();
    let mut group = c.benchmark_group("dockerfile");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("baseline: split lines", |b| {
        b.iter(|| black_box(bytes).split(|&c| c == b'\n').count())
    });
    group.bench_function("parse (syntax tree)", |b| {
        b.iter(|| strata_dockerfile::parse(black_box(bytes)).map(|a| a.nodes.len()))
    });
    group.bench_function("parse + typed stages", |b| {
        b.iter(|| Dockerfile::parse(black_box(bytes)).map(|d| d.stages.len()))
    });
    let host = Platform::host();
    let predefined = predefined_args(&host, &host, None);
    let df = match Dockerfile::parse(bytes) {
        Ok(df) => df,
        Err(e) => panic!("generated Dockerfile does not parse: {e}"),
    };
    let args = BTreeMap::new();
    if let Err(e) = df.check(&args, &predefined, None) {
        panic!("generated Dockerfile does not check: {e}");
    }
    group.bench_function("check (expand every instruction)", |b| {
        b.iter(|| df.check(&args, &predefined, None).map(|g| g.order.len()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
