# Sourced by bench/remote.sh and bench/sync.sh: take ../shared/bench's two
# network namespaces for a run. `netns_take RATE` brings them up at RATE if
# they are down (and down again on exit), or reshapes them to RATE and
# restores their original rate and delay on exit. Then sets SSHCFG, SSH
# (OpenSSH with the harness's config) and KH (a known_hosts file in OUT_DIR
# for the harness's host key). Needs SHARED, S, RIP, OUT_DIR and die().
netns_take() {
    local rate=$1
    was_up=0 orig_rate= orig_delay=
    if ip netns list | grep -qw isrc; then
        [ -s "$S/net.env" ] || die "namespace isrc exists but $S/net.env is missing"
        was_up=1
        orig_rate=$(. "$S/net.env"; echo "$RATE") orig_delay=$(. "$S/net.env"; echo "$DELAY")
    fi
    trap netns_restore EXIT
    trap 'exit 130' INT TERM
    if [ "$was_up" = 0 ]; then
        RATE=$rate "$SHARED/netns.sh" up >&2 || die "netns.sh up failed"
    else
        RATE=$rate "$SHARED/netns.sh" shape >&2 || die "netns.sh shape $rate failed"
    fi
    SSHCFG=$S/ssh_config
    SSH="ssh -F $SSHCFG"
    KH=$OUT_DIR/known_hosts
    echo "$RIP $(cut -d' ' -f1,2 "$S/ssh_host_ed25519_key.pub")" >"$KH"
}

netns_restore() {
    if [ "$was_up" = 1 ]; then
        RATE=$orig_rate DELAY=$orig_delay "$SHARED/netns.sh" shape >&2
    elif ip netns list | grep -qw isrc; then
        "$SHARED/netns.sh" down >&2
    fi
}
