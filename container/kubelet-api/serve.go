package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	remotecommandconsts "k8s.io/apimachinery/pkg/util/remotecommand"
	"k8s.io/kubelet/pkg/cri/streaming/portforward"
	"k8s.io/kubelet/pkg/cri/streaming/remotecommand"
)

const (
	// Those of the Kubernetes kubelet: streamingConnectionIdleTimeout's default, and the
	// streaming server's stream creation timeout.
	streamIdleTimeout     = 4 * time.Hour
	streamCreationTimeout = 30 * time.Second
	planTimeout           = 30 * time.Second
)

// Who may use the kubelet API, as the Python kubelet decides it (kubelet_py.loops.logserver).
var (
	allowedUsers  = []string{"kube-apiserver-kubelet-client"}
	allowedGroups = []string{"system:masters"}
	// metrics-server: its usage and metrics paths, never a log nor a stream.
	metricsReaders = []string{"hpk:metrics-server"}
	metricsPaths   = []string{"/healthz", "/metrics", "/metrics/resource", "/stats/summary"}
)

// nodeHeader names the node whose port a request came to, for the kubelet's usage paths.
const nodeHeader = "X-Hpk-Node"

type server struct {
	backend string // the Python kubelet's Unix socket
	client  *http.Client
	proxy   *httputil.ReverseProxy
}

func serve(args []string) error {
	flags := flag.NewFlagSet("serve", flag.ContinueOnError)
	listen := flags.String("listen", "", "address:port of the kubelet API")
	cert := flags.String("cert", "", "serving certificate (PEM)")
	key := flags.String("key", "", "its private key")
	clientCA := flags.String("client-ca", "", "CA of the accepted client certificates")
	backend := flags.String("backend", "", "Unix socket of the Python kubelet")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *listen == "" || *cert == "" || *key == "" || *clientCA == "" || *backend == "" {
		return errors.New("serve needs --listen, --cert, --key, --client-ca and --backend")
	}
	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		return err
	}
	caPEM, err := os.ReadFile(*clientCA)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return fmt.Errorf("%s holds no certificate", *clientCA)
	}
	s := newServer(*backend)
	config := &tls.Config{
		Certificates: []tls.Certificate{pair},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
		NextProtos:   []string{"http/1.1"},
	}
	host, _, err := net.SplitHostPort(*listen)
	if err != nil {
		return err
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	go s.follow(os.Stdin, host, config)
	return serveOn(listener, config, &nodeHandler{server: s})
}

func serveOn(listener net.Listener, config *tls.Config, handler http.Handler) error {
	httpServer := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 10 * time.Second,
		// HTTP/1.1 only: the streaming protocols upgrade the connection.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		TLSConfig:    config,
		ErrorLog:     log.New(os.Stderr, "hpk-kubelet-api: ", 0),
	}
	return httpServer.ServeTLS(listener, "", "")
}

// follow reads the kubelet's requests for nodes' ports until stdin closes, and then ends
// the helper: the kubelet holds the other end.
func (s *server) follow(stdin io.Reader, host string, config *tls.Config) {
	lines := bufio.NewScanner(stdin)
	for lines.Scan() {
		words := strings.Fields(lines.Text())
		if len(words) != 3 || words[0] != "listen" {
			fmt.Printf("failed ? cannot read %q\n", lines.Text())
			continue
		}
		node, port := words[1], words[2]
		listener, err := net.Listen("tcp", net.JoinHostPort(host, port))
		if err != nil {
			fmt.Printf("failed %s %v\n", node, strings.ReplaceAll(err.Error(), "\n", " "))
			continue
		}
		go func() {
			err := serveOn(listener, config, &nodeHandler{server: s, node: node})
			log.Printf("node %s: its port stopped: %v", node, err)
		}()
		fmt.Printf("listening %s %d\n", node, listener.Addr().(*net.TCPAddr).Port)
	}
	log.Print("the kubelet ended; stopping")
	os.Exit(0)
}

// nodeHandler serves one port: the main one (no node) or a node's own.
type nodeHandler struct {
	server *server
	node   string
}

func (h *nodeHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	r.Header.Del(nodeHeader)
	if h.node != "" {
		r.Header.Set(nodeHeader, h.node)
	}
	h.server.ServeHTTP(w, r)
}

func newServer(backend string) *server {
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		var dialer net.Dialer
		return dialer.DialContext(ctx, "unix", backend)
	}
	transport := &http.Transport{DialContext: dial, MaxIdleConns: 16, IdleConnTimeout: time.Minute}
	target := &url.URL{Scheme: "http", Host: "kubelet"}
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.Transport = transport
	// A followed log is written as it comes.
	proxy.FlushInterval = -1
	return &server{
		backend: backend,
		client:  &http.Client{Transport: transport, Timeout: planTimeout},
		proxy:   proxy,
	}
}

