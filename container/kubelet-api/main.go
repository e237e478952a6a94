// Command hpk-kubelet-api fronts the kubelet's HTTPS port (docs/kubelet.md, "The kubelet API").
//
// It serves /exec, /attach and /portForward itself, through the Kubernetes kubelet's own
// streaming packages (k8s.io/kubelet/pkg/cri/streaming: SPDY/3.1 and the v4/v5 WebSocket
// channel protocols), and hands every other path to the Python kubelet over a Unix socket.
// What to run for an exec or an attach, and where a pod's ports are, it asks the Python
// kubelet too (POST /hpk/plan on that socket): this helper holds no knowledge of pods.
//
//	hpk-kubelet-api serve --listen ADDR:PORT --cert F --key F --client-ca F --backend SOCKET
//	hpk-kubelet-api relay --socket PATH --allow CIDR[,CIDR...]
//
// serve: TLS with a client certificate signed by the cluster CA, and then only the API
// server's kubelet-client identity or a member of system:masters (metrics-server's identity
// may read the usage and metrics paths alone). It writes "ready" on stdout once the port is
// bound. On stdin the kubelet asks for a node's own port ("listen NODE PORT", answered
// "listening NODE PORT" or "failed NODE WHY"); requests that come to it reach the kubelet
// with the node's name in X-Hpk-Node. It ends when its stdin closes (the kubelet ended).
//
// relay: run inside the pod network's hub namespace; takes Unix connections that name an
// address ("10.244.0.7:8888\n"), dials it inside the namespace, answers "ok\n" or
// "error: ...\n", and then copies both ways. Port-forwards reach pods through it.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: hpk-kubelet-api serve|relay [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "relay":
		err = relay(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q: serve or relay", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hpk-kubelet-api:", err)
		os.Exit(1)
	}
}
