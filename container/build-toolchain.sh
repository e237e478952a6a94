#!/usr/bin/env bash
# Builds hpk's pinned toolchain into a tool folder keyed by the versions in versions.env.
#
#   bash container/build-toolchain.sh          build what is missing
#   bash container/build-toolchain.sh --print-dir   print the tool folder and exit
#   bash container/build-toolchain.sh --part-version FOLDER PIN   a local part's version
#
# Parts: Debian packages, etcd, kube-apiserver + kube-controller-manager + kubectl, kube-proxy,
# CoreDNS, the pod network's tunnel (hpk-tunnel), the kubelet API's front (hpk-kubelet-api),
# Apptainer (unprivileged, without setuid), Argo Workflows (binaries and install manifests),
# metrics-server, MinIO, Kubernetes' e2e.test and agnhost. Each Go part installs into
# <tools>/<name>-<version>/bin and is marked complete only when its build succeeded,
# so a second run finds everything in place and takes seconds.
#
# Environment:
#   HPK_TOOLS_DIR   the tool folder (default /var/cache/hpk-tools for root,
#                   ~/.cache/hpk-tools otherwise)
#   HPK_SKIP_APT=1  do not install Debian packages (fail if they are missing)
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

if [[ -n ${HPK_TOOLS_DIR:-} ]]; then
    tools=$HPK_TOOLS_DIR
elif [[ $(id -u) == 0 ]]; then
    tools=/var/cache/hpk-tools
else
    tools=${XDG_CACHE_HOME:-$HOME/.cache}/hpk-tools
fi
if [[ ${1:-} == --print-dir ]]; then
    echo "$tools"
    exit 0
fi

