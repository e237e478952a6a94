#!/bin/bash
# Slurm job of pod default/hooked (uid 5f0c8a9e-1d2b-4c3d-8e4f-123456789abc), rendered by hpk.
# What it writes into the pod folder, and when: the job script contract in docs/kubelet.md.

pod_dir=/home/alice/.hpk/pods/default/hooked
apptainer=/opt/hpk/tools/apptainer-1.4.3/bin/apptainer
python=/home/alice/hpk/.venv/bin/python
containers="$pod_dir/containers"

now() { date -u +%Y-%m-%dT%H:%M:%S.%NZ; }

# A container that started and has no exit marker when the job is stopped is marked killed
# (137). If its launcher outlives Slurm's KILL, it replaces the mark with the real code;
# ln never replaces a marker the launcher wrote first.
mark_killed() {
    local marker="$containers/$1/exit"
    [[ -e $containers/$1/started && ! -e $marker ]] || return 0
    printf '137 %s\n' "$2" >"$marker.trap" && ln -- "$marker.trap" "$marker" 2>/dev/null
    rm -f -- "$marker.trap"
}

# Mark the containers, pass TERM to their launchers, and wait for them.
stopped=0
stop() {
    ((stopped)) && return 0
    stopped=1
    local running at name
    running=$(jobs -pr)
    at=$(now)
    for name in proxy server worker; do
        mark_killed "$name" "$at"
    done
    [[ -z $running ]] || kill -TERM $running 2>/dev/null
    wait
}
# Node-local folders of this job (each container's /tmp and /var/tmp, memory emptyDirs),
# removed when it ends.
scratch_dirs=()
cleanup() {
    rm -rf -- "${scratch_dirs[@]}"
}
trap 'trap "" TERM INT; stop; exit 143' TERM
trap 'trap "" TERM INT; stop; exit 130' INT
trap 'stop; cleanup' EXIT

cd -- "$pod_dir" || exit 125
mkdir -p -- "$containers" volumes/work || exit 125

# Apptainer's options for this user on this node: --no-privs as root, --unsquash without FUSE,
# and the node's /etc/hosts (not on the pod network) and /etc/localtime, read-only.
options=$("$python" -I -m hpk.apptainer pod) || exit 125
read -r -a run_options <<<"$options"

# Each container's private /tmp and /var/tmp (Apptainer's --workdir) on the node's own disk,
# in a folder mktemp makes for this job: 0700 and the job user's, never one planted by
# another user. A container's folder keeps its files across its restarts.
scratch=$(mktemp -d -p "${TMPDIR:-/tmp}" "hpk-job-${SLURM_JOB_ID:-$$}.XXXXXX" 2>/dev/null ||
    mktemp -d -p /tmp "hpk-job-${SLURM_JOB_ID:-$$}.XXXXXX") || exit 125
scratch_dirs+=("$scratch")

# Without FUSE, Apptainer unpacks each container's image with unsquashfs, whose queues
# default to 256 MB each, in the job's memory: three containers starting at once took more
# than a 256 MB job has. Apptainer finds unsquashfs on PATH, so it finds one with 16 MB
# queues first (as fast for images of this size; the folder's name is no container's). It is
# a wrapper as Apptainer's unprivileged install writes them: with _WRAPPER_EXEC_CMD set,
# Apptainer learns the real program and its libraries through it.
if [[ " ${run_options[*]} " == *" --unsquash "* ]] && unsquashfs=$(command -v unsquashfs); then
    mkdir -m 0700 "$scratch/.unsquashfs" &&
        printf '#!/bin/bash\nif [[ -n ${_WRAPPER_EXEC_CMD:-} ]]; then exec $_WRAPPER_EXEC_CMD %q "$@"; fi\nexec %q -da 16 -fr 16 "$@"\n' \
            "$unsquashfs" "$unsquashfs" >"$scratch/.unsquashfs/unsquashfs" &&
        chmod 0700 "$scratch/.unsquashfs/unsquashfs" || exit 125
    PATH=$scratch/.unsquashfs:$PATH
