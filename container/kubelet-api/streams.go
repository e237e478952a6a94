package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/remotecommand"
	utilexec "k8s.io/utils/exec"
)

const (
	dialTimeout = 10 * time.Second
	// How long a terminal's start waits for the client's size, and how long srun takes to
	// set its terminal up (resizes wait for it).
	firstSizeWait = time.Second
	terminalSetUp = 2 * time.Second
)

// commandRunner runs a plan's command (srun into the pod's job, which enters the container)
// with the client's streams: exec and attach are the same here, the plan says what to run.
type commandRunner struct{ plan *plan }

func (c *commandRunner) ExecInContainer(ctx context.Context, _ string, _ types.UID, _ string,
	_ []string, in io.Reader, out, stderr io.WriteCloser, tty bool,
	resize <-chan remotecommand.TerminalSize, _ time.Duration) error {
	return c.run(ctx, in, out, stderr, tty, resize)
}

func (c *commandRunner) AttachContainer(ctx context.Context, _ string, _ types.UID, _ string,
	in io.Reader, out, stderr io.WriteCloser, tty bool,
	resize <-chan remotecommand.TerminalSize) error {
	return c.run(ctx, in, out, stderr, tty, resize)
}

func (c *commandRunner) run(ctx context.Context, in io.Reader, out, stderr io.WriteCloser,
	tty bool, resize <-chan remotecommand.TerminalSize) error {
	if len(c.plan.Argv) == 0 {
		return errors.New("the kubelet gave no command to run")
	}
	cmd := exec.Command(c.plan.Argv[0], c.plan.Argv[1:]...)
	cmd.Env = c.plan.Env
	cmd.Dir = "/"
	var err error
	if tty {
		err = runTerminal(ctx, cmd, in, out, resize)
	} else {
		err = runPiped(ctx, cmd, in, out, stderr)
	}
	var exited *exec.ExitError
	if errors.As(err, &exited) && exited.ExitCode() >= 0 {
		return utilexec.CodeExitError{Err: err, Code: exited.ExitCode()}
	}
	return err
}

// stopOnCancel ends the command's process group when the client goes away, and returns the
// function that says the command has ended.
func stopOnCancel(ctx context.Context, cmd *exec.Cmd) func() {
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			// srun passes TERM on to the step; the step's processes end with it.
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		case <-done:
		}
	}()
	return func() { close(done) }
}

func runPiped(ctx context.Context, cmd *exec.Cmd, in io.Reader, out, stderr io.WriteCloser) error {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var stdin io.WriteCloser
	var err error
	if in != nil {
		if stdin, err = cmd.StdinPipe(); err != nil {
			return err
		}
	}
	readers := map[io.WriteCloser]io.ReadCloser{}
	for target, get := range map[io.WriteCloser]func() (io.ReadCloser, error){
		out: cmd.StdoutPipe, stderr: cmd.StderrPipe,
	} {
		if target == nil {
			continue
		}
		if readers[target], err = get(); err != nil {
			return err
		}
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	ended := stopOnCancel(ctx, cmd)
	defer ended()
	if stdin != nil {
		go func() {
			_, _ = io.Copy(stdin, in)
			stdin.Close()
		}()
	}
	var copies sync.WaitGroup
	for target, reader := range readers {
		copies.Add(1)
		go func() {
			defer copies.Done()
			if _, err := io.Copy(target, reader); err != nil {
				// The client stopped reading: the command is of no use any more.
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
			}
		}()
	}
	// Wait closes the pipes: every byte must be read first.
	copies.Wait()
	return cmd.Wait()
}

// runTerminal runs the command on a terminal of its own (srun --pty reads its size from it
// and passes it on): what the client types goes in raw, and each resize sets its size.
func runTerminal(ctx context.Context, cmd *exec.Cmd, in io.Reader, out io.Writer,
	resize <-chan remotecommand.TerminalSize) error {
	master, slave, err := openTerminal()
	if err != nil {
		return err
	}
	defer master.Close()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	setSize := func(size remotecommand.TerminalSize) {
		winsize := &unix.Winsize{Row: size.Height, Col: size.Width}
		_ = unix.IoctlSetWinsize(int(master.Fd()), unix.TIOCSWINSZ, winsize)
	}
	// The client sends its size first: set before the start, it needs no signal. srun
	// gives up its terminal when SIGWINCH interrupts it while it sets the terminal up, so a
	// resize in its first moments waits until they are over.
	select {
	case size, ok := <-resize:
		if ok {
			setSize(size)
		}
	case <-time.After(firstSizeWait):
	}
	err = cmd.Start()
	slave.Close()
	if err != nil {
		return err
	}
	started := time.Now()
	ended := stopOnCancel(ctx, cmd)
	defer ended()
	if resize != nil {
		go func() {
			for size := range resize {
				time.Sleep(time.Until(started.Add(terminalSetUp)))
				setSize(size)
			}
		}()
	}
	if in != nil {
		go func() { _, _ = io.Copy(master, in) }()
	}
	if out != nil {
		// Reading ends with EIO once every process has closed the terminal.
		_, _ = io.Copy(out, master)
	} else {
		_, _ = io.Copy(io.Discard, master)
	}
	return cmd.Wait()
}

// openTerminal opens a new pseudo-terminal, its slave side in raw mode.
func openTerminal() (*os.File, *os.File, error) {
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	fd := int(master.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		master.Close()
		return nil, nil, err
	}
	number, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN)
	if err != nil {
		master.Close()
		return nil, nil, err
	}
	slave, err := os.OpenFile("/dev/pts/"+strconv.Itoa(int(number)), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		master.Close()
		return nil, nil, err
	}
	if err := makeRaw(int(slave.Fd())); err != nil {
		master.Close()
		slave.Close()
		return nil, nil, err
	}
	return master, slave, nil
}

