//! Every message a peer or a local client can send, decoded from
//! arbitrary bytes as the receiving node decodes it. Any panic, hang or
//! runaway allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_cluster::protocol::{BuildEvent, ExecEvent, Reply, Request};
use strata_daemon::wire::{FromDaemon, Greeting, Hello, ToDaemon};

fuzz_target!(|data: &[u8]| {
    let _ = strata_net::decode_frame::<Request>(data);
    let _ = strata_net::decode_frame::<Reply>(data);
    let _ = strata_net::decode_frame::<BuildEvent>(data);
    let _ = strata_net::decode_frame::<ExecEvent>(data);
    let _ = strata_daemon::wire::decode::<Hello>(data);
    let _ = strata_daemon::wire::decode::<Greeting>(data);
    let _ = strata_daemon::wire::decode::<ToDaemon>(data);
    let _ = strata_daemon::wire::decode::<FromDaemon>(data);
});
