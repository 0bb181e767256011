# Sourced by scripts/test and scripts/demo: makes sure what they need is installed.
# On a fresh Debian machine with only Rust, the one thing missing is nats-server; as root we
# install Debian's package, otherwise we say how.

ensure_nats_server() {
    if command -v nats-server >/dev/null 2>&1; then
        return 0
    fi
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> nats-server is missing: installing Debian's package (apt-get install nats-server)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq nats-server >/dev/null
        command -v nats-server >/dev/null 2>&1 && return 0
    fi
    cat >&2 <<'MSG'
nats-server is not installed, and this script can only install it as root on Debian.
Install it yourself, then run this again:
    sudo apt-get install nats-server        # Debian/Ubuntu (2.9.x is fine)
or put a nats-server binary (https://github.com/nats-io/nats-server/releases) on your PATH.
MSG
    exit 1
}

# Starts a private nats-server with JetStream on a free loopback port, its store in "$1".
# Sets NATS_SERVER_PID and NATS_DEMO_URL.
start_private_nats_server() {
    local dir=$1
    mkdir -p "$dir/js" "$dir/ports"
    nats-server -a 127.0.0.1 -p -1 -js -sd "$dir/js" --ports_file_dir "$dir/ports" \
        >"$dir/nats-server.log" 2>&1 &
    NATS_SERVER_PID=$!
    local ports="$dir/ports/nats-server_${NATS_SERVER_PID}.ports" i
    for i in $(seq 1 200); do
        if [ -s "$ports" ]; then
            NATS_DEMO_URL=$(sed -n 's/.*"nats":\["\([^"]*\)".*/\1/p' "$ports")
            [ -n "$NATS_DEMO_URL" ] && return 0
        fi
        if ! kill -0 "$NATS_SERVER_PID" 2>/dev/null; then
            echo "nats-server did not start:" >&2
            cat "$dir/nats-server.log" >&2
            exit 1
        fi
        sleep 0.05
    done
    echo "nats-server did not report its port within 10 s" >&2
    exit 1
}
