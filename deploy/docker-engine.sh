# Sourced by deploy/ scripts: makes sure a Docker engine answers, installing
# Debian's docker.io (and docker-compose, busybox-static) and starting
# dockerd when needed. Idempotent.
ensure_docker() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "deploy: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
  fi
  if ! docker info >/dev/null 2>&1; then
    echo "deploy: starting dockerd (log: /var/log/dockerd.log)"
    # Its own session: the engine outlives the script that started it.
    setsid nohup dockerd >/var/log/dockerd.log 2>&1 </dev/null &
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
    echo "deploy: dockerd did not start; see /var/log/dockerd.log" >&2
    return 1
  fi
}
