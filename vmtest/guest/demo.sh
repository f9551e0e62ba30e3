#!/usr/bin/env bash
# Inside the VM (scripts/demo): two namespaces with ESP SAs, the C watch
# example printing events of namespace b as text and the Rust one as JSON,
# while UDP traffic crosses a legacy SA and an ESN SA.
set -euo pipefail
cd "$(dirname "$0")/../.."

vmtest/guest/net-setup.sh >/dev/null
echo "demo: namespaces a (10.9.0.1) and b (10.9.0.2) with ESP SAs; watching b"
target/ctest/watch --netns /run/netns/b --seconds 7 | sed 's/^/[C watch]    /' &
target/release/examples/watch --json --netns /run/netns/b --seconds 7 | sed 's/^/[Rust watch] /' &
sleep 1.5
echo "demo: 8 packets a -> b on legacy SA 0x1001 (replay threshold 2: an event every 2 packets)"
target/vmtest/udp-send --netns /run/netns/a 10.9.0.2 9001 8 64 100 2>/dev/null
echo "demo: 6 packets a -> b on ESN SA 0x2001"
target/vmtest/udp-send --netns /run/netns/a 10.9.0.2 9002 6 200 100 2>/dev/null
wait
echo "demo: the kernel's view (ip -s xfrm state, namespace b, SPI 0x1001):"
ip -n b -s xfrm state get src 10.9.0.1 dst 10.9.0.2 proto esp spi 0x1001 | sed -n '/anti-replay/p;/lifetime current/,+1p'
