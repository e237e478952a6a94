// Command hpk-tunnel is one WireGuard endpoint of hpk's pod network, run without root.
//
// A pod's holder (kubelet_py/job/netns.py) opens a TUN device inside the pod's own user
// and network namespaces and hands its descriptor over; this program inherits it, runs on
// the node's network and carries the device's packets over UDP to the hub
// (docs/networking.md). It is wireguard-go's device, bind and TUN code, started
// differently from the stock wireguard-go command, which cannot serve here: that one
// opens the TUN device by name in its own namespace, where the device does not exist, and
// insists on a control socket under /var/run/wireguard, which an ordinary user cannot
// create.
//
//	hpk-tunnel --tun-fd N [--control PATH] [--ready-fd M] [--verbose] <config
//
// The configuration on stdin, read until EOF, is the body of a WireGuard UAPI set request
// (private_key=…, listen_port=…, then public_key=… and that peer's lines). With --control,
// a unix socket at PATH (mode 0600) serves the standard UAPI protocol (get=1, set=1), so
// that peers can be added and removed while the tunnel runs. With --ready-fd, the line
// "ready" is written to descriptor M once the device is up and the socket listens.
//
// It runs until SIGTERM or SIGINT, or until the device ends, then exits 0. A bad
// configuration exits 2, any other failure to start exits 1.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"sync/atomic"
	"syscall"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
)

// memoryLimit is the Go heap's soft limit unless GOMEMLIMIT says otherwise: under load
// the device's buffer pools grow, and a pod's network must stay within its budget.
const memoryLimit = 64 << 20

// errConfig marks a configuration the device refused; it exits 2.
var errConfig = errors.New("bad configuration")

// configuring is set while the configuration from stdin is applied: the device would log
// its error too, and run reports it once.
var configuring atomic.Bool

func main() {
	tunFD := flag.Int("tun-fd", -1, "inherited descriptor of an open TUN device (required)")
	control := flag.String("control", "", "path of a unix socket serving WireGuard's UAPI")
	readyFD := flag.Int("ready-fd", -1, `descriptor to write "ready" to once up`)
	verbose := flag.Bool("verbose", false, "log the device's every step, not only errors")
	flag.Parse()
	if *tunFD < 0 || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: hpk-tunnel --tun-fd N [--control PATH] [--ready-fd M] [--verbose] <config")
		os.Exit(2)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(memoryLimit)
	}
	if err := run(*tunFD, *control, *readyFD, *verbose); err != nil {
		fmt.Fprintf(os.Stderr, "hpk-tunnel: %v\n", err)
		if errors.Is(err, errConfig) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// run sets the device up and serves it until a signal comes or the device ends.
func run(tunFD int, control string, readyFD int, verbose bool) error {
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	config, err := io.ReadAll(os.Stdin)
	if err != nil {
		return fmt.Errorf("reading the configuration: %w", err)
	}
	tunDevice, _, err := tun.CreateUnmonitoredTUNFromFD(tunFD)
	if err != nil {
		return fmt.Errorf("TUN descriptor %d: %w", tunFD, err)
	}
	dev := device.NewDevice(tunDevice, conn.NewDefaultBind(), logger(verbose))
	defer dev.Close()
	configuring.Store(true)
	err = dev.IpcSet(string(config))
	configuring.Store(false)
	if err != nil {
		return fmt.Errorf("%w: %v", errConfig, err)
	}
	if err := dev.Up(); err != nil {
		return fmt.Errorf("bringing the device up: %w", err)
	}
	if control != "" {
		listener, err := listen(control)
		if err != nil {
			return fmt.Errorf("control socket: %w", err)
		}
		defer listener.Close() // which removes the socket file
		go serve(listener, dev)
	}
	if readyFD >= 0 {
		ready := os.NewFile(uintptr(readyFD), "ready")
		_, err := ready.WriteString("ready\n")
		ready.Close()
		if err != nil {
			return fmt.Errorf("ready descriptor %d: %w", readyFD, err)
		}
	}
	select {
	case <-signals:
	case <-dev.Wait():
	}
	return nil
}

// logger writes the device's messages to stderr (wireguard-go's own logger writes to
// stdout). The device cannot read its TUN's MTU by name from this namespace and says so
// once; it keeps its 1420 default, the overlay's MTU, so that message is dropped.
func logger(verbose bool) *device.Logger {
	out := log.New(os.Stderr, "hpk-tunnel: ", log.LstdFlags)
	logger := &device.Logger{
		Verbosef: device.DiscardLogf,
		Errorf: func(format string, args ...any) {
			if !configuring.Load() && !strings.HasPrefix(format, "Trouble determining MTU") {
				out.Printf("ERROR: "+format, args...)
			}
		},
	}
	if verbose {
		logger.Verbosef = func(format string, args ...any) { out.Printf("DEBUG: "+format, args...) }
	}
	return logger
}

// listen makes the control socket, open to this user only from its first moment.
func listen(path string) (*net.UnixListener, error) {
	if info, err := os.Lstat(path); err == nil {
		if info.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	umask := syscall.Umask(0o177)
	listener, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(umask)
	return listener, err
}

// serve hands every connection to the device's own UAPI handler.
func serve(listener *net.UnixListener, dev *device.Device) {
	for {
		connection, err := listener.Accept()
		if err != nil {
			return
		}
		go dev.IpcHandle(connection)
	}
}
