package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"time"
)

func relay(args []string) error {
	flags := flag.NewFlagSet("relay", flag.ContinueOnError)
	socket := flags.String("socket", "", "Unix socket to listen on (made 0600)")
	allow := flags.String("allow", "", "comma-separated CIDRs that may be dialled")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *socket == "" || *allow == "" {
		return errors.New("relay needs --socket and --allow")
	}
	var allowed []netip.Prefix
	for _, text := range strings.Split(*allow, ",") {
		prefix, err := netip.ParsePrefix(strings.TrimSpace(text))
		if err != nil {
			return err
		}
		allowed = append(allowed, prefix)
	}
	_ = os.Remove(*socket)
	syscall.Umask(0o077)
	listener, err := net.Listen("unix", *socket)
	if err != nil {
		return err
	}
	fmt.Println("ready")
	for {
		conn, err := listener.Accept()
		if err != nil {
			return err
		}
		go relayOne(conn, allowed)
	}
}

func relayOne(conn net.Conn, allowed []netip.Prefix) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(dialTimeout))
	line, err := readLine(conn)
	if err != nil {
		return
	}
	target, err := netip.ParseAddrPort(line)
	if err != nil {
		fmt.Fprintf(conn, "error: %q is no address and port\n", line)
		return
	}
	permitted := false
	for _, prefix := range allowed {
		permitted = permitted || prefix.Contains(target.Addr())
	}
	if !permitted {
		fmt.Fprintf(conn, "error: %s is not on the pod network\n", target.Addr())
		return
	}
	dialer := net.Dialer{Timeout: dialTimeout}
	far, err := dialer.Dial("tcp", target.String())
	if err != nil {
		fmt.Fprintf(conn, "error: %v\n", err)
		return
	}
	defer far.Close()
	if _, err := io.WriteString(conn, "ok\n"); err != nil {
		return
	}
	_ = conn.SetDeadline(time.Time{})
	splice(context.Background(), far, conn)
}