fi

# A container's scratch folders (its launcher makes its folder in the pod's, with the
# termination handshake's files, when it starts it: a container that never starts has none).
prepare() {
    mkdir -p -- "$scratch/$1/tmp" "$scratch/$1/var_tmp" &&
        chmod 1777 -- "$scratch/$1/tmp" "$scratch/$1/var_tmp"
}
prepare proxy || exit 125
prepare server || exit 125
prepare worker || exit 125

# The next container starts once this one has started: a sidecar (an init container with
# restartPolicy Always, which runs on beside the containers), and a container with a
# postStart hook, which counts as started once its hook has passed. A container whose run
# ended (its postStart hook failed) lets the next one start, a sidecar does not.
sidecar_pids=()
await_started() {
    until [[ -e $containers/$1/started ]]; do
        kill -0 "$2" 2>/dev/null || return 0
        [[ -z ${3:-} || ! -e $containers/$1/exit ]] || return 0
        sleep 0.1
    done
}

# Init containers, one after another: the first that fails ends the job with its code.

# proxy: docker.io/library/busybox:latest (sidecar)
"$python" -I -m kubelet_py.job.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif --restart Always --grace 20 --hooks /home/alice/.hpk/pods/default/hooked/hooks/proxy --attach --termination /dev/termination-log "$containers"/proxy -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --contain --no-mount bind-paths,hostfs,cwd --writable-tmpfs --no-home --home /:/ --pid --pwd / \
    --workdir "$scratch"/proxy \
    --bind "$containers"/proxy/handshake:/.hpk-ready \
    --bind "$containers"/proxy/handshake.sh:/.singularity.d/env/00-hpk-ready.sh:ro \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif sleep 3600 &
sidecar_pids+=("$!")
await_started proxy "$!"

# Containers, side by side. The job's code is the first non-zero one, in the pod's order.
main_pids=()

# server: docker.io/library/busybox:latest
"$python" -I -m kubelet_py.job.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif --hooks /home/alice/.hpk/pods/default/hooked/hooks/server --attach --termination /dev/termination-log "$containers"/server -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --contain --no-mount bind-paths,hostfs,cwd --writable-tmpfs --no-home --home /:/ --pid --pwd / \
    --workdir "$scratch"/server \
    --bind "$containers"/server/handshake:/.hpk-ready \
    --bind "$containers"/server/handshake.sh:/.singularity.d/env/00-hpk-ready.sh:ro \
    --bind /home/alice/.hpk/pods/default/hooked/volumes/work:/work \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif httpd -f -p 8080 -h /work &
main_pids+=("$!")
await_started server "$!" ended

# worker: docker.io/library/busybox:latest
"$python" -I -m kubelet_py.job.launch --image /home/alice/.hpk/images/docker.io/library/busybox/latest.sif --hooks /home/alice/.hpk/pods/default/hooked/hooks/worker --attach --termination /dev/termination-log "$containers"/worker -- \
    "$apptainer" --quiet exec "${run_options[@]}" --cleanenv --no-eval --contain --no-mount bind-paths,hostfs,cwd --writable-tmpfs --no-home --home /:/ --pid --pwd / \
    --workdir "$scratch"/worker \
    --bind "$containers"/worker/handshake:/.hpk-ready \
    --bind "$containers"/worker/handshake.sh:/.singularity.d/env/00-hpk-ready.sh:ro \
    /home/alice/.hpk/images/docker.io/library/busybox/latest.sif sh -c 'wget -q -O - http://127.0.0.1:8080/; exec sleep 3600' &
main_pids+=("$!")

code=0
for pid in "${main_pids[@]}"; do
    wait "$pid"
    status=$?
    ((code != 0)) || code=$status
done

# The containers have ended: the sidecars get TERM, and KILL from their launchers after the
# grace period. Their codes do not count.
kill -TERM "${sidecar_pids[@]}" 2>/dev/null
wait "${sidecar_pids[@]}"
exit "$code"