func allowed(r *http.Request) (string, []string, bool) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return "", nil, false
	}
	subject := r.TLS.PeerCertificates[0].Subject
	ok := slices.Contains(allowedUsers, subject.CommonName)
	for _, group := range subject.Organization {
		ok = ok || slices.Contains(allowedGroups, group)
	}
	if !ok && slices.Contains(metricsReaders, subject.CommonName) && r.Method == http.MethodGet {
		ok = slices.Contains(metricsPaths, strings.TrimSuffix(r.URL.Path, "/"))
	}
	return subject.CommonName, subject.Organization, ok
}

func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	user, groups, ok := allowed(r)
	if !ok {
		log.Printf("refused %s %s to user %q (groups %v)", r.Method, r.URL.Path, user, groups)
		http.Error(w, fmt.Sprintf("Forbidden (user=%s, groups=%v): only the API server and "+
			"system:masters may use the kubelet API", user, groups), http.StatusForbidden)
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
	switch {
	case (parts[0] == "exec" || parts[0] == "attach") && (len(parts) == 4 || len(parts) == 5):
		if r.Method != http.MethodGet && r.Method != http.MethodPost {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		// /exec/{namespace}/{pod}/{container} or /exec/{namespace}/{pod}/{uid}/{container}
		s.remoteCommand(w, r, parts[0], parts[1], parts[2], parts[len(parts)-1])
	case parts[0] == "portForward" && (len(parts) == 3 || len(parts) == 4):
		if r.Method != http.MethodGet && r.Method != http.MethodPost {
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		s.portForward(w, r, parts[1], parts[2])
	case parts[0] == "hpk":
		// The plans are for this helper alone.
		http.NotFound(w, r)
	default:
		s.proxy.ServeHTTP(w, r)
	}
}

// A plan: what the Python kubelet says to run (exec, attach) or to dial (portforward).
type planRequest struct {
	Kind      string   `json:"kind"`
	Namespace string   `json:"namespace"`
	Pod       string   `json:"pod"`
	Container string   `json:"container,omitempty"`
	Command   []string `json:"command,omitempty"`
	TTY       bool     `json:"tty,omitempty"`
	Stdin     bool     `json:"stdin,omitempty"`
}

type plan struct {
	Argv    []string `json:"argv"`
	Env     []string `json:"env"`
	Address string   `json:"address"`
	Relay   string   `json:"relay"`
}

// planError is the kubelet's refusal, answered to the client as it is.
type planError struct {
	status  int
	message string
}

func (e *planError) Error() string { return e.message }

func (s *server) plan(ctx context.Context, request planRequest) (*plan, error) {
	body, err := json.Marshal(request)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://kubelet/hpk/plan", bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("the kubelet did not answer: %w", err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &planError{status: resp.StatusCode, message: strings.TrimSpace(string(data))}
	}
	var answer plan
	if err := json.Unmarshal(data, &answer); err != nil {
		return nil, fmt.Errorf("the kubelet's plan cannot be read: %w", err)
	}
	return &answer, nil
}

func answerPlanError(w http.ResponseWriter, err error) {
	var refused *planError
	if errors.As(err, &refused) {
		http.Error(w, refused.message, refused.status)
		return
	}
	log.Printf("plan failed: %v", err)
	http.Error(w, err.Error(), http.StatusInternalServerError)
}

func (s *server) remoteCommand(w http.ResponseWriter, r *http.Request, kind, namespace, pod, container string) {
	options, err := remotecommand.NewOptions(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	request := planRequest{
		Kind: kind, Namespace: namespace, Pod: pod, Container: container,
		TTY: options.TTY, Stdin: options.Stdin,
	}
	if kind == "exec" {
		request.Command = r.URL.Query()["command"]
		if len(request.Command) == 0 {
			http.Error(w, "no command given", http.StatusBadRequest)
			return
		}
	}
	// Asked before the upgrade, so that a refusal reaches the client as an HTTP error.
	p, err := s.plan(r.Context(), request)
	if err != nil {
		answerPlanError(w, err)
		return
	}
	runner := &commandRunner{plan: p}
	protocols := remotecommandconsts.SupportedStreamingProtocols
	name := namespace + "/" + pod
	if kind == "exec" {
		remotecommand.ServeExec(w, r, runner, name, "", container, request.Command, options,
			streamIdleTimeout, streamCreationTimeout, protocols)
	} else {
		remotecommand.ServeAttach(w, r, runner, name, "", container, options,
			streamIdleTimeout, streamCreationTimeout, protocols)
	}
}

func (s *server) portForward(w http.ResponseWriter, r *http.Request, namespace, pod string) {
	options, err := portforward.NewV4Options(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	request := planRequest{Kind: "portforward", Namespace: namespace, Pod: pod}
	p, err := s.plan(r.Context(), request)
	if err != nil {
		answerPlanError(w, err)
		return
	}
	forwarder := &forwarder{plan: p}
	portforward.ServePortForward(w, r, forwarder, namespace+"/"+pod, "", options,
		streamIdleTimeout, streamCreationTimeout, portforward.SupportedProtocols)
}
