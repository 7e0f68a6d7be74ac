# Shared by run.sh, test.sh and .ci/run: install what a fresh Debian machine lacks. Sourced.
export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=""

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing: ${missing[*]}"
  if [ "$(id -u)" != 0 ]; then echo "need root to apt-get install ${missing[*]}" >&2; return 1; fi
  [ -n "$APT_UPDATED" ] || { apt-get update -qq; APT_UPDATED=1; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

setup_build_deps() {
  # gcc for the C parts (libfvad via webrtc-vad), cmake for libopus (the opus crate's bundled source).
  # The offline default provider (`local`, cargo feature `local`): eSpeak NG and PocketSphinx with its
  # US English model, linked from the system.
  apt_install build-essential cmake pkg-config ca-certificates \
    libespeak-ng-dev libpocketsphinx-dev libsphinxbase-dev pocketsphinx-en-us
  if ! command -v cargo >/dev/null 2>&1; then
    echo "no Rust toolchain: install Rust >= 1.88 (rustup) and run this again" >&2
    return 1
  fi
}

setup_test_deps() {
  # coturn: the TURN relay tests (tests/turn_relay.rs); iproute2: `ip netns` for the network-change test.
  apt_install redis-server postgresql procps chromium coturn iproute2
  # tests/neko_protocol.rs: a Python N.E.K.O. client (websockets) speaking eSpeak NG speech.
  apt_install espeak-ng python3-websockets
  # tests/whip_gstreamer.rs: Debian's GStreamer WHIP publisher (webrtcbin, libnice, opus, wavparse).
  apt_install simple-whip-client gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
    gstreamer1.0-plugins-bad gstreamer1.0-nice
  # Node for the browser tests: the machine's own when present, else Debian's.
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  # puppeteer-core drives the installed Chromium: it never downloads a browser.
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
  setup_pgvector
}

# tests/memory.rs stores embeddings with pgvector on Postgres. Debian bookworm ships no binary
# package of it for PostgreSQL 15: take postgresql-<v>-pgvector where the distribution has it,
# else build Debian's own pgvector source package (from the next release's source index, on the
# machine's configured mirror) against the installed server.
setup_pgvector() {
  local v; v="$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -1)"
  [ -n "$v" ] || return 0
  [ -f "/usr/share/postgresql/$v/extension/vector.control" ] && return 0
  if [ "$(id -u)" != 0 ]; then echo "warning: pgvector missing; the memory test on Postgres will fail" >&2; return 0; fi
  [ -n "$APT_UPDATED" ] || { apt-get update -qq; APT_UPDATED=1; }
  if apt-cache show "postgresql-$v-pgvector" >/dev/null 2>&1; then
    apt_install "postgresql-$v-pgvector"
    return
  fi
  apt_install "postgresql-server-dev-$v" dpkg-dev make gcc
  local uri; uri="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
  [ -n "$uri" ] || uri="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
  [ -n "$uri" ] || { echo "warning: no Debian mirror configured; pgvector not built" >&2; return 0; }
  local list=/etc/apt/sources.list.d/kotodama-pgvector-src.sources dir; dir="$(mktemp -d)"
  printf 'Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" >"$list"
  echo "building pgvector for PostgreSQL $v from Debian's source package"
  if apt-get update -qq && (cd "$dir" && apt-get source --download-only pgvector >/dev/null 2>&1 \
      && tar xzf pgvector_*.orig.tar.gz && cd pgvector-*/ \
      && make -s OPTFLAGS="" PG_CONFIG="/usr/lib/postgresql/$v/bin/pg_config" >/dev/null \
      && make -s install PG_CONFIG="/usr/lib/postgresql/$v/bin/pg_config" >/dev/null); then
    echo "pgvector installed"
  else
    echo "warning: building pgvector failed; the memory test on Postgres will fail" >&2
  fi
  rm -f "$list"; rm -rf "$dir"
}

# The `vector` extension in the test database (the server also creates it, as a superuser, in
# the databases it uses when memory.embeddings is set).
enable_pgvector() {
  psql -h 127.0.0.1 -U postgres -d test -Atqc 'CREATE EXTENSION IF NOT EXISTS vector' >/dev/null 2>&1 \
    || echo "warning: CREATE EXTENSION vector failed in the test database" >&2
}

start_services() {
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/kotodama-test.log
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    echo "starting postgresql"
    local v; v="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)"
    if [ -n "$v" ]; then
      pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    fi
  fi
  for _ in $(seq 1 50); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "warning: redis or postgresql did not come up (only the storage tests need them)" >&2
}

# The storage tests connect as postgres@127.0.0.1 to the database `test` (trust auth on loopback,
# as on the CI and developer machines) and create a fresh database per run inside it. A stock
# Debian cluster asks for a password on TCP: allow loopback trust once, and create `test`.
setup_test_database() {
  psql -h 127.0.0.1 -U postgres -d test -Atc 'select 1' >/dev/null 2>&1 && { enable_pgvector; return 0; }
  if [ "$(id -u)" != 0 ]; then
    echo "warning: postgres@127.0.0.1/test unreachable; the Postgres tests will fail" >&2
    return 0
  fi
  local hba; hba="$(ls /etc/postgresql/*/main/pg_hba.conf 2>/dev/null | sort -V | tail -1 || true)"
  if [ -n "$hba" ] && ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    echo "allowing trust auth for postgres on 127.0.0.1 (test machine)"
    sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    local v; v="$(basename "$(dirname "$(dirname "$hba")")")"
    pg_ctlcluster --skip-systemctl-redirect "$v" main reload || true
    sleep 1
  fi
  su postgres -c "psql -Atc \"select 1 from pg_database where datname='test'\"" 2>/dev/null | grep -q 1 \
    || su postgres -c "createdb test" || true
  enable_pgvector
}
