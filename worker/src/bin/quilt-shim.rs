//! `quilt-shim`: the host-side parent of one long-running container's init.
//! The worker execs it with the init's pidfd, output pipe and hold pipe on
//! descriptors 3, 4 and 5; everything it does is in [`quilt::shim`].

fn main() {
    std::process::exit(quilt::shim::main_from_args())
}