# A part built from this checkout's container/<folder> (hpk-tunnel, hpk-kubelet-api): its
# version is the pin of the module it is built on and a hash of its source, so that a change
# of source builds it again (hpk.toolchain.part_version computes the same).
local_version() {
    local folder=$1 pin=$2 files
    files=$(cd "$here/$folder" && printf '%s\n' go.mod go.sum ./*.go | sed 's|^\./||' | LC_ALL=C sort -u)
    # shellcheck disable=SC2086 (one name per line, none with a space)
    echo "$pin-$(cd "$here/$folder" && cat $files | sha256sum | cut -c1-12)"
}
if [[ ${1:-} == --part-version ]]; then
    local_version "$2" "$3"
    exit 0
fi
mkdir -p "$tools/src" "$tools/logs"
chmod 755 "$tools"
log=$tools/logs/build-$(date +%Y%m%d-%H%M%S).log
: >"$log"

say() { printf '[toolchain] %s\n' "$*"; }

current_part=""
on_error() {
    [[ $BASHPID == "$$" ]] || return 0 # report once, from the top-level shell
    say "FAILED: part '$current_part' did not build. The last lines of its log:"
    tail -n 25 "$log" | sed 's/^/    | /'
    say "full log: $log"
    [[ -z $proxy_problem ]] || say "likely cause: $proxy_problem"
}
trap on_error ERR

# part NAME VERSION FUNCTION: run FUNCTION unless NAME-VERSION is already complete.
part() {
    local name=$1 version=$2 fn=$3
    local dest=$tools/$name-$version
    current_part="$name $version"
    if [[ -f $dest/.complete ]]; then
        say "$name $version: cached in $dest"
        return 0
    fi
    say "$name $version: building (log: $log)"
    local start=$SECONDS
    rm -rf "$dest"
    mkdir -p "$dest/bin"
    echo "=== $name $version" >>"$log"
    ("$fn" "$dest" "$version") >>"$log" 2>&1
    date -u +%FT%TZ >"$dest/.complete"
    say "$name $version: done in $((SECONDS - start)) s"
}

# --- Debian packages -------------------------------------------------------------------
debian_packages=(
    # the Slurm test bed
    slurm-wlm slurmdbd munge mariadb-server
    # Apptainer: build dependencies and the helpers it runs unprivileged
    build-essential pkg-config libseccomp-dev libtalloc-dev libattr1-dev libprotobuf-c-dev
    libsubid-dev fakeroot cryptsetup uidmap squashfs-tools squashfuse fuse2fs
    # test images and DNS checks
    debootstrap busybox-static bind9-dnsutils
    # a pod's own network namespace (kubelet_py/job/netns.py): ip, unshare and nsenter;
    # its egress, the pod network's benchmark and tests, and kube-proxy's rules
    iproute2 util-linux slirp4netns iperf3 nftables iptables
)

install_debian_packages() {
    current_part="Debian packages"
    local missing=()
    local pkg
    for pkg in "${debian_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        say "Debian packages: all ${#debian_packages[@]} present"
        return 0
    fi
    if [[ ${HPK_SKIP_APT:-} == 1 || $(id -u) != 0 ]]; then
        say "FAILED: Debian packages missing and this run cannot install them: ${missing[*]}"
        trap - ERR
        exit 1
    fi
    say "Debian packages: installing ${missing[*]}"
    {
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    } >>"$log" 2>&1
    say "Debian packages: done"
}

# --- Go --------------------------------------------------------------------------------
check_go() {
    current_part="Go toolchain"
    if ! command -v go >/dev/null; then
        say "FAILED: Go is not installed; Go $GO_MIN_VERSION or newer is needed to build the toolchain"
        trap - ERR
        exit 1
    fi
    local have
    have=$(go env GOVERSION | sed 's/^go//')
    if [[ $(printf '%s\n%s\n' "$GO_MIN_VERSION" "$have" | sort -V | head -n1) != "$GO_MIN_VERSION" ]]; then
        say "FAILED: Go $have is too old; $GO_MIN_VERSION or newer is needed"
        trap - ERR
        exit 1
    fi
    say "Go $have"
    export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local
}

# A fresh wrapper module in which one upstream module is built as a dependency.
wrapper_module() {
    local dir=$1 name=$2
    rm -rf "$dir"
    mkdir -p "$dir"
    cd "$dir"
    go mod init "hpk.build/$name"
}

build_etcd() {
    local dest=$1 version=$2
    wrapper_module "$tools/src/etcd-$version" etcd
    go get "go.etcd.io/etcd/server/v3@v$version"
    go build -trimpath -ldflags "-s -w" -o "$dest/bin/etcd" go.etcd.io/etcd/server/v3
    "$dest/bin/etcd" --version
}

# The wrapper module in which k8s.io/kubernetes builds as a dependency (cd's into it), and
# the linker flags that stamp the version; sets `kubernetes_ldflags`.
kubernetes_module() {
    local version=$1
    local src=$tools/src/kubernetes-$version
    wrapper_module "$src" kubernetes
    go mod download -json "k8s.io/kubernetes@v$version" >module.json
    local gomod
    gomod=$(sed -n 's/^\s*"GoMod": "\(.*\)",$/\1/p' module.json)
    # k8s.io/kubernetes points each staging module at ./staging; as a dependency each must
    # be pinned to its published v0.<minor>.<patch> instead.
    local staging=v0.${version#*.}
    {
        echo "require k8s.io/kubernetes v$version"
        echo "replace ("
        sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"$staging"'#p' "$gomod"
        echo ")"
    } >>go.mod
    local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version
    local minor=${version#*.}
    minor=${minor%%.*}
    kubernetes_ldflags="-s -w"
    local p
    for p in $pkg $cpkg; do
        kubernetes_ldflags+=" -X $p.gitVersion=v$version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        kubernetes_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
    done
}

build_kubernetes() {
    local dest=$1 version=$2
    kubernetes_module "$version"
    local cmd
    for cmd in kube-apiserver kube-controller-manager kubectl; do
        echo "--- $cmd"
        go build -trimpath -ldflags "$kubernetes_ldflags" -o "$dest/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"
    done
    "$dest/bin/kubectl" version --client
}

# kube-proxy, for the pod network's Services (docs/networking.md): a part of its own, so that
# a tool folder built before it needs only this one built.
build_kube_proxy() {
    local dest=$1 version=$2
    kubernetes_module "$version"
    go build -trimpath -ldflags "$kubernetes_ldflags" -o "$dest/bin/kube-proxy" k8s.io/kubernetes/cmd/kube-proxy
    "$dest/bin/kube-proxy" --version
}

# Kubernetes' end-to-end suite (e2e.test) and agnhost, the program of its test images, for the
# [sig-network] conformance tests (hpk.testbed.conformance): the same module, with the test
# packages' own requirements added (-mod=mod). k8s.io/sample-apiserver, which only the
# aggregator's test imports, is not served at v0.<minor>.<patch>; the newest patch served
# stands in for it. agnhost is static, as it runs in images of its own.
build_kubernetes_e2e() {
    local dest=$1 version=$2
    kubernetes_module "$version"
    go mod edit -replace "k8s.io/sample-apiserver=k8s.io/sample-apiserver@v$SAMPLE_APISERVER_VERSION"
    GOFLAGS=-mod=mod go test -c -trimpath -ldflags "$kubernetes_ldflags" -o "$dest/bin/e2e.test" \
        k8s.io/kubernetes/test/e2e
    CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "$kubernetes_ldflags" \
        -o "$dest/bin/agnhost" k8s.io/kubernetes/test/images/agnhost
    local printed
    printed=$("$dest/bin/e2e.test" --version)
    echo "$printed"
    [[ $printed == "v$version" ]]
}

build_coredns() {
    local dest=$1 version=$2
    wrapper_module "$tools/src/coredns-$version" coredns
    cp "$here/coredns/main.go" .
    go get "github.com/coredns/coredns@v$version"
    go mod tidy
    go build -trimpath -ldflags "-s -w" -o "$dest/bin/coredns" .
    "$dest/bin/coredns" -version
}

# A local part, from container/<folder> (go.sum pins every module's hash).
build_local() {
    local dest=$1 version=$2 folder=$3 name=$4
    local src=$tools/src/$name-$version
    rm -rf "$src"
    mkdir -p "$src"
    cp "$here/$folder"/{go.mod,go.sum,*.go} "$src"
    cd "$src"
    go build -trimpath -ldflags "-s -w" -o "$dest/bin/$name" .
}
# The pod network's tunnel, on wireguard-go.
build_tunnel() { build_local "$1" "$2" tunnel hpk-tunnel; }
# The kubelet API's front for exec, attach and port-forward, on the kubelet's streaming code.
build_kubelet_api() { build_local "$1" "$2" kubelet-api hpk-kubelet-api; }

# A module the checksum database does not list: fetched with GONOSUMDB, checked against the
# pinned hash, and copied out of the read-only module cache into <tools>/src/<name>-<version>;
# prints that folder.
pinned_module_copy() {
    local mod=$1 version=$2 want=$3 name=$4
    local info sum dir
    info=$(GONOSUMDB=$mod go mod download -json "$mod@v$version")
    sum=$(sed -n 's/^\s*"Sum": "\(.*\)",$/\1/p' <<<"$info")
    dir=$(sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p' <<<"$info")
    if [[ $sum != "$want" ]]; then
        echo "$mod module hash $sum does not match the pinned $want" >&2
        return 1
    fi
    local src=$tools/src/$name-$version
    rm -rf "$src"
    cp -r "$dir" "$src"
    # Module zips carry no exec bits; configure and build scripts need them.
    chmod -R u+wx "$src"
    echo "$src"
}

build_apptainer() {
    local dest=$1 version=$2
    local src
    src=$(pinned_module_copy github.com/apptainer/apptainer "$version" "$APPTAINER_MODULE_SUM" \
        apptainer)
    # The copy has no git metadata: it carries the VERSION file apptainer's configure reads.
    echo "$version" >"$src/VERSION"
    cd "$src"
    # Its makefile runs `go clean -cache`: give it a build cache of its own.
    export GOCACHE=$tools/src/apptainer-gocache
    # Apptainer builds its own C parts; only its Go parts may be static.
    CGO_ENABLED=1 ./mconfig --without-suid -b builddir --prefix="$dest"
    CGO_ENABLED=1 make -C builddir -j "$(nproc)"
    CGO_ENABLED=1 make -C builddir install
    "$dest/bin/apptainer" version
}

build_argo() {
    local dest=$1 version=$2
    local src
    src=$(pinned_module_copy github.com/argoproj/argo-workflows/v3 "$version" "$ARGO_MODULE_SUM" argo)
    cd "$src"
    # Module zips leave symbolic links out: upstream's signal_linux.go is a link to
    # signal_darwin.go.
    local os_dir=workflow/executor/osspecific
    [[ -e $os_dir/signal_linux.go ]] || cp "$os_dir/signal_darwin.go" "$os_dir/signal_linux.go"
    # The argo CLI embeds the web UI's build output (ui/dist/app), which the module does not
    # carry and hpk does not serve: a placeholder page stands in for it.
    mkdir -p ui/dist/app
    echo '<!doctype html><title>Argo</title><p>The web UI is not part of this build.</p>' \
        >ui/dist/app/index.html
    local pkg=github.com/argoproj/argo-workflows/v3
    local ld="-s -w -X $pkg.version=v$version -X $pkg.gitTreeState=clean"
    local cmd
    for cmd in workflow-controller argoexec argo; do
        echo "--- $cmd"
        go build -trimpath -ldflags "$ld" -o "$dest/bin/$cmd" "./cmd/$cmd"
    done
    "$dest/bin/argo" version --short
    # The install manifests, made as upstream's release makes them: kustomize's build of the
    # cluster-wide and the namespaced install, with the images' :latest tag set to the release.
    # Named as upstream's release names them: install.yaml and namespace-install.yaml.
    local kubectl=$tools/kubernetes-$KUBERNETES_VERSION/bin/kubectl kustomization out
    mkdir -p "$dest/manifests"
    for kustomization in cluster-install namespace-install; do
        out=$dest/manifests/${kustomization/cluster-/}.yaml
        "$kubectl" kustomize --load-restrictor=LoadRestrictionsNone "manifests/$kustomization" |
            sed "s/:latest/:v$version/" >"$out"
        grep -q "workflow-controller:v$version" "$out"
        echo "--- $out: $(grep -c '^kind:' "$out") objects"
    done
}

# metrics-server, for `kubectl top`: the checksum database lists its module, so `go install`
# of the pinned version checks it. The version is stamped where `--version` reads it, as
# upstream's release does.
build_metrics_server() {
    local dest=$1 version=$2
    local pkg=k8s.io/client-go/pkg/version minor=${version#*.}
    minor=${minor%%.*}
    local ld="-s -w -X $pkg.gitVersion=v$version -X $pkg.gitMajor=${version%%.*}"
    ld+=" -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    GOBIN=$dest/bin go install -trimpath -ldflags "$ld" \
        "sigs.k8s.io/metrics-server/cmd/metrics-server@v$version"
    local printed
    printed=$("$dest/bin/metrics-server" --version)
    echo "$printed"
    [[ $printed == "v$version" ]]
}

# MinIO, the S3 server of Argo's artifact repository: the checksum database lists its module.
# Static, as upstream's release is. MinIO stamps a release date it then parses; a build from
# the module stamps none, and `--version` says DEVELOPMENT.GOGET.
build_minio() {
    local dest=$1 version=$2
    CGO_ENABLED=0 GOBIN=$dest/bin go install -trimpath -ldflags "-s -w" \
        "github.com/minio/minio@v$version"
    "$dest/bin/minio" --version
}

# Whether the Go module proxy answers. A build may still succeed from the local module cache,
# so an unreachable proxy is not fatal by itself; if a part then fails, the message names it.
proxy_problem=""
check_module_proxy() {
    local name answer
    for name in etcd-$ETCD_VERSION kubernetes-$KUBERNETES_VERSION kube-proxy-$KUBERNETES_VERSION \
        kubernetes-e2e-$KUBERNETES_VERSION \
        coredns-$COREDNS_VERSION hpk-tunnel-$tunnel_version hpk-kubelet-api-$kubelet_api_version \
        apptainer-$APPTAINER_VERSION argo-$ARGO_VERSION metrics-server-$METRICS_SERVER_VERSION \
        minio-$MINIO_VERSION; do
        [[ -f $tools/$name/.complete ]] && continue
        # -versions always asks the proxy; a plain lookup may be answered from the local cache.
        if ! answer=$(timeout 120 go list -m -versions k8s.io/kubernetes 2>&1); then
            proxy_problem="the Go module proxy ($(go env GOPROXY)) cannot be reached: $(tail -n 1 <<<"$answer")"
            say "warning: $proxy_problem; building from the local module cache"
        fi
        return 0
    done
}

tunnel_version=$(local_version tunnel "$WIREGUARD_GO_VERSION")
kubelet_api_version=$(local_version kubelet-api "$KUBERNETES_VERSION")

say "tool folder: $tools"
install_debian_packages
check_go
check_module_proxy
part etcd "$ETCD_VERSION" build_etcd
part kubernetes "$KUBERNETES_VERSION" build_kubernetes
part kube-proxy "$KUBERNETES_VERSION" build_kube_proxy
part coredns "$COREDNS_VERSION" build_coredns
part hpk-tunnel "$tunnel_version" build_tunnel
part hpk-kubelet-api "$kubelet_api_version" build_kubelet_api
part apptainer "$APPTAINER_VERSION" build_apptainer
part argo "$ARGO_VERSION" build_argo
part metrics-server "$METRICS_SERVER_VERSION" build_metrics_server
part minio "$MINIO_VERSION" build_minio
part kubernetes-e2e "$KUBERNETES_VERSION" build_kubernetes_e2e
trap - ERR
say "ready: $tools"