// makeRaw is cfmakeraw(3): bytes pass through unchanged both ways.
func makeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR |
		unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB
	t.Cflag |= unix.CS8
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

// forwarder connects each port-forward stream to the pod's address: directly when the pod is
// on the node's network, through the hub's relay when it is on the pod network.
type forwarder struct{ plan *plan }

func (f *forwarder) PortForward(ctx context.Context, name string, _ types.UID, port int32,
	stream io.ReadWriteCloser) error {
	target := net.JoinHostPort(f.plan.Address, strconv.Itoa(int(port)))
	conn, err := f.dial(ctx, target)
	if err != nil {
		return fmt.Errorf("pod %s: cannot connect to %s: %w", name, target, err)
	}
	defer conn.Close()
	splice(ctx, conn, stream)
	return nil
}

func (f *forwarder) dial(ctx context.Context, target string) (net.Conn, error) {
	dialer := net.Dialer{Timeout: dialTimeout}
	if f.plan.Relay == "" {
		return dialer.DialContext(ctx, "tcp", target)
	}
	conn, err := dialer.DialContext(ctx, "unix", f.plan.Relay)
	if err != nil {
		return nil, fmt.Errorf("the pod network's relay: %w", err)
	}
	_ = conn.SetDeadline(time.Now().Add(dialTimeout + 5*time.Second))
	if _, err := io.WriteString(conn, target+"\n"); err != nil {
		conn.Close()
		return nil, err
	}
	answer, err := readLine(conn)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("the pod network's relay: %w", err)
	}
	if answer != "ok" {
		conn.Close()
		return nil, errors.New(answer)
	}
	_ = conn.SetDeadline(time.Time{})
	return conn, nil
}

// readLine reads one line a byte at a time: what follows it is the stream's, not the line's.
func readLine(conn net.Conn) (string, error) {
	var line []byte
	one := make([]byte, 1)
	for len(line) < 512 {
		if _, err := conn.Read(one); err != nil {
			return "", err
		}
		if one[0] == '\n' {
			return string(line), nil
		}
		line = append(line, one[0])
	}
	return "", errors.New("line too long")
}

type closeWriter interface{ CloseWrite() error }

// splice copies both ways until the far side has closed (or the stream has gone); the end of
// the stream's input closes the connection's sending side only, so an answer still arrives.
func splice(ctx context.Context, conn net.Conn, stream io.ReadWriteCloser) {
	back := make(chan struct{})
	go func() {
		_, _ = io.Copy(conn, stream)
		if half, ok := conn.(closeWriter); ok {
			_ = half.CloseWrite()
		}
	}()
	go func() {
		_, _ = io.Copy(stream, conn)
		close(back)
	}()
	select {
	case <-back:
	case <-ctx.Done():
	}
}
