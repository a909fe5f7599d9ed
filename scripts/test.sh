#!/usr/bin/env bash
# The project's test command (README): every crate's tests, the book's examples, and, when a
# Vulkan driver is present (lavapipe in CI), the wgpu parity tests in the same build.
#   KOSMOS_REQUIRE_WGPU=1  fail instead of skipping wgpu when no Vulkan driver is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

features=()
if ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1; then
    export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
    features=(--features kosmos-core/wgpu)
elif [ "${KOSMOS_REQUIRE_WGPU:-0}" = 1 ]; then
    echo "no Vulkan driver found (install mesa-vulkan-drivers libvulkan1)" >&2
    exit 1
else
    echo "note: no Vulkan driver found; skipping the wgpu tests" >&2
fi

# `cargo test` also builds every example; running the built binaries avoids a second build with
# another feature set.
cargo test --workspace "${features[@]}"

# The book's examples are run (they are included in its chapters).
for example in decoder backend_task vision kosmos2 generate data train lora shapes; do
    "${CARGO_TARGET_DIR:-target}/debug/examples/$example"
done
